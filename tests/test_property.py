"""Property tests: random edits on several devices always converge.

Each example builds its own server store and device databases (cc's real
schema) in a fresh temporary directory, runs a random program of cc edits and
syncs, then syncs every device a couple of times and checks that:

* every device holds the same synced content (``conftest.content``),
* no row references a row that does not exist,
* nothing is left pending (dirty cells or rows waiting for a parent),
* neither the server nor any device refused a record at any point,
* secret settings never reached the server.

Determinism: the hybrid logical clock that ccsync's triggers read
(``julianday('now')``) is replaced on cc's connection by a fake clock the test
advances, device ids are fixed ('dev-a', 'dev-b', ...) and ccsync's random
sync_ids come from a seeded generator, so a failing example replays exactly.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import tempfile
import time
import types
import uuid
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ccsync
from conftest import Device, content, make_cc_db

NAMES = "abcd"
JD_EPOCH = 2440587.5            # julianday of 1970-01-01T00:00:00Z
DAY_MS = 86400000

# Small pools so independent creation of the same natural key is frequent.
VERSIONS = ["17.0", "18.0", "saas-17.2"]
PROJECTS = ["acme", "globex", "initech"]
SETTINGS = ["default_version", "theme", "github_pat", "ide"]   # + one secret, one local
ENV_NAMES = ["main", "staging"]
SWITCH_TIMES = ["2024-05-01T09:00:00", "2024-05-01T10:00:00"]
VALUES = ["x", "y", "z", None]

# table -> columns a step may edit (value drawn from VALUES unless a reference).
UPDATABLE = {
    "version": ["port", "branch"],
    "project": ["main_branch", "home_repo"],
    "setting": ["value"],
    "environment": ["notes", "branch_name", "version_id"],
    "switch_log": ["note", "ended_at"],
}
DELETABLE = ["version", "project", "setting", "environment", "switch_log"]


##### Simulation harness ######################################################

# Databases live on tmpfs when there is one (hundreds of examples, each with
# several SQLite files), and every device starts as a copy of one fresh cc
# database instead of running the schema script again.
TMP_ROOT = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
_TEMPLATE: list = []


def fresh_cc_db(path: Path) -> None:
    """Put an empty cc 4.0 database at ``path``."""
    if not _TEMPLATE:
        holder = tempfile.TemporaryDirectory(dir=TMP_ROOT)
        template = Path(holder.name) / "template.db"
        make_cc_db(template).close()
        _TEMPLATE[:] = [holder, template]
    shutil.copyfile(_TEMPLATE[1], path)


class Sim:
    """A server store and ``n`` devices in one temporary directory, with a fake clock."""

    def __init__(self, n: int = 3, skews: list[int] | None = None):
        self.tmp = tempfile.TemporaryDirectory(dir=TMP_ROOT)
        root = Path(self.tmp.name)
        # An hour in the past: the server refuses clocks > 5 min ahead of its own.
        self.now_ms = int(time.time() * 1000) - 3600 * 1000
        self._uuid_rng = random.Random(0)
        self._patch = mock.patch.object(ccsync, "uuid", types.SimpleNamespace(
            UUID=uuid.UUID, uuid5=uuid.uuid5,
            uuid4=lambda: uuid.UUID(int=self._uuid_rng.getrandbits(128), version=4)))
        self._patch.start()
        self.server = ccsync.ServerStore.open(str(root / "server.db"))
        self.devices: list[Device] = []
        self.results: list[tuple[str, str, ccsync.SyncResult]] = []
        for i in range(n):
            name = NAMES[i]
            skew = (skews or [0] * n)[i]
            fresh_cc_db(root / f"{name}.db")
            dev = Device(root / f"{name}.db", self.server, name)
            for conn in (dev.cc, dev.store.conn):
                conn.execute("PRAGMA synchronous = OFF")
            dev.cc.create_function("julianday", 1, self._julianday(skew))
            dev.store.clock = lambda skew=skew: (self.now_ms + skew) / 1000
            dev.store.prepare()
            with ccsync.transaction(dev.store.conn):
                dev.store.set_meta("device_id", f"dev-{name}")
            self.devices.append(dev)

    def _julianday(self, skew: int):
        def julianday(arg):
            assert arg == "now", arg      # ccsync's triggers only ask for 'now'
            return JD_EPOCH + (self.now_ms + skew + 0.5) / DAY_MS
        return julianday

    def close(self) -> None:
        for dev in self.devices:
            dev.store.conn.close()
            dev.cc.close()
        self.server.conn.close()
        self._patch.stop()
        self.tmp.cleanup()

    def sync(self, i: int, mode: str = "sync") -> ccsync.SyncResult:
        dev = self.devices[i]
        result = {"sync": dev.sync, "push": dev.push, "pull": dev.pull}[mode]()
        self.results.append((dev.name, mode, result))
        assert not result.refused, (dev.name, mode, result.as_dict())
        assert not result.pulled.refused, (dev.name, mode, result.as_dict())
        return result

    def settle(self, rounds: int = 2) -> None:
        for _ in range(rounds):
            for i in range(len(self.devices)):
                self.sync(i)


@contextlib.contextmanager
def simulation(n: int = 3, skews: list[int] | None = None):
    sim = Sim(n, skews)
    try:
        yield sim
    finally:
        sim.close()


def pick(conn: sqlite3.Connection, table: str, index: int) -> int | None:
    """The id of the index-th row (modulo) of ``table``, or None if it is empty."""
    ids = [r[0] for r in conn.execute(f'SELECT id FROM "{table}" ORDER BY id')]
    return ids[index % len(ids)] if ids else None


def delete_row(conn: sqlite3.Connection, table: str, rid: int) -> None:
    """Delete a row the way cc would: children first, so nothing dangles locally."""
    if table == "project":
        for (env,) in conn.execute("SELECT id FROM environment WHERE project_id = ?",
                                   (rid,)).fetchall():
            delete_row(conn, "environment", env)
    elif table == "environment":
        conn.execute("DELETE FROM switch_log WHERE environment_id = ?", (rid,))
    elif table == "version":
        conn.execute("UPDATE environment SET version_id = NULL WHERE version_id = ?", (rid,))
    conn.execute(f'DELETE FROM "{table}" WHERE id = ?', (rid,))


def run_step(sim: Sim, step: tuple) -> None:
    """Apply one program step (see ``steps``)."""
    kind, *args = step
    if kind == "tick":
        sim.now_ms += args[0]
        return
    if kind == "sync":
        sim.sync(args[0], args[1])
        return
    dev = sim.devices[args[0]]
    cc = dev.cc
    if kind == "version":
        _, name, port = args
        cc.execute("INSERT OR IGNORE INTO version (name, path, port) VALUES (?, ?, ?)",
                   (name, f"/home/{dev.name}/odoo/{name}", port))
    elif kind == "project":
        _, name, branch = args
        cc.execute("INSERT OR IGNORE INTO project (name, main_branch) VALUES (?, ?)",
                   (name, branch))
    elif kind == "setting":
        _, name, value = args
        cc.execute("INSERT OR IGNORE INTO setting (name, value) VALUES (?, ?)", (name, value))
    elif kind == "environment":
        _, name, p_index, v_index, branch = args
        project = pick(cc, "project", p_index)
        if project is None:
            return
        version = None if v_index is None else pick(cc, "version", v_index)
        cc.execute("INSERT OR IGNORE INTO environment (name, project_id, version_id, "
                   "branch_name, project_path) VALUES (?, ?, ?, ?, ?)",
                   (name, project, version, branch, f"/home/{dev.name}/src/{name}"))
    elif kind == "switch_log":
        _, e_index, when = args
        env = pick(cc, "environment", e_index)
        if env is None or cc.execute("SELECT 1 FROM switch_log WHERE environment_id = ? "
                                     "AND switched_at = ?", (env, when)).fetchone():
            return
        cc.execute("INSERT INTO switch_log (environment_id, switched_at, source) "
                   "VALUES (?, ?, 'cli')", (env, when))
    elif kind == "update":
        _, table, col, index, value = args
        rid = pick(cc, table, index)
        if rid is None:
            return
        if col == "version_id":
            value = None if value is None else pick(cc, "version", value)
        cc.execute(f'UPDATE "{table}" SET "{col}" = ? WHERE id = ?', (value, rid))
    elif kind == "delete":
        _, table, index = args
        rid = pick(cc, table, index)
        if rid is not None:
            delete_row(cc, table, rid)
    else:  # pragma: no cover
        raise AssertionError(step)


def dangling(snapshot: dict) -> list:
    """References (plain or list) to rows that do not exist, and missing required parents."""
    bad = []
    for table, rows in snapshot.items():
        for sid, rec in rows.items():
            for col, value in rec.items():
                values = value if isinstance(value, list) else [value]
                if any(isinstance(v, str) and v.startswith("dangling:") for v in values):
                    bad.append((table, sid, col, value))
            if table == "environment" and rec.get("project_id") is None:
                bad.append((table, sid, "project_id", None))
    return bad


def check_converged(sim: Sim) -> dict:
    """All devices hold the same content, nothing dangles, nothing is pending."""
    snaps = [dev.snapshot() for dev in sim.devices]
    for dev, snap in zip(sim.devices, snaps):
        assert dangling(snap) == [], (dev.name, dangling(snap))
    for dev, snap in zip(sim.devices[1:], snaps[1:]):
        assert snap == snaps[0], f"{dev.name} differs from {sim.devices[0].name}"
    for dev in sim.devices:
        pending = {t: c for t, c in dev.store.pending().items() if any(c.values())}
        assert pending == {}, (dev.name, pending)
        assert dev.store.pending_references() == 0, dev.name
        assert dev.store.refused() == [], (dev.name, dev.store.refused())
    payloads = " ".join(r[0] for r in sim.server.conn.execute("SELECT payload FROM change"))
    assert "github_pat" not in payloads
    return snaps[0]


##### Strategies ##############################################################

def steps(n: int):
    dev = st.integers(0, n - 1)
    index = st.integers(0, 5)
    value = st.sampled_from(VALUES)
    update = st.sampled_from([(t, c) for t, cols in UPDATABLE.items() for c in cols]).flatmap(
        lambda tc: st.tuples(st.just("update"), dev, st.just(tc[0]), st.just(tc[1]), index,
                             index if tc[1] == "version_id" else value))
    return st.one_of(
        st.tuples(st.just("version"), dev, st.sampled_from(VERSIONS), value),
        st.tuples(st.just("project"), dev, st.sampled_from(PROJECTS), value),
        st.tuples(st.just("setting"), dev, st.sampled_from(SETTINGS), value),
        st.tuples(st.just("environment"), dev, st.sampled_from(ENV_NAMES), index,
                  st.none() | index, value),
        st.tuples(st.just("switch_log"), dev, index, st.sampled_from(SWITCH_TIMES)),
        update,
        st.tuples(st.just("delete"), dev, st.sampled_from(DELETABLE), index),
        st.tuples(st.just("sync"), dev, st.sampled_from(["sync", "push", "pull"])),
        st.tuples(st.just("tick"), st.sampled_from([1, 1000, 60000])),
    )


@st.composite
def programs(draw):
    n = draw(st.sampled_from([3, 3, 4]))
    skews = draw(st.lists(st.sampled_from([0, 0, 0, 2, -2, 2000]), min_size=n, max_size=n))
    program = draw(st.lists(steps(n), max_size=25))
    return n, skews, program


##### Properties ##############################################################

# CCSYNC_PROPERTY_EXAMPLES=5000 for a longer hunt; CI runs the default.
EXAMPLES = int(os.environ.get("CCSYNC_PROPERTY_EXAMPLES", "200"))

@settings(max_examples=EXAMPLES, deadline=None)
@given(programs())
def test_random_programs_converge(case):
    n, skews, program = case
    with simulation(n, skews) as sim:
        for step in program:
            run_step(sim, step)
        sim.settle(2)
        check_converged(sim)


# A fixed scenario of conflicting offline edits: three devices share a base,
# then each edits the same cells, deletes what another edits, and creates the
# same natural keys independently.
CONFLICTING_EDITS = [
    (0, "UPDATE version SET port = '8070' WHERE name = '17.0'"),                  # 0
    (1, "UPDATE version SET port = '8071' WHERE name = '17.0'"),                  # 1
    (2, "UPDATE version SET branch = 'fix' WHERE name = '17.0'"),                 # 2
    (0, "DELETE FROM switch_log WHERE environment_id = "                          # 3
        "(SELECT id FROM environment WHERE name = 'main'); "
        "DELETE FROM environment WHERE name = 'main'"),
    (1, "UPDATE environment SET notes = 'keep me' WHERE name = 'main'"),          # 4
    (2, "UPDATE project SET main_branch = 'develop' WHERE name = 'acme'"),        # 5
    (1, "INSERT INTO project (name, main_branch) VALUES ('globex', 'b-branch')"), # 6
    (2, "INSERT INTO project (name, main_branch) VALUES ('globex', 'c-branch')"), # 7
    (0, "UPDATE setting SET value = 'dark' WHERE name = 'theme'"),                # 8
    (2, "DELETE FROM setting WHERE name = 'theme'"),                              # 9
    (1, "INSERT INTO version (name, path, port) VALUES ('18.0', '/b', '9000')"),  # 10
    (2, "INSERT INTO version (name, path, branch) VALUES ('18.0', '/c', 'c18')"), # 11
]
SYNC_OPS = [(i, mode) for i in range(3) for mode in ("push", "pull")]


def run_conflict_scenario(edit_order, sync_order, step_ms: int = 1000) -> dict:
    with simulation(3) as sim:
        a = sim.devices[0].cc
        a.execute("INSERT INTO version (name, path, port) VALUES ('17.0', '/a/17.0', '8069')")
        a.execute("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
        a.execute("INSERT INTO environment (name, project_id, version_id, project_path) "
                  "VALUES ('main', 1, 1, '/a/acme')")
        a.execute("INSERT INTO switch_log (environment_id, switched_at) "
                  "VALUES (1, '2024-05-01T09:00:00')")
        a.execute("INSERT INTO setting (name, value) VALUES ('theme', 'light')")
        sim.settle(2)
        for k in edit_order:
            sim.now_ms += step_ms   # 1000: clocks follow edit_order; 0 or 1: HLC ties
            device, script = CONFLICTING_EDITS[k]
            for query in script.split("; "):
                sim.devices[device].cc.execute(query)
        for device, mode in sync_order:
            sim.sync(device, mode)
        sim.settle(2)
        return check_converged(sim)


@settings(max_examples=max(40, EXAMPLES // 5), deadline=None)
@given(edit_order=st.permutations(range(len(CONFLICTING_EDITS))),
       sync_order=st.permutations(SYNC_OPS), step_ms=st.sampled_from([1000, 1, 0]))
def test_sync_order_does_not_matter(edit_order, sync_order, step_ms):
    reference = run_conflict_scenario(edit_order, SYNC_OPS, step_ms)
    assert run_conflict_scenario(edit_order, sync_order, step_ms) == reference
    if step_ms != 1000:
        return
    # And the canonical result is the one the merge rules promise.
    later = lambda x, y: edit_order.index(x) > edit_order.index(y)   # noqa: E731
    by_name = lambda table: {r["name"]: r for r in reference[table].values()}  # noqa: E731
    versions, projects = by_name("version"), by_name("project")
    assert versions["17.0"]["port"] == ("8070" if later(0, 1) else "8071")
    assert versions["17.0"]["branch"] == "fix"
    assert (versions["18.0"]["port"], versions["18.0"]["branch"]) == (
        (None, "c18") if later(11, 10) else ("9000", None))
    assert projects["acme"]["main_branch"] == "develop"
    assert projects["globex"]["main_branch"] == ("c-branch" if later(7, 6) else "b-branch")
    envs = by_name("environment")
    if later(3, 4):
        assert envs == {} and reference["switch_log"] == {}
    else:
        assert envs["main"]["notes"] == "keep me"
    themes = by_name("setting")
    assert themes.get("theme", {}).get("value") == (None if later(9, 8) else "dark")
    assert ("theme" in themes) == later(8, 9)
