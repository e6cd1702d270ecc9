"""Shared code of the kill -9 and fault-proxy stress tests.

Used by tests/kill9_trials.py and tests/fault_proxy.py, whose long forms are
tests/stress_kill9.py and tests/stress_faults.py (``make stress``) and whose CI
forms are tests/test_kill9.py and tests/test_faults.py.

A :class:`World` is the real ``ccsync.py server`` process on 127.0.0.1 (port 0)
and two devices, each a HOME folder with a cc 4.0 database (tests/cc-schema.sql)
configured by writing ``~/.cc-cli/.env`` by hand (README, Setup step 3).  Rows
come from bench/bench_real.py's realistic mix.  Every command is the real CLI in
a subprocess, every wait has a deadline, and every process started is stopped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import json
import os
import random
import secrets
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import ccsync
from conftest import content
from e2e_helpers import COMMAND, REPO, Device, ServerProcess, clean_env, hand_env

sys.path.insert(0, str(REPO / "bench"))
from bench_real import fill_cc, note_text  # noqa: E402

CLI_TIMEOUT = 120           # no command of these tests may run longer (a hang fails)
QUIET_ROUNDS = 6            # syncs of every device until nothing moves, at most
SYNC_STATS = ("sent", "accepted", "superseded", "received", "applied", "reseeded")

# The CLI's client timeout (60 s) has no option or variable; this launcher runs
# the same main() with a shorter one, so a stalled connection fails in seconds.
_LAUNCHER = ("import sys, ccsync; "
             "ccsync.client_for.__kwdefaults__['timeout'] = float(sys.argv.pop(1)); "
             "sys.exit(ccsync.main(sys.argv[1:]))")


##### knobs ####################################################################

def in_parallel(run, items, workers: int) -> list:
    """``run(item)`` for every item, ``workers`` at a time; each outcome's
    ``line()`` is printed as the runs end, in order."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        outcomes = list(pool.map(run, items))
    for outcome in outcomes:
        print(outcome.line(), flush=True)
    return outcomes


def env_int(name: str, default: int) -> int:
    """An integer from the environment (``default`` when unset or empty)."""
    return int(os.environ.get(name) or default)


def pick_seed(variable: str, fixed: int | None = None) -> int:
    """``fixed`` (CI forms), else $variable (a replay), else a fresh one; printed."""
    seed = fixed if fixed is not None else env_int(variable, secrets.randbits(32))
    print(f"\n{variable}={seed}", flush=True)
    return seed


def failure_text() -> str:
    """The exception being handled, for a report: its last frames and message."""
    return "".join(traceback.format_exc(limit=-3))[-4000:]


##### a server and two devices ##################################################

class World:
    """The real server on its own data file, and devices ``a`` and ``b`` with their keys.

    Devices are registered in the server's data file before it starts (what
    ``ccsync register`` does on the server).
    """

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "server.db"
        store = ccsync.ServerStore.open(str(self.data))
        try:
            self.keys = {name: store.register(name) for name in ("a", "b")}
        finally:
            store.conn.close()
        self.a, self.b = Device(root, "a"), Device(root, "b")
        self.server: ServerProcess | None = None

    @property
    def devices(self) -> tuple[Device, Device]:
        return self.a, self.b

    def start_server(self) -> str:
        """Start a server on the data file (a new port each time) and point devices at it."""
        self.server = ServerProcess(self.data, self.root / "server_home")
        url = self.server.start()
        self.point_at(url)
        return url

    def point_at(self, url: str) -> None:
        """Write each device's ~/.cc-cli/.env: this server URL and the device's key."""
        for dev in self.devices:
            dev.env_file.write_text(hand_env(url, self.keys[dev.name]))

    def stop_server(self) -> None:
        """SIGTERM: the server must exit 0 without a traceback in its log."""
        code = self.server.stop()
        assert code == 0 and "Traceback" not in self.server.log, (code, self.server.log)

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
        for dev in self.devices:
            dev.close()


##### cc's data ##################################################################

def fill(dev: Device, rows: int, rng: random.Random, *, settings: bool = True) -> int:
    """About ``rows`` rows of bench_real's mix, natural keys tagged with the device
    name; returns the rows written.

    Without ``settings`` the device keeps none (bench_real's setting names are
    shared, so two devices would merge them: later edit wins)."""
    counts = fill_cc(dev.conn, rows, rng, tag=f"{dev.name}-")
    if not settings:
        counts["setting"] = 0
        dev.conn.execute("DELETE FROM setting")
    return sum(counts.values())


def add_rows(dev: Device, count: int, rng: random.Random, tag: str) -> int:
    """cc's later work: a project with one environment, then ``count`` switch_log and
    knowledge_index rows (half each).  Returns the rows written."""
    sql = dev.conn.execute
    sql("BEGIN")
    project = sql("INSERT INTO project (name, main_branch, environment_ids) VALUES (?, 'main', "
                  "'[]')", (f"{dev.name}-{tag}",)).lastrowid
    env = sql("INSERT INTO environment (name, project_id, branch_name, notes, status) "
              "VALUES ('env', ?, ?, ?, 'active')", (project, tag, note_text(rng))).lastrowid
    sql("UPDATE project SET environment_ids = ? WHERE id = ?", (f"[{env}]", project))
    repo = sql("SELECT min(id) FROM repository").fetchone()[0]
    start = _dt.datetime(2025, 1, 1)
    dev.conn.executemany(
        "INSERT INTO switch_log (environment_id, switched_at, note, source) "
        "VALUES (?, ?, ?, 'manual')",
        [(env, (start + _dt.timedelta(minutes=i)).isoformat(), note_text(rng))
         for i in range(count // 2)])
    dev.conn.executemany(
        "INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, commit_count) "
        "VALUES (?, ?, 'method', ?)",
        [(repo, f"{dev.name}.{tag}.sym{i}", rng.randint(1, 99))
         for i in range(count - count // 2)])
    sql("COMMIT")
    return count + 2


def canonical(conn: sqlite3.Connection) -> tuple[dict, list]:
    """Every synced row by its natural key, comparable across devices and over time.

    Returns ({table: {natural key: values}}, problems).  Integer references
    become the parent's natural key, local columns and ids are left out (as in
    conftest.content()).  Problems: a natural key held twice, a reference to
    a row that is not there.
    """
    problems: list = []
    keys: dict[str, dict[int, tuple]] = {}

    def ref(table: str, rowid):
        if rowid is None:
            return None
        if rowid not in keys[table]:
            problems.append(("dangling", table, rowid))
        return keys[table].get(rowid, ("dangling", rowid))

    tables = {}
    for spec in ccsync.SPEC:
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{spec.name}")')]
        rows = [dict(zip(cols, r)) for r in conn.execute(f'SELECT * FROM "{spec.name}"')]
        keys[spec.name] = {}
        for row in rows:
            keys[spec.name][row["id"]] = tuple(
                ref(spec.refs[c], row[c]) if c in spec.refs else row[c] for c in spec.key)
        tables[spec.name] = rows
    out = {}
    for spec in ccsync.SPEC:
        out[spec.name] = rows = {}
        for row in tables[spec.name]:
            if spec.name == "setting" and ccsync.setting_policy(row["name"]):
                continue
            natural = keys[spec.name][row["id"]]
            if natural in rows:
                problems.append(("duplicate", spec.name, natural))
            rows[natural] = _values(spec, row, ref)
    return out, problems


def _values(spec, row: dict, ref) -> dict:
    skip = ("id", "sync_id", "synced_at", "workspace_id", *spec.local)
    values = {}
    for col, value in row.items():
        if col in skip:
            continue
        if col in spec.refs:
            value = ref(spec.refs[col], value)
        elif col in spec.list_refs and (parsed := ccsync.parse_id_list(value)) is not None:
            value = sorted(ref(spec.list_refs[col], i) for i in parsed[0])
        values[col] = value
    return values


def sync_ids(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, sync_id) of every synced row that has one."""
    return {(spec.name, sid) for spec in ccsync.SPEC
            for (sid,) in conn.execute(f'SELECT sync_id FROM "{spec.name}" '
                                       "WHERE sync_id IS NOT NULL")}


##### checks #####################################################################

def integrity(path: Path) -> None:
    """``PRAGMA integrity_check`` says ok."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        result = conn.execute("PRAGMA integrity_check").fetchall()
    assert result == [("ok",)], (path, result)


def cli(dev: Device, *args: str, client_timeout: float | None = None,
        timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """The CLI on ``dev``; ``client_timeout`` replaces its 60 s network timeout."""
    command = COMMAND if client_timeout is None else \
        [sys.executable, "-c", _LAUNCHER, str(client_timeout)]
    return subprocess.run([*command, *args], env=clean_env(dev.home), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def sync(dev: Device, command: str = "sync") -> dict:
    """A sync that must succeed: exit 0, no traceback, nothing refused either way."""
    proc = cli(dev, command, "--json")
    where = (dev.name, command, proc.returncode, proc.stdout[-2000:], proc.stderr)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, where
    result = json.loads(proc.stdout)
    assert result["refused"] == {} and result["rejected"] == {}, where
    return result


def error_line(proc: subprocess.CompletedProcess, url: str | None = None) -> str:
    """A clean failure: exit 1, stdout empty (or, under --json, the error as one
    JSON object), stderr one ``ccsync: error:`` line (naming ``url``, the server the
    device used) and at most the ``hint:`` line the CLI adds, no traceback.
    Returns the error line."""
    lines = proc.stderr.splitlines()
    where = (proc.args[-2:], proc.returncode, proc.stdout[-500:], proc.stderr[-3000:])
    assert proc.returncode == 1, where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    if "--json" in proc.args:
        assert f"ccsync: error: {json.loads(proc.stdout)['error']}" == lines[0], where
    else:
        assert proc.stdout == "", where
    assert 1 <= len(lines) <= 2 and lines[0].startswith("ccsync: error: "), where
    assert url is None or url in lines[0], (url, where)
    assert all(line.startswith("hint: ") for line in lines[1:]), where
    return lines[0]


def converge(world: World) -> int:
    """Sync a, then b, round after round until one moves nothing; returns the rounds."""
    for rounds in range(1, QUIET_ROUNDS + 1):
        results = [sync(dev) for dev in world.devices]
        if not any(r[stat] for r in results for stat in SYNC_STATS if stat != "received"):
            return rounds
    raise AssertionError(f"still moving rows after {QUIET_ROUNDS} rounds: {results}")


def assert_converged(world: World, *written: dict) -> None:
    """Both devices hold the same data: every row written (``written``: canonical
    tables of what each device wrote) with its values, nothing else, nothing
    twice, no reference to a missing row; every database passes integrity_check
    (the server is stopped for its own)."""
    wanted = {spec.name: {} for spec in ccsync.SPEC}
    for tables in written:
        for table, rows in tables.items():
            wanted[table].update(rows)
    for dev in world.devices:
        assert_holds(dev, wanted)
    assert content(world.a.conn) == content(world.b.conn)
    for dev in world.devices:
        integrity(dev.db)
    world.stop_server()
    integrity(world.data)


def assert_holds(dev: Device, wanted: dict) -> None:
    """``dev`` holds exactly the ``wanted`` rows (canonical tables), each once."""
    tables, problems = canonical(dev.conn)
    assert not problems, (dev.name, problems[:5])
    for table, rows in tables.items():
        missing = [k for k in wanted[table] if k not in rows]
        extra = [k for k in rows if k not in wanted[table]]
        changed = [k for k, v in wanted[table].items() if k in rows and rows[k] != v]
        where = (dev.name, table, len(missing), missing[:2], len(extra), extra[:2], changed[:2])
        assert not (missing or extra or changed), where
        count = dev.value(f'SELECT count(*) FROM "{table}"')
        if table != "setting":                # (local settings are not in rows)
            assert count == len(rows), (dev.name, table, count, len(rows))
