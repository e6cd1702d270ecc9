#!/usr/bin/env python3
"""Stress: is cc ever locked out of its database while ccsync pushes or pulls?

While the real ``ccsync sync`` (a CLI subprocess, talking to a real
``ccsync server`` subprocess on 127.0.0.1) moves ``--rows`` rows, a separate
process writes to the same database the way cc does: ``sqlite3.connect(db,
timeout=5)`` with Python's default transaction handling, one committed write
every 2-5 ms (switch_log inserts, environment notes updates, setting upserts).

For each journal mode (``delete``: the rollback journal a database built from
tests/cc-schema.sql has; ``wal``: what cc's own connections switch to) there
are two phases:

1. push: device A holds ``--rows`` rows written by plain sqlite3 (mostly
   switch_log rows with notes and knowledge_index rows, plus versions,
   settings, databases, projects, environments, repositories, backups); the
   writer runs on A's database during A's first ``ccsync sync``;
2. pull: a fresh device B (a few environments of its own; ``ccsync stamp``
   installs capture first, so every write the writer makes carries its edit
   time) runs its first ``ccsync sync``, pulling all of it, while the writer
   runs on B's database, writing to the environments the pull brings in too
   and to the settings A's writer wrote.

Every write's latency is recorded.  A write is *lost* when, after its phase,
the database the writer used does not hold it (every switch_log it inserted,
the last note and setting value it wrote), or when, after one more sync of
both devices, either device lacks it (a later phase's write to the same
setting supersedes an earlier one).  Latencies are reported, never judged;
the exit code is 1 when the writer met ``database is locked`` (or any other
error), when a write was lost, or when a sync failed.

    python3 bench/stress_lockout.py [--rows 100000] [--modes delete,wal] [--json FILE]

Run it with the interpreter that has pycryptodomex (``make stress`` uses .venv).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import multiprocessing
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from e2e_helpers import CCSYNC, Device, ServerProcess, clean_env  # noqa: E402

MODES = ("delete", "wal")
CC_TIMEOUT_S = 5.0                  # cc's busy timeout
PAUSE_S = (0.002, 0.005)            # cc's pause between two writes
LOCKED = "database is locked"
# What the writer does, with its share of the writes.
OPS = {"switch_log": 2, "note": 1, "setting": 1}
SQL = {
    "switch_log": "INSERT INTO switch_log (environment_id, switched_at, flagged, source) "
                  "VALUES (?, ?, 0, 'auto')",
    "note": "UPDATE environment SET notes = ? WHERE id = ?",
    "setting": "INSERT INTO setting (name, value) VALUES (?, ?) "
               "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
}
# Settings both writers upsert (A's already exist on A; B's arrive on B by the pull).
WRITER_SETTINGS = ("theme", "editor", "default_version", "pref.option_1", "pref.option_2")
WRITER_ENVS = 8                     # environments the writer picks from
REFRESH_S = 0.25                    # seconds between two fresh picks of environments
WRITER_START_TIMEOUT = 30.0
WRITER_STOP_TIMEOUT = 20.0          # one write can wait up to cc's 5 s busy timeout
ENV_KEYS_SQL = ("SELECT e.id, p.name, e.name FROM environment e "
                "JOIN project p ON p.id = e.project_id ORDER BY e.id")
perf = time.monotonic               # one system-wide clock: comparable across processes


def log(*parts: object) -> None:
    """Progress on stderr, so stdout stays the report."""
    print(*parts, file=sys.stderr, flush=True)


def iso_us(moment: _dt.datetime) -> str:
    """cc's timestamp format: ISO 8601 with microseconds."""
    return moment.isoformat(timespec="microseconds")


##### The writer: cc's writes, in their own process ############################
# Runs in a child process (multiprocessing, spawn); talks to the parent only
# through two Events and one JSON file.  No ccsync here.

def writer_process(cfg: dict, ready, stop) -> None:
    """Write like cc until ``stop`` is set; every attempt and every committed fact to cfg['out'].

    ``ready`` is set after the first write attempt, so the sync starts against a
    writer that is already writing.
    """
    rng = random.Random(cfg["seed"])
    conn = sqlite3.connect(cfg["db"], timeout=CC_TIMEOUT_S)    # Python's implicit BEGIN
    if cfg["wal"]:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    writes: list[list] = []             # [start, seconds, op, error or None]
    facts: dict[tuple, object] = {}     # item -> value it must have (None: must exist)
    envs = _pick_envs(conn, rng, cfg["envs"], writes)
    if not envs:
        raise RuntimeError(f"no environment to write to in {cfg['db']}")
    deadline = perf() + cfg["max_seconds"]
    refresh = perf() + REFRESH_S
    n = 0
    while not stop.is_set() and perf() < deadline:
        n += 1
        if perf() >= refresh:           # rows a pull brought in become cc's targets too
            envs = _pick_envs(conn, rng, cfg["envs"], writes) or envs
            refresh = perf() + REFRESH_S
        op = rng.choices(list(OPS), weights=list(OPS.values()))[0]
        params, item, value = _next_write(op, n, cfg["tag"], envs, rng)
        start = perf()
        error = None
        try:
            conn.execute(SQL[op], params)
            conn.commit()
        except sqlite3.Error as exc:
            error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
        writes.append([start, perf() - start, op, error])
        if error is None:
            facts.pop(item, None)       # re-insert: the latest value comes last
            facts[item] = value
        if n == 1:
            ready.set()
        stop.wait(rng.uniform(*PAUSE_S))
    conn.close()
    out = {"writes": writes, "facts": [[list(k), v] for k, v in facts.items()],
           "timed_out": not stop.is_set()}
    Path(cfg["out"]).write_text(json.dumps(out))


def _pick_envs(conn: sqlite3.Connection, rng: random.Random, count: int,
               writes: list[list]) -> list:
    """A sample of the environments there are now (cc reads too: a failed read is logged)."""
    start = perf()
    try:
        envs = list(conn.execute(ENV_KEYS_SQL))
    except sqlite3.Error as exc:
        writes.append([start, perf() - start, "read", f"{type(exc).__name__}: {exc}"])
        return []
    writes.append([start, perf() - start, "read", None])
    return rng.sample(envs, min(count, len(envs)))


def _next_write(op: str, n: int, tag: str, envs: list, rng: random.Random):
    """(params, item, value) for write number ``n``: what the SQL gets, what must stay."""
    env_id, project, env = rng.choice(envs)
    if op == "switch_log":
        at = iso_us(_dt.datetime.now())
        return (env_id, at), ("switch_log", project, env, at), None
    if op == "note":
        note = f"{tag} note {n}: " + "x" * rng.randint(30, 150)
        return (note, env_id), ("note", project, env), note
    name = rng.choice(WRITER_SETTINGS)
    value = f"{tag}-{n}"
    return (name, value), ("setting", name), value


class Writer:
    """The writer process: ``start()`` returns once it writes, ``stop()`` returns its results."""

    def __init__(self, db: Path, out: Path, *, wal: bool, tag: str, seed: int,
                 max_seconds: float):
        self.cfg = {"db": str(db), "out": str(out), "wal": wal, "tag": tag, "seed": seed,
                    "envs": WRITER_ENVS, "max_seconds": max_seconds}
        self.ctx = multiprocessing.get_context("spawn")
        self.ready, self.stopping = self.ctx.Event(), self.ctx.Event()
        self.proc = None

    def start(self) -> None:
        self.proc = self.ctx.Process(target=writer_process, name=f"cc-writer-{self.cfg['tag']}",
                                     args=(self.cfg, self.ready, self.stopping), daemon=True)
        self.proc.start()
        deadline = perf() + WRITER_START_TIMEOUT
        while not self.ready.wait(0.05):
            if not self.proc.is_alive() or perf() > deadline:
                self.kill()
                raise RuntimeError(f"the writer did not start (exit {self.proc.exitcode})")

    def stop(self) -> dict:
        self.stopping.set()
        self.proc.join(WRITER_STOP_TIMEOUT)
        if self.proc.is_alive():
            self.kill()
            raise RuntimeError(f"the writer did not stop within {WRITER_STOP_TIMEOUT} s")
        if self.proc.exitcode != 0:
            raise RuntimeError(f"the writer failed (exit {self.proc.exitcode})")
        result = json.loads(Path(self.cfg["out"]).read_text())
        result["facts"] = {tuple(k): v for k, v in result["facts"]}
        return result

    def kill(self) -> None:
        """Idempotent: end the process if it still runs (bounded)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(WRITER_STOP_TIMEOUT)


##### Building the device databases ###########################################
# Plain sqlite3 on the schema, before ccsync ever opens the file.

SETTINGS_A = [("editor", "code"), ("default_version", "17.0"), ("theme", "dark"),
              ("github_pat", "ghp_notarealtoken"), ("ide", "pycharm"),
              ("backup.dir", "/home/dev/backups")] + \
             [(f"pref.option_{i}", str(i * 7)) for i in range(24)]
VERSIONS = ("15.0", "16.0", "17.0", "18.0", "saas-17.2", "saas-17.4", "saas-18.1",
            "saas-18.2", "saas-18.3", "master")
WORDS = ("fix", "review", "invoice", "migration", "customer", "call", "stock", "report",
         "module", "upgrade", "test", "deploy", "ticket", "meeting", "debug", "view", "pos")


def _filler(rng: random.Random, size: int = 8192) -> str:
    words: list[str] = []
    while sum(map(len, words)) + len(words) < size:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def _table_sizes(rows: int) -> dict[str, int]:
    """A cc-like mix summing to ``rows``: mostly switch_log and knowledge_index."""
    sizes = {"version": len(VERSIONS), "setting": len(SETTINGS_A),
             "database": max(5, rows // 2000), "project": max(4, rows // 1000),
             "repository": max(3, rows // 2000), "backup": max(2, rows // 2000)}
    sizes["environment"] = 2 * sizes["project"]
    rest = rows - sum(sizes.values())
    if rest < 20:
        raise ValueError(f"--rows {rows} is too few for the mix (at least "
                         f"{rows - rest + 20})")
    sizes["switch_log"] = rest * 3 // 5
    sizes["knowledge_index"] = rest - sizes["switch_log"]
    return sizes


def fill_device_a(conn: sqlite3.Connection, rows: int, rng: random.Random) -> dict[str, int]:
    """Fill an empty cc database (autocommit ``conn``) with ``rows`` rows; returns the sizes."""
    n = _table_sizes(rows)
    base = _dt.datetime(2024, 1, 1, 8, 0, 0)
    text = _filler(rng)
    ins = conn.executemany
    conn.execute("BEGIN")
    ins("INSERT INTO version (id, name, path, port, pyenv_virtualenv, branch) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(i + 1, v, f"/home/dev/src/odoo-{v}", str(8069 + i), f"odoo-{v}", v)
         for i, v in enumerate(VERSIONS)])
    ins("INSERT INTO setting (name, value) VALUES (?, ?)", SETTINGS_A)
    ins("INSERT INTO database (id, name, last_update, in_pg, size_bytes, is_odoo) "
        "VALUES (?, ?, ?, 1, ?, 1)",
        [(i, f"db_{i:04d}", iso_us(base + _dt.timedelta(hours=i)), rng.randint(10**7, 10**10))
         for i in range(1, n["database"] + 1)])
    ins("INSERT INTO project (id, name, is_virtual, no_auto_archive, home_repo, main_branch, "
        "environment_ids) VALUES (?, ?, 0, 0, ?, 'main', ?)",
        [(p, f"project-{p:04d}", f"git@github.com:acme/project-{p}.git",
          json.dumps([2 * p - 1, 2 * p])) for p in range(1, n["project"] + 1)])
    ins("INSERT INTO environment (id, name, project_path, branch_name, project_id, version_id, "
        "database_id, module_ids, notes, pinned, status) VALUES (?, ?, ?, ?, ?, ?, ?, '[]', '', "
        "0, 'active')",
        [(e, "prod" if e % 2 else "dev", f"/home/dev/envs/{e}", f"branch-{e}", (e + 1) // 2,
          rng.randint(1, len(VERSIONS)), rng.randint(1, n["database"]))
         for e in range(1, n["environment"] + 1)])
    ins("INSERT INTO backup (name, env_name, db_name, database_id, file_path, size_bytes, "
        "created_at, odoo_version) VALUES (?, 'prod', ?, ?, ?, ?, ?, '17.0')",
        [(f"backup-{i}", f"db_{(i % n['database']) + 1:04d}", (i % n["database"]) + 1,
          f"/home/dev/backups/b{i}.zip", rng.randint(10**6, 10**9),
          iso_us(base + _dt.timedelta(days=i))) for i in range(n["backup"])])
    ins("INSERT INTO repository (id, name, path, origin_url, enabled) VALUES (?, ?, ?, ?, 1)",
        [(r, f"repo-{r}", f"/home/dev/src/repo-{r}", f"git@github.com:acme/repo-{r}.git")
         for r in range(1, n["repository"] + 1)])

    def switch_logs():
        for i in range(n["switch_log"]):
            at = base + _dt.timedelta(seconds=600 * i, microseconds=rng.randrange(10**6))
            size, start = rng.randint(50, 200), rng.randrange(len(text) - 200)
            yield (rng.randint(1, n["environment"]), iso_us(at), int(rng.random() < 0.05),
                   iso_us(at + _dt.timedelta(minutes=rng.randint(5, 120))),
                   text[start:start + size], rng.choice(("auto", "manual")), int(i % 9 == 0))

    def knowledge():
        for i in range(n["knowledge_index"]):
            yield (rng.randint(1, n["repository"]), f"addons.mod_{i % 300}.Model{i}.method",
                   ("class", "method", "field")[i % 3], rng.randint(1, 200),
                   rng.randint(1, 3000), iso_us(base + _dt.timedelta(minutes=i)),
                   json.dumps([f"addons/mod_{i % 300}/models/m{j}.py" for j in range(2)]))

    ins("INSERT INTO switch_log (environment_id, switched_at, flagged, ended_at, note, source, "
        "edited) VALUES (?, ?, ?, ?, ?, ?, ?)", switch_logs())
    ins("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, commit_count, "
        "loc_authored, last_touched, top_files) VALUES (?, ?, ?, ?, ?, ?, ?)", knowledge())
    conn.execute("COMMIT")
    return n


def seed_device_b(conn: sqlite3.Connection, projects: int = 2) -> None:
    """A fresh device's own few projects and environments (names A does not use)."""
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO project (id, name, environment_ids) VALUES (?, ?, ?)",
                     [(p, f"b-project-{p}", json.dumps([2 * p - 1, 2 * p]))
                      for p in range(1, projects + 1)])
    conn.executemany("INSERT INTO environment (id, name, project_id, notes, status) "
                     "VALUES (?, ?, ?, '', 'active')",
                     [(e, f"b-env-{e}", (e + 1) // 2) for e in range(1, 2 * projects + 1)])
    conn.execute("COMMIT")


def set_journal_mode(conn: sqlite3.Connection, mode: str) -> None:
    got = conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
    if got != mode:
        raise RuntimeError(f"journal_mode is {got}, not {mode}")


##### Checking what the writer wrote ##########################################

def db_state(db: Path) -> dict[tuple, object]:
    """The database as writer items: every switch_log, every note, every setting."""
    conn = sqlite3.connect(str(db), timeout=CC_TIMEOUT_S)
    try:
        state: dict[tuple, object] = {
            ("switch_log", p, e, at): None for p, e, at in conn.execute(
                "SELECT p.name, e.name, s.switched_at FROM switch_log s "
                "JOIN environment e ON e.id = s.environment_id "
                "JOIN project p ON p.id = e.project_id")}
        state.update({("note", p, e): notes for p, e, notes in conn.execute(
            "SELECT p.name, e.name, e.notes FROM environment e "
            "JOIN project p ON p.id = e.project_id")})
        state.update({("setting", name): value
                      for name, value in conn.execute("SELECT name, value FROM setting")})
        return state
    finally:
        conn.close()


_ABSENT = "<absent>"


def missing(facts: dict[tuple, object], state: dict[tuple, object]) -> dict[tuple, object]:
    """Items of ``facts`` the state lacks or holds with another value -> what it holds."""
    return {item: state.get(item, _ABSENT) for item, value in facts.items()
            if item not in state or state[item] != value}


def journal_mode(db: Path) -> str:
    conn = sqlite3.connect(str(db), timeout=CC_TIMEOUT_S)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()


##### Running the phases ##########################################################

def run_ccsync(home: Path, *args: object, timeout: float) -> dict:
    """``ccsync.py ARGS --json`` as a subprocess with HOME=home; exit code, output, seconds."""
    start = perf()
    try:
        proc = subprocess.run([sys.executable, str(CCSYNC), *map(str, args), "--json"],
                              env=clean_env(home), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = None, exc.stdout or "", f"timed out after {timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
    end = perf()
    try:
        result = json.loads(out) if rc == 0 else None
    except ValueError:
        result = None
    return {"command": [str(a) for a in args], "rc": rc, "start": start, "end": end,
            "seconds": end - start, "result": result, "stderr": err[-2000:]}


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)] if ordered else 0.0


def summarize_writes(writes: list[list], start: float, end: float) -> dict:
    """Counts and latencies of every write attempt; ``during_sync``: commits inside
    [start, end].  Errors count the writer's occasional reads too."""
    attempts = [w for w in writes if w[2] != "read"]
    latencies = sorted(w[1] for w in attempts)
    errors = [w[3] for w in writes if w[3] is not None]
    done = [s + d for s, d, _, err in attempts if err is None and start <= s + d <= end]
    return {
        "writes": len(attempts),
        "committed": sum(1 for w in attempts if w[3] is None),
        "during_sync": len(done),
        # The first part of the window is ccsync's interpreter starting up.
        "during_second_half": sum(1 for t in done if t >= (start + end) / 2),
        "lock_errors": sum(LOCKED in e for e in errors),
        "other_errors": sum(LOCKED not in e for e in errors),
        "error_kinds": sorted(set(errors)),
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
        "max_ms": (latencies[-1] if latencies else 0.0) * 1000,
        "by_op": {op: sum(1 for w in writes if w[2] == op) for op in (*OPS, "read")},
    }


def run_phase(mode: str, phase: str, dev: Device, workdir: Path, *, seed: int,
              sync_timeout: float) -> dict:
    """The writer on ``dev``'s database during ``dev``'s ``ccsync sync``; what it saw."""
    writer = Writer(dev.db, workdir / f"writer-{phase}.json", wal=mode == "wal",
                    tag=f"{mode}-{phase}", seed=seed, max_seconds=sync_timeout + 60)
    try:
        writer.start()
        sync = run_ccsync(dev.home, "sync", timeout=sync_timeout)
        result = writer.stop()
    finally:
        writer.kill()
    lost = missing(result["facts"], db_state(dev.db))
    return {
        "mode": mode, "phase": phase, "device": dev.name,
        "sync": {k: sync[k] for k in ("rc", "seconds", "result", "stderr")},
        "writer": summarize_writes(result["writes"], sync["start"], sync["end"]),
        "writer_timed_out": result["timed_out"],
        "journal_mode": journal_mode(dev.db),
        "facts": result["facts"],
        "lost_local": lost,
        "samples": [[round(s - sync["start"], 4), round(d * 1000, 3), op, err]
                    for s, d, op, err in result["writes"]],
    }


def _device(workdir: Path, name: str, mode: str, fill) -> tuple[Device, object]:
    """A Device (e2e_helpers) whose database ``fill(conn)`` built, in ``mode``, closed;
    with what ``fill`` returned."""
    dev = Device(workdir, name)
    try:
        filled = fill(dev.conn)
        set_journal_mode(dev.conn, mode)
    finally:
        dev.close()
    return dev, filled


def run_mode(mode: str, rows: int, workdir: Path, *, seed: int = 1,
             sync_timeout: float | None = None) -> dict:
    """Both phases in one journal mode, in ``workdir``: server, A (push), B (pull), checks."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    sync_timeout = sync_timeout or default_sync_timeout(rows)
    rng = random.Random(seed)
    server = ServerProcess(workdir / "server.db", workdir / "server_home")
    server.start()
    extra: list[dict] = []
    try:
        log(f"[{mode}] device A: {rows} rows by plain sqlite3 ...")
        a, sizes = _device(workdir, "a", mode, lambda conn: fill_device_a(conn, rows, rng))
        a.setup(server.url, server.register("a"))
        log(f"[{mode}] push phase: writer on A during A's first sync ...")
        push = run_phase(mode, "push", a, workdir, seed=seed + 1, sync_timeout=sync_timeout)
        log(f"[{mode}]   sync {push['sync']['seconds']:.1f} s, rc {push['sync']['rc']}")
        extra.append(run_ccsync(a.home, "sync", timeout=sync_timeout))     # the writer's rest

        b, _ = _device(workdir, "b", mode, seed_device_b)
        b.setup(server.url, server.register("b"))
        # Capture on B before the writer starts: a write made before ccsync is
        # enabled carries no edit time and by design loses to A's (README).
        extra.append(run_ccsync(b.home, "stamp", timeout=sync_timeout))
        log(f"[{mode}] pull phase: writer on B during B's first sync ...")
        pull = run_phase(mode, "pull", b, workdir, seed=seed + 2, sync_timeout=sync_timeout)
        log(f"[{mode}]   sync {pull['sync']['seconds']:.1f} s, rc {pull['sync']['rc']}")
        extra.append(run_ccsync(b.home, "sync", timeout=sync_timeout))
        extra.append(run_ccsync(a.home, "sync", timeout=sync_timeout))
        final = {"a": db_state(a.db), "b": db_state(b.db)}
    finally:
        server.stop()
    phases = [push, pull]
    _attribute_losses(phases, final)
    return {"mode": mode, "rows": rows, "table_rows": sizes, "phases": phases,
            "follow_ups": [{k: s[k] for k in ("command", "rc", "seconds", "stderr")}
                           for s in extra]}


def _attribute_losses(phases: list[dict], final: dict[str, dict]) -> None:
    """Check every phase's surviving facts on both devices; set each phase's ``lost``."""
    owner: dict[tuple, tuple[object, dict]] = {}
    for phase in phases:                   # a later phase's write supersedes an earlier one
        for item, value in phase["facts"].items():
            owner[item] = (value, phase)
    for phase in phases:
        phase["lost_final"] = {}
        mine = {item: v for item, (v, p) in owner.items() if p is phase}
        for name, state in final.items():
            phase["lost_final"][name] = missing(mine, state)
        items = set(phase["lost_local"]).union(*phase["lost_final"].values())
        phase["lost"] = len(items)


def default_sync_timeout(rows: int) -> float:
    """A generous bound for one sync of ``rows`` rows (seconds)."""
    return 120.0 + rows * 0.02


##### Report ######################################################################

def failures(report: dict) -> list[str]:
    """Why the stress run failed (empty: it passed).  Latency never counts."""
    out = []
    for run in report["runs"]:
        for p in run["phases"]:
            where, w = f"{p['mode']}/{p['phase']}", p["writer"]
            if w["lock_errors"]:
                out.append(f"{where}: {w['lock_errors']} '{LOCKED}' error(s) in the writer")
            if w["other_errors"]:
                kinds = [e for e in w["error_kinds"] if LOCKED not in e]
                out.append(f"{where}: {w['other_errors']} other writer error(s): {kinds[:3]}")
            if p["lost"]:
                out.append(f"{where}: {p['lost']} write(s) lost")
            if p["sync"]["rc"] != 0:
                out.append(f"{where}: ccsync sync exited {p['sync']['rc']}: "
                           f"{p['sync']['stderr'].strip()[-300:]}")
            if p["journal_mode"] != p["mode"]:
                out.append(f"{where}: journal mode became {p['journal_mode']}")
        for s in run["follow_ups"]:
            if s["rc"] != 0:
                out.append(f"{run['mode']}: `ccsync {' '.join(s['command'])}` exited "
                           f"{s['rc']}: {s['stderr'].strip()[-300:]}")
    return out


def format_table(report: dict) -> list[str]:
    """One line per mode and phase; ``rows``: what the sync sent (push) or received (pull)."""
    head = (f"{'mode':<7}{'phase':<6}{'rows':>8}{'sync s':>9}{'rc':>4}{'writes':>8}"
            f"{'in sync':>9}{'lock err':>10}{'errors':>8}{'lost':>6}"
            f"{'p50 ms':>9}{'p99 ms':>10}{'max ms':>10}")
    lines = [head, "-" * len(head)]
    for run in report["runs"]:
        for p in run["phases"]:
            w, res = p["writer"], p["sync"]["result"] or {}
            moved = res.get("sent" if p["phase"] == "push" else "received", "?")
            lines.append(
                f"{p['mode']:<7}{p['phase']:<6}{moved:>8}{p['sync']['seconds']:>9.2f}"
                f"{str(p['sync']['rc']):>4}{w['writes']:>8}{w['during_sync']:>9}"
                f"{w['lock_errors']:>10}{w['other_errors']:>8}{p['lost']:>6}"
                f"{w['p50_ms']:>9.1f}{w['p99_ms']:>10.1f}{w['max_ms']:>10.1f}")
    return lines


def loss_lines(phase: dict, examples: int = 3) -> list[str]:
    """A few of one phase's lost writes, where each was missed, wanted and found."""
    out = []
    where = [(f"on {phase['device']} after the phase", phase["lost_local"])] + \
            [(f"on {dev} after the follow-up syncs", lost)
             for dev, lost in phase["lost_final"].items()]
    for label, lost in where:
        for item, got in list(lost.items())[:examples]:
            want = "(present)" if item[0] == "switch_log" else phase["facts"].get(item)
            out.append(f"  {phase['mode']}/{phase['phase']} lost {label}: {list(item)} "
                       f"wanted {want!r}, found {got!r}")
        if len(lost) > examples:
            out.append(f"  ... and {len(lost) - examples} more {label}")
    return out


def _jsonable(report: dict) -> dict:
    """The report with item tuples turned into lists."""
    def items(d: dict) -> list:
        return [[list(k), v] for k, v in d.items()]
    out = dict(report, runs=[])
    for run in report["runs"]:
        phases = []
        for p in run["phases"]:
            q = dict(p, facts=len(p["facts"]), lost_local=items(p["lost_local"]),
                     lost_final={d: items(v) for d, v in p["lost_final"].items()})
            phases.append(q)
        out["runs"].append(dict(run, phases=phases))
    return out


def run(rows: int, modes: list[str], *, seed: int = 1, sync_timeout: float | None = None,
        keep: bool = False) -> dict:
    """Every mode in its own temporary folder (removed unless ``keep``); the whole report."""
    report = {"rows": rows, "modes": modes, "python": platform.python_version(),
              "sqlite": sqlite3.sqlite_version, "platform": platform.platform(), "runs": []}
    began = perf()
    for mode in modes:
        workdir = Path(tempfile.mkdtemp(prefix=f"ccsync-stress-{mode}-"))
        try:
            report["runs"].append(run_mode(mode, rows, workdir, seed=seed,
                                           sync_timeout=sync_timeout))
        finally:
            if keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    report["runtime_s"] = perf() - began
    report["failures"] = failures(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows on device A")
    parser.add_argument("--modes", default="delete,wal",
                        help="journal modes, comma-separated: delete, wal (default: both)")
    parser.add_argument("--json", metavar="FILE", help="also write the report (with every "
                        "write's offset and latency) as JSON to FILE")
    parser.add_argument("--seed", type=int, default=1, help="random seed for data and writer")
    parser.add_argument("--sync-timeout", type=float, metavar="SECONDS",
                        help="bound on each sync (default: 120 + rows/50)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    try:
        _table_sizes(args.rows)
    except ValueError as exc:
        parser.error(str(exc))

    report = run(args.rows, modes, seed=args.seed, sync_timeout=args.sync_timeout,
                 keep=args.keep)
    print(f"ccsync lockout stress: {args.rows} rows on A; python {report['python']}, "
          f"sqlite {report['sqlite']}, {report['platform']}")
    print("writer: like cc, a committed write every 2-5 ms; 'in sync' = writes committed "
          "while the sync ran; latencies over every attempt")
    print("\n".join(format_table(report)))
    lines = [line for run in report["runs"] for p in run["phases"] for line in loss_lines(p)]
    if lines:
        print("lost writes:")
        print("\n".join(lines))
    for reason in report["failures"]:
        print(f"FAIL {reason}")
    print(f"total runtime {report['runtime_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(report), indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
