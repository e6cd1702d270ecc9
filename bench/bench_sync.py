#!/usr/bin/env python3
"""Benchmark ccsync on a large cc database (stdlib only + ccsync).

What it measures, all in a temporary directory that is deleted afterwards:

1. device A: a cc database built from tests/cc-schema.sql and filled with
   ``--rows`` rows of code-index data (skill_tag + knowledge_index over ~100
   repositories) plus a few hundred versions/projects/environments/switch_log/
   backup/... rows, by plain sqlite3 before ccsync ever opens it;
2. the first ``store.prepare()`` (stamping every row), the first full
   ``sync_once`` on A (pushing everything) and the first sync of an empty
   device B (pulling everything);
3. the steady state: a sync with nothing to do, and a sync after cc changed
   one row, on A and on B (median and min over ``--repeat`` runs);
4. lock hold: the longest top-level write transaction ccsync held on a device
   database during each big phase, compared with cc's 5 s busy timeout;
5. ratios between those figures.

The numbers are a report, not a test: nothing here asserts a time limit.

    python3 bench/bench_sync.py [--rows 100000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ccsync  # noqa: E402

SCHEMA_PATH = REPO / "tests" / "cc-schema.sql"
CC_BUSY_TIMEOUT_S = 5.0          # cc opens its database with a 5 s busy timeout
perf = time.perf_counter


def log(*parts: object) -> None:
    """Progress on stderr, so stdout stays the report (or the JSON object)."""
    print(*parts, file=sys.stderr, flush=True)


##### Lock-hold instrumentation ################################################
# Store methods call the module-level name ``transaction(...)``, so replacing
# ``ccsync.transaction`` with a timing wrapper sees every transaction ccsync
# opens, without touching ccsync.py.  Only top-level ones (BEGIN IMMEDIATE ...
# COMMIT; the connection not yet in a transaction) on a watched device
# connection are recorded: those are the spans during which cc cannot write.

class LockRecorder:
    def __init__(self) -> None:
        self.original = ccsync.transaction
        self.watched: dict[int, str] = {}     # id(conn) -> device name
        self.phase = "setup"
        self.spans: dict[str, list[float]] = {}

    def watch(self, conn: sqlite3.Connection, device: str) -> None:
        self.watched[id(conn)] = device

    def install(self) -> None:
        original, recorder = self.original, self

        @contextlib.contextmanager
        def timed_transaction(conn):
            if conn.in_transaction or id(conn) not in recorder.watched:
                with original(conn) as inner:
                    yield inner
                return
            start = perf()
            try:
                with original(conn) as inner:
                    yield inner
            finally:
                recorder.spans.setdefault(recorder.phase, []).append(perf() - start)

        timed_transaction.__wrapped__ = original
        ccsync.transaction = timed_transaction

    def uninstall(self) -> None:
        ccsync.transaction = self.original

    @contextlib.contextmanager
    def in_phase(self, name: str):
        previous, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = previous

    def summary(self, phase: str) -> dict:
        spans = sorted(self.spans.get(phase, []))
        if not spans:
            return {"transactions": 0, "max_ms": 0.0, "p95_ms": 0.0, "total_ms": 0.0}
        p95 = spans[max(0, math.ceil(0.95 * len(spans)) - 1)]
        return {"transactions": len(spans), "max_ms": spans[-1] * 1000, "p95_ms": p95 * 1000,
                "median_ms": statistics.median(spans) * 1000,
                "total_ms": sum(spans) * 1000}


##### Building device A's cc database ##########################################

SKILL_TAGS = ("python", "javascript", "orm", "views", "qweb", "security", "tests", "reports",
              "controllers", "wizard", "migration", "performance", "owl", "scss", "xml",
              "accounting", "stock", "sale", "website", "hr")
SYMBOL_KINDS = ("class", "method", "function", "field", "model", "view", "xmlid")


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def build_cc_db(path: Path, rows: int, rng: random.Random, id_lists: bool) -> dict[str, int]:
    """Fill a fresh cc database with executemany; returns rows per synced table."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=CC_BUSY_TIMEOUT_S)
    conn.executescript(SCHEMA_PATH.read_text())
    base = 1_700_000_000.0
    conn.execute("BEGIN")
    ins = conn.executemany

    versions = ["15.0", "16.0", "17.0", "18.0", "saas-17.2", "saas-17.4", "saas-18.1",
                "saas-18.2", "saas-18.3", "master"]
    ins("INSERT INTO version (id, name, path, port, pyenv_virtualenv, branch, last_fetched_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(i + 1, v, f"/home/dev/src/odoo-{v}", str(8069 + i), f"odoo-{v}", v,
          iso(base + i * 3600)) for i, v in enumerate(versions)])

    settings = [("editor", "code"), ("default_version", "17.0"), ("theme", "dark"),
                ("github_pat", "ghp_notarealtoken"), ("ide", "pycharm"),
                ("backup.dir", "/home/dev/backups"), ("pg.connection", "postgres://"),
                ("ccsync.local_settings", "")]
    settings += [(f"pref.option_{i}", str(rng.randint(0, 100))) for i in range(22)]
    ins("INSERT INTO setting (name, value) VALUES (?, ?)", settings)

    n_db = 60
    ins("INSERT INTO database (id, name, last_update, clone_db_id, in_pg, size_bytes, "
        "last_login, is_odoo, last_synced_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(i, f"db_{i:03d}", iso(base + i * 600), (rng.randint(1, i - 1) if i > 5 and i % 4 == 0
                                                  else None),
          1, rng.randint(10 ** 7, 10 ** 10), iso(base + i * 700), 1, None)
         for i in range(1, n_db + 1)])

    ins("INSERT INTO workspace (id, name, path, is_rnd, version_id) VALUES (?, ?, ?, ?, ?)",
        [(i, f"ws{i}", f"/home/dev/ws{i}", i % 2, (i % len(versions)) + 1) for i in range(1, 6)])

    n_proj, envs_per_proj = 120, 2
    env_ids = {p: list(range((p - 1) * envs_per_proj + 1, p * envs_per_proj + 1))
               for p in range(1, n_proj + 1)}
    ins("INSERT INTO project (id, name, is_virtual, no_auto_archive, home_repo, main_branch, "
        "workspace_id, environment_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(p, f"project-{p:03d}", 0, p % 7 == 0, f"git@github.com:acme/project-{p}.git",
          "main", (p % 5) + 1, json.dumps(env_ids[p])) for p in range(1, n_proj + 1)])
    envs = []
    for p, ids in env_ids.items():
        for k, e in enumerate(ids):
            envs.append((e, "prod" if k == 0 else f"dev-{k}", f"/home/dev/envs/{p}-{k}",
                         f"https://github.com/acme/project-{p}", f"{p}-feature-{k}", p,
                         rng.randint(1, len(versions)), rng.randint(1, n_db), "[]",
                         iso(base + e * 900), None, "", "", None, None, 0, "active"))
    ins("INSERT INTO environment (id, name, project_path, github_url, branch_name, project_id, "
        "version_id, database_id, module_ids, last_used_at, sh_url, notes, ticket_ids, "
        "ssh_host, ssh_user, pinned, status) VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", envs)
    n_env = len(envs)

    ins("INSERT INTO switch_log (environment_id, switched_at, flagged, ended_at, note, source, "
        "edited) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(rng.randint(1, n_env), iso(base + i * 1800), 0, iso(base + i * 1800 + 1500), None,
          "cli", 0) for i in range(400)])
    ins("INSERT INTO backup (name, note, env_name, db_name, database_id, file_path, size_bytes, "
        "created_at, odoo_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(f"backup-{i}", None, "prod", f"db_{(i % n_db) + 1:03d}", (i % n_db) + 1,
          f"/home/dev/backups/b{i}.zip", rng.randint(10 ** 6, 10 ** 9), iso(base + i * 86400),
          "17.0") for i in range(80)])

    n_repo = 100
    ins("INSERT INTO repository (id, name, path, origin_url, last_indexed_commit_sha, "
        "last_indexed_at, enabled) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(r, f"repo-{r}", f"/home/dev/src/repo-{r}", f"git@github.com:acme/repo-{r}.git",
          f"{rng.getrandbits(160):040x}", iso(base + r * 60), 1) for r in range(1, n_repo + 1)])

    n_skill = rows * 2 // 5
    n_know = rows - n_skill
    tags_of: dict[int, list[int]] = {r: [] for r in range(1, n_repo + 1)}
    know_of: dict[int, list[int]] = {r: [] for r in range(1, n_repo + 1)}

    def skill_rows():
        for i in range(1, n_skill + 1):
            repo = rng.randint(1, n_repo)
            tags_of[repo].append(i)
            yield (i, repo, f"{i * 2654435761 % (1 << 160):040x}", SKILL_TAGS[i % len(SKILL_TAGS)],
                   rng.randint(1, 50), rng.randint(1, 5000), iso(base + i * 37),
                   json.dumps([f"addons/mod_{i % 300}/models/m{j}.py" for j in range(3)]))

    def know_rows():
        for i in range(1, n_know + 1):
            repo = rng.randint(1, n_repo)
            know_of[repo].append(i)
            yield (i, repo, f"addons.mod_{i % 300}.models.Model{i}.method_{i % 17}",
                   SYMBOL_KINDS[i % len(SYMBOL_KINDS)], rng.randint(1, 200),
                   rng.randint(1, 3000), iso(base + i * 53),
                   json.dumps([f"addons/mod_{i % 300}/models/m{j}.py" for j in range(2)]))

    ins("INSERT INTO skill_tag (id, repository_id, commit_sha, tag, weight, raw_loc, "
        "committed_at, top_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", skill_rows())
    ins("INSERT INTO knowledge_index (id, repository_id, symbol, symbol_kind, commit_count, "
        "loc_authored, last_touched, top_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", know_rows())
    if id_lists:
        ins("UPDATE repository SET skill_tag_ids = ?, knowledge_index_ids = ? WHERE id = ?",
            [(json.dumps(tags_of[r]), json.dumps(know_of[r]), r) for r in range(1, n_repo + 1)])
    conn.execute("COMMIT")
    counts = {spec.name: conn.execute(f'SELECT count(*) FROM "{spec.name}"').fetchone()[0]
              for spec in ccsync.SPEC}
    conn.close()
    return counts


def table_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {spec.name: conn.execute(f'SELECT count(*) FROM "{spec.name}"').fetchone()[0]
            for spec in ccsync.SPEC}


##### Measurements ###############################################################

def stats(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "runs": len(samples)}


def repeat_sync(store, transport, repeat: int, change=None) -> dict:
    """``repeat`` timed sync_once runs; ``change(i)`` (cc's edit) runs untimed before each."""
    times, results = [], []
    for i in range(repeat):
        if change is not None:
            change(i)
        start = perf()
        result = ccsync.sync_once(store, transport)
        times.append(perf() - start)
        results.append(result.as_dict())
    out = stats(times)
    out["samples_s"] = times
    out["sent"] = [r["sent"] for r in results]
    out["received"] = [r["received"] for r in results]
    out["accepted"] = [r["accepted"] for r in results]
    return out


def one_row_editor(cc: sqlite3.Connection, rng: random.Random):
    """cc's own edit: bump one knowledge_index row through its own connection."""
    ids = [r[0] for r in cc.execute("SELECT id FROM knowledge_index")]

    def change(i: int) -> None:
        rid = rng.choice(ids)
        cc.execute("UPDATE knowledge_index SET commit_count = commit_count + 1, "
                   "last_touched = ? WHERE id = ?", (iso(time.time()), rid))
    return change


def run(args: argparse.Namespace, workdir: Path) -> dict:
    rng = random.Random(args.seed)
    lock = LockRecorder()
    lock.install()
    report: dict = {"rows": args.rows, "repeat": args.repeat, "id_lists": args.id_lists,
                    "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                    "platform": platform.platform()}
    try:
        path_a, path_b = workdir / "a.db", workdir / "b.db"
        log(f"building device A with {args.rows} code-index rows ...")
        start = perf()
        counts = build_cc_db(path_a, args.rows, rng, args.id_lists == "full")
        report["build_s"] = perf() - start
        report["table_rows"] = counts
        total = sum(counts.values())
        report["total_rows"] = total
        log(f"  {total} synced rows in {report['build_s']:.2f}s")

        server = ccsync.ServerStore.open(str(workdir / "server.db"))
        store_a = ccsync.open_store(str(path_a))
        lock.watch(store_a.conn, "a")
        transport_a = ccsync.LocalTransport(server, "a")
        cc_a = sqlite3.connect(str(path_a), isolation_level=None, timeout=CC_BUSY_TIMEOUT_S)

        log("A: prepare() (install capture, stamp every row) ...")
        with lock.in_phase("prepare_a"):
            start = perf()
            stamped = store_a.prepare()
            elapsed = perf() - start
        report["prepare_a"] = {"seconds": elapsed, "stamped": stamped,
                               "rows_per_s": stamped / elapsed if elapsed else None,
                               "lock": lock.summary("prepare_a")}
        log(f"  {elapsed:.2f}s, stamped {stamped}")

        log("A: first sync_once (push everything) ...")
        with lock.in_phase("push_a"):
            start = perf()
            result = ccsync.sync_once(store_a, transport_a)
            elapsed = perf() - start
        res = result.as_dict()
        report["first_sync_a"] = {"seconds": elapsed, "result": res,
                                  "rows_per_s": res["sent"] / elapsed if elapsed else None,
                                  "lock": lock.summary("push_a")}
        log(f"  {elapsed:.2f}s, sent {res['sent']}, accepted {res['accepted']}")
        report["server"] = server.stats()

        cc_b = sqlite3.connect(str(path_b), isolation_level=None, timeout=CC_BUSY_TIMEOUT_S)
        cc_b.executescript(SCHEMA_PATH.read_text())
        store_b = ccsync.open_store(str(path_b))
        lock.watch(store_b.conn, "b")
        transport_b = ccsync.LocalTransport(server, "b")
        log("B (empty): first sync_once (pull everything) ...")
        with lock.in_phase("pull_b"):
            start = perf()
            result = ccsync.sync_once(store_b, transport_b)
            elapsed = perf() - start
        res = result.as_dict()
        counts_b = table_counts(cc_b)
        report["first_sync_b"] = {"seconds": elapsed, "result": res,
                                  "rows_per_s": res["received"] / elapsed if elapsed else None,
                                  "lock": lock.summary("pull_b"),
                                  "pending_references": store_b.pending_references(),
                                  "table_rows": counts_b}
        log(f"  {elapsed:.2f}s, received {res['received']}, applied {res['applied']}")
        # What B should hold: everything except the secret/local settings A keeps.
        kept = sum(ccsync.setting_policy(name) is not None
                   for (name,) in cc_a.execute("SELECT name FROM setting"))
        expected = dict(counts, setting=counts["setting"] - kept)
        report["settings_kept_on_a"] = kept
        report["b_matches_a"] = {t: counts_b[t] == expected[t] for t in counts}

        log(f"A: no-change sync x{args.repeat} ...")
        with lock.in_phase("steady"):
            report["nochange_a"] = repeat_sync(store_a, transport_a, args.repeat)
            log(f"A: 1-row-change sync x{args.repeat} ...")
            report["onerow_a"] = repeat_sync(store_a, transport_a, args.repeat,
                                             one_row_editor(cc_a, rng))
            # B first takes A's 1-row edits (untimed), then the same two figures.
            catch_up = ccsync.sync_once(store_b, transport_b).as_dict()
            report["catch_up_b"] = {"received": catch_up["received"]}
            log(f"B: no-change sync x{args.repeat} ...")
            report["nochange_b"] = repeat_sync(store_b, transport_b, args.repeat)
            log(f"B: 1-row-change sync x{args.repeat} ...")
            report["onerow_b"] = repeat_sync(store_b, transport_b, args.repeat,
                                             one_row_editor(cc_b, rng))
        report["steady_lock"] = lock.summary("steady")

        first_a = report["first_sync_a"]["seconds"]
        first_b = report["first_sync_b"]["seconds"]
        report["ratios"] = {
            "nochange_a_vs_first_sync_a": report["nochange_a"]["median_s"] / first_a,
            "nochange_b_vs_first_sync_b": report["nochange_b"]["median_s"] / first_b,
            "onerow_a_vs_nochange_a": (report["onerow_a"]["median_s"]
                                       / report["nochange_a"]["median_s"]),
            "onerow_b_vs_nochange_b": (report["onerow_b"]["median_s"]
                                       / report["nochange_b"]["median_s"]),
        }
        report["db_bytes"] = {name: sum(p.stat().st_size for p in workdir.glob(f"{name}.db*"))
                              for name in ("a", "b", "server")}
        for conn in (store_a.conn, store_b.conn, server.conn, cc_a, cc_b):
            conn.close()
    finally:
        lock.uninstall()
    return report


##### Report ######################################################################

def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms"


def format_report(r: dict) -> list[str]:
    out = []
    add = out.append
    add(f"ccsync benchmark: {r['rows']} code-index rows, {r['total_rows']} synced rows total, "
        f"repeat {r['repeat']}, id lists: {r['id_lists']}")
    add(f"python {r['python']}, sqlite {r['sqlite']}, {r['platform']}")
    add("rows per table on A: " + ", ".join(f"{t}={n}" for t, n in r["table_rows"].items()))
    add(f"{'build A with plain sqlite3 (executemany)':<44} {r['build_s']:8.2f} s")
    add("")
    add("== first sync ==")
    p = r["prepare_a"]
    add(f"{'A  store.prepare() (stamp %d rows)' % p['stamped']:<44} {p['seconds']:8.2f} s"
        f"   {p['rows_per_s']:8.0f} rows/s")
    f = r["first_sync_a"]
    add(f"{'A  first sync_once (push %d rows)' % f['result']['sent']:<44} {f['seconds']:8.2f} s"
        f"   {f['rows_per_s']:8.0f} rows/s   (accepted {f['result']['accepted']}, "
        f"received {f['result']['received']})")
    b = r["first_sync_b"]
    add(f"{'B  first sync_once (pull %d rows)' % b['result']['received']:<44} "
        f"{b['seconds']:8.2f} s   {b['rows_per_s']:8.0f} rows/s   (applied "
        f"{b['result']['applied']}, rejected {b['result']['rejected'] or 0}, "
        f"waiting for parent {b['pending_references']})")
    mismatched = [t for t, ok in r["b_matches_a"].items() if not ok]
    add(f"B row counts equal A's (less the {r['settings_kept_on_a']} secret/local settings "
        "A keeps): " + ("yes, every table" if not mismatched else
                                     "no: " + ", ".join(
                                         f"{t} A={r['table_rows'][t]} B={b['table_rows'][t]}"
                                         for t in mismatched)))
    add(f"server: {r['server']['records']} records")
    add("")
    add(f"== steady state (median / min of {r['repeat']}) ==")
    for key, label in (("nochange_a", "A  no-change sync"), ("onerow_a", "A  1-row-change sync"),
                       ("nochange_b", "B  no-change sync"), ("onerow_b", "B  1-row-change sync")):
        s = r[key]
        add(f"{label:<22} median {ms(s['median_s'])}   min {ms(s['min_s'])}   "
            f"sent {s['sent']} received {s['received']}")
    add(f"(B caught up on A's {r['catch_up_b']['received']} 1-row edits, untimed, "
        "before its own runs)")
    add("")
    add(f"== lock hold: longest top-level write transaction on the device db "
        f"(cc busy timeout {CC_BUSY_TIMEOUT_S:.0f} s) ==")
    for key, label in (("prepare_a", "A prepare (first stamp)"),
                       ("first_sync_a", "A first sync (big push)"),
                       ("first_sync_b", "B first sync (big pull)"),
                       ("steady", "steady-state syncs")):
        lk = r[key]["lock"] if key != "steady" else r["steady_lock"]
        verdict = ("OVER the busy timeout: cc would fail with 'database is locked'"
                   if lk["max_ms"] > CC_BUSY_TIMEOUT_S * 1000 else
                   f"{lk['max_ms'] / (CC_BUSY_TIMEOUT_S * 10):.1f}% of the busy timeout")
        add(f"{label:<26} max {lk['max_ms']:9.1f} ms   p95 {lk['p95_ms']:8.1f} ms   "
            f"over {lk['transactions']} transactions   -> {verdict}")
    add("")
    add("== ratios ==")
    ra = r["ratios"]
    add(f"A no-change sync / A first sync:   {ra['nochange_a_vs_first_sync_a']:.2e}")
    add(f"B no-change sync / B first sync:   {ra['nochange_b_vs_first_sync_b']:.2e}")
    add(f"A 1-row sync / A no-change sync:   {ra['onerow_a_vs_nochange_a']:.2f}x")
    add(f"B 1-row sync / B no-change sync:   {ra['onerow_b_vs_nochange_b']:.2f}x")
    add("")
    add("db sizes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["db_bytes"].items()))
    add(f"total benchmark runtime: {r['runtime_s']:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000,
                        help="code-index rows (skill_tag + knowledge_index) on device A")
    parser.add_argument("--repeat", type=int, default=5, help="runs per steady-state figure")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the report goes to stderr)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the data")
    parser.add_argument("--id-lists", choices=("none", "full"), default="none",
                        help="fill repository.skill_tag_ids/knowledge_index_ids with every "
                             "child id ('full'), or leave them empty (default)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (prints path)")
    args = parser.parse_args(argv)
    if args.rows < 10 or args.repeat < 1:
        parser.error("--rows must be >= 10 and --repeat >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="ccsync-bench-"))
    began = perf()
    try:
        report = run(args, workdir)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["runtime_s"] = perf() - began
    lines = format_report(report)
    if args.json:
        print("\n".join(lines), file=sys.stderr)
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
