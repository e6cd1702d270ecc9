"""Model-based programs for ccsync, and the oracle that judges them.

A *program* is generated deterministically from an integer seed
(``random.Random(seed)``, not hypothesis, so a seed is all it takes to replay
one): 3-4 devices on cc 4.0 databases, each with a clock skew from
{-120 s, 0, 0, +120 s}, and 20-40 steps drawn from

* cc's own write forms (tests/../shared cc-writes.md): ORM create (INSERT of
  every field) followed by an ORM write (``UPDATE t SET <every field> WHERE
  id = ?``, unchanged fields included), setting upserts (the theme picker
  writes three settings in a row), ``INSERT OR IGNORE``, cascading deletes as
  cc does them (environment -> its switch_logs first; project -> its
  environments with their switch_logs; ``version.delete`` leaves
  ``environment.version_id`` pointing at the deleted id), ``cc switch``
  (switch_log with ``source = 'auto'``), punch-outs (switch_log with no
  environment), manual span edits, the indexer's skill_tag ``executemany``
  upsert and knowledge_index re-indexing, plain updates from small value
  pools, "stale" ORM writes (cc reads a record, a sync lands, cc writes every
  field back), renames onto pool names (a subset of programs);
* sync / push / pull on a device (one device often stays offline for a long
  stretch), clock ticks (1 ms, 1 s, 60 s);
* a database copied byte for byte onto a new device mid-run (bookkeeping
  included: ccsync re-identifies it by its path fingerprint);
* schema upgrades: a device starts on an older cc schema (switch_log without
  ended_at/note/source/edited, or project without home_repo) and a later step
  runs cc's ``ALTER TABLE ... ADD COLUMN`` (forced before the end if the
  program did not); until that device's next sync no trigger names the new
  columns, so the model treats edits of them as made with capture off;
* capture off: ``store.remove_triggers()`` (``stamp --remove-triggers``), or in
  a small subset ``store.remove()`` (``stamp --remove``), with cc editing on;
  the next sync re-installs capture.

The MODEL
---------
Rows are *logical rows*, identified by natural key with references resolved
to the parent's natural key: ``('version', name)``, ``('setting', name)``,
``('project', name)``, ``('repository', origin_url)``, ``('environment',
<project key>, name)``, ``('switch_log', <environment key> | None,
switched_at)``, ``('skill_tag', <repository key>, sha, tag)``,
``('knowledge_index', <repository key>, symbol, kind)``.  Values are compared
in the same resolved form (a reference is the parent's key, or
``('dangling', id)``).

Causality is a vector clock per device.  Every cc operation increments its
device's own entry; the operation's events carry a copy.  A push merges the
device's clock into the server's, a pull merges the server's into the
device's (sync = push then pull; a copied device starts with its source's
clock).  An operation's events come from diffing the device's logical view
just before and just after the operation, which is exactly what ccsync's
triggers capture: a row that appears is a *create* writing every column the
device's schema has (NULLs included); a row that disappears is a *delete*; a
row whose raw column values changed is an *edit* of exactly those columns (an
ORM write that re-writes unchanged fields edits nothing; ``version.delete``
leaving ``environment.version_id`` at a deleted id edits nothing either).
Renames are not modelled as events: the old key, the new key, and everything
keyed under them (children, and cells referring to them) are *tainted* and
skipped by checks 3 and 4.  Punch-outs are remembered by switched_at.

The ORACLE (pure: ``oracle(model, final)``), after every device synced twice:

1. content: all devices hold the same synced content (``conftest.content``;
   dangling markers are compared as NULL here and reported by check 2);
   nothing pending, nothing refused (sync results and ``store.refused()``),
   nothing held, no secret setting on the server;
2. references: nothing points at a missing row, environment.project_id is
   never NULL, a switch_log without environment is a punch-out cc wrote;
3. no resurrection: a row whose causally maximal events are all deletes is
   absent, unless a live row needs it as its required parent (environment ->
   project, switch_log -> environment, skill_tag/knowledge_index ->
   repository); a row whose maximal events include no delete is present;
   a row the model never saw is a *phantom*;
4. latest edit per column: for a present row, each synced cell equals the
   value of its causally maximal write (one of them when concurrent ones are
   maximal); a nullable reference whose target is absent reads NULL.
   Device-local columns, ids, sync_id, synced_at and local/secret settings
   are skipped.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sqlite3
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import ccsync
import test_property
from conftest import Device, content
from test_property import Sim

# A cheap scrypt cost: the key, not its derivation, is what the programs exercise.
E2E_VAULT = ccsync.Vault.derive("model programs' passphrase", b"model-salt-01234", n=2 ** 10)

##### Pools ###################################################################

SKEWS = [-120000, 0, 0, 120000]
TICKS = [1, 1000, 60000]
VERSIONS = ["17.0", "18.0", "saas-17.2"]
PROJECTS = ["acme", "globex", "initech"]
ENV_NAMES = ["main", "staging"]
SETTINGS = ["default_version", "theme", "theme.accent", "github_pat", "ide"]
THEME = ["theme", "theme.accent", "theme.font"]
SECRET_VALUE = "ghp_secret_0123456789"
SWITCH_TIMES = ["2024-05-01T09:00:00.000000", "2024-05-01T10:30:00.250000",
                "2024-05-02T08:15:00.000001"]
PUNCH_TIMES = ["2024-05-01T12:00:00.000000", "2024-05-01T18:00:00.500000"]
ORIGINS = ["git@github.com:acme/app.git", "git@github.com:globex/lib.git"]
SHAS = ["c0ffee1", "deadbe2"]
TAGS = ["python", "sql", "js"]
SYMBOLS = [("Model.write", "method"), ("sync_once", "function"), ("Store", "class")]
VALUES = ["x", "y", "z", None]
TOP_FILES = [None, "a.py", "b.py"]
NAMES = "abcdefgh"

# Older cc schemas: table -> the columns it lacked (added later by ALTER TABLE).
OLD_SCHEMAS = {
    "switch_log": [("ended_at", "TEXT"), ("note", "TEXT"), ("source", "TEXT"),
                   ("edited", "BOOLEAN")],
    "project": [("home_repo", "TEXT")],
}

TABLES = ["version", "setting", "project", "repository", "environment", "switch_log",
          "skill_tag", "knowledge_index"]
SKIP_COLS = {"id", "sync_id", "synced_at", "workspace_id"}
# Natural key columns (compared through the key, not as cells).
KEY_COLS = {t: set(ccsync.SPEC_BY_NAME[t].key) for t in TABLES}
# Required parent: child table -> parent table (the parent key sits at key[1]).
REQUIRED_PARENT = {"environment": "project", "switch_log": "environment",
                   "skill_tag": "repository", "knowledge_index": "repository"}

# table -> (column, value pool) a plain update may write.
UPDATABLE = {
    "version": [("port", ["8069", "8070", None]), ("branch", VALUES),
                ("pyenv_virtualenv", VALUES)],
    "project": [("main_branch", VALUES), ("home_repo", VALUES), ("is_virtual", [0, 1])],
    "setting": [("value", VALUES)],
    "environment": [("notes", VALUES), ("branch_name", VALUES), ("status", VALUES),
                    ("version_id", "ref")],
    "switch_log": [("note", VALUES), ("ended_at", ["2024-05-01T11:00:00.000000", None]),
                   ("flagged", [0, 1])],
    "repository": [("name", ["app", "lib"]), ("enabled", [0, 1]),
                   ("last_indexed_commit_sha", SHAS)],
    "skill_tag": [("weight", [1, 2, 3]), ("top_files", TOP_FILES)],
    "knowledge_index": [("top_files", TOP_FILES), ("loc_authored", [10, 20])],
}


##### Program generation ######################################################

@dataclass
class Program:
    seed: int
    n: int
    skews: list
    old: dict                     # device index -> [tables on an older schema]
    steps: list
    features: set = field(default_factory=set)


def generate(seed: int, renames: bool | None = None, removes: bool | None = None,
             resets: bool | None = None) -> Program:
    """The program of ``seed`` (renames/removes/resets: None = as the seed
    draws it).  A reset (the server's reset-store: every device re-seeds
    the new store from what it holds) is drawn apart, from a generator of
    its own, so the programs of every seed are otherwise the ones they were
    before resets were added (the found seeds replay as they were found)."""
    rng = random.Random(seed)
    n = rng.choice([3, 3, 4])
    skews = [rng.choice(SKEWS) for _ in range(n)]
    draw_renames = rng.random() < 0.25
    draw_removes = rng.random() < 0.08
    renames = draw_renames if renames is None else renames
    removes = draw_removes if removes is None else removes
    features = set()
    old = {}
    if rng.random() < 0.3:
        d = rng.randrange(n)
        old[d] = rng.sample(sorted(OLD_SCHEMAS), rng.choice([1, 2]))
        features.add("old-schema")
    migrated: set = set()
    devices = n
    offline = None
    nsteps = rng.randint(16, 28)
    if rng.random() < 0.6:
        start = rng.randrange(nsteps)
        offline = (rng.randrange(n), start, start + rng.randint(8, 30))
    steps: list = []
    if rng.random() < 0.6:                 # a shared base, so edits meet
        steps += [("project", 0, "acme", "master"), ("version", 0, "17.0", "8069"),
                  ("environment", 0, 0, "main", 0, "x"), ("switch", 0, 0, 0),
                  ("setting", 0, "theme", "light"), ("repository", 0, 0),
                  ("skill_tags", 0, 0, [(0, 0, 1, None)]),
                  ("sync", 0, "sync")] + [("sync", i, "sync") for i in range(1, n)]
    kinds = ["version", "project", "setting", "theme", "ignore", "environment", "environment",
             "switch", "switch", "punch", "span", "update", "update", "update", "stale",
             "delete", "delete", "delete", "repository", "skill_tags", "reindex",
             "sync", "sync", "sync", "sync", "sync", "push", "pull", "tick", "tick",
             "copy", "capture_off"]
    if renames:
        kinds += ["rename", "rename"]
        features.add("renames")
    if old:
        kinds += ["migrate"]
    for k in range(nsteps):
        kind = rng.choice(kinds)
        d = rng.randrange(devices)
        ix = rng.randrange(6)
        if kind in ("sync", "push", "pull"):
            live = [i for i in range(devices)
                    if not (offline and offline[0] == i and offline[1] <= k < offline[2])]
            steps.append(("sync", rng.choice(live), {"push": "push", "pull": "pull"}.get(
                kind, "sync")))
        elif kind == "tick":
            steps.append(("tick", rng.choice(TICKS)))
        elif kind == "version":
            steps.append(("version", d, rng.choice(VERSIONS), rng.choice(["8069", "8070"])))
        elif kind == "project":
            steps.append(("project", d, rng.choice(PROJECTS), rng.choice(VALUES)))
        elif kind == "setting":
            name = rng.choice(SETTINGS)
            steps.append(("setting", d, name, SECRET_VALUE if name == "github_pat"
                          else rng.choice(VALUES)))
        elif kind == "theme":
            steps.append(("theme", d, [rng.choice(["dark", "light"]), rng.choice(VALUES),
                                       rng.choice(VALUES)]))
        elif kind == "ignore":
            table = rng.choice(["version", "project", "setting"])
            pool = {"version": VERSIONS, "project": PROJECTS, "setting": SETTINGS[:3]}[table]
            steps.append(("ignore", d, table, rng.choice(pool), rng.choice(VALUES)))
        elif kind == "environment":
            steps.append(("environment", d, ix, rng.choice(ENV_NAMES),
                          rng.choice([None, ix, ix + 1]), rng.choice(VALUES)))
        elif kind == "switch":
            steps.append(("switch", d, ix, rng.randrange(len(SWITCH_TIMES))))
        elif kind == "punch":
            steps.append(("punch", d, rng.randrange(len(PUNCH_TIMES))))
        elif kind == "span":
            steps.append(("span", d, ix, rng.choice(["2024-05-01T11:00:00.000000", None]),
                          rng.choice(VALUES)))
        elif kind == "update":
            table = rng.choice(sorted(UPDATABLE))
            col, pool = rng.choice(UPDATABLE[table])
            value = rng.randrange(6) if pool == "ref" else rng.choice(pool)
            steps.append(("update", d, table, col, ix, value, rng.choice(["plain", "orm"])))
        elif kind == "stale":
            table = rng.choice(["version", "project", "environment", "switch_log", "setting"])
            col, pool = rng.choice(UPDATABLE[table])
            value = rng.randrange(6) if pool == "ref" else rng.choice(pool)
            steps.append(("stale", d, table, col, ix, value))
        elif kind == "delete":
            table = rng.choice(["version", "project", "project", "environment", "environment",
                                "setting", "switch_log", "repository", "skill_tag"])
            steps.append(("delete", d, table, ix))
        elif kind == "repository":
            steps.append(("repository", d, rng.randrange(len(ORIGINS))))
        elif kind == "skill_tags":
            rows = [(rng.randrange(len(SHAS)), rng.randrange(len(TAGS)), rng.randint(1, 3),
                     rng.choice(TOP_FILES)) for _ in range(rng.randint(1, 4))]
            steps.append(("skill_tags", d, ix, rows))
        elif kind == "reindex":
            steps.append(("reindex", d, ix, rng.sample(range(len(SYMBOLS)), rng.randint(1, 3))))
        elif kind == "rename":
            table = rng.choice(["version", "project"])
            pool = VERSIONS if table == "version" else PROJECTS
            steps.append(("rename", d, table, ix, rng.choice(pool)))
        elif kind == "migrate":
            todo = [x for x in old if x not in migrated and x < devices]
            if todo:
                migrated.add(todo[0])
                steps.append(("migrate", todo[0]))
        elif kind == "copy":
            if devices < n + 1:
                steps.append(("copy", d, rng.choice(SKEWS)))
                devices += 1
                features.add("copy")
        elif kind == "capture_off":
            how = "remove" if removes and rng.random() < 0.5 else "remove_triggers"
            features.add("store.remove" if how == "remove" else "remove_triggers")
            steps.append(("capture_off", d, how))
    apart = random.Random(f"reset {seed}")
    if resets if resets is not None else apart.random() < 0.2:
        # Half of them move every device to another server (a new file, which
        # numbers its records afresh) instead.
        kind = "move" if random.Random(f"move {seed}").random() < 0.5 else "reset"
        steps.insert(apart.randint(len(steps) // 3, len(steps)), (kind,))
        features.add(kind)
    return Program(seed, n, skews, old, steps, features)


##### The model ###############################################################

def dominates(a: dict, b: dict) -> bool:
    """Vector clock a >= b everywhere and a != b."""
    return all(a.get(k, 0) >= v for k, v in b.items()) and a != b


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = max(out.get(k, 0), v)
    return out


@dataclass
class Event:
    kind: str                     # create / edit / delete
    dev: str
    vc: dict
    cols: dict                    # column -> resolved value (create, edit)
    step: int


@dataclass
class Model:
    rows: dict = field(default_factory=dict)       # key -> [Event]
    vc: dict = field(default_factory=dict)         # device name -> vector clock
    server_vc: dict = field(default_factory=dict)
    punch_times: set = field(default_factory=set)
    # (device, parent table, id): references cc itself left at a deleted id
    # (version.delete), or wrote that way (a stale ORM write of a deleted id).
    cc_dangling: set = field(default_factory=set)
    tainted: set = field(default_factory=set)
    capture_off: set = field(default_factory=set)       # devices without triggers now
    # device -> [(key, event)] made while its capture was off: ccsync finds them
    # at that device's next prepare() and times them then (re-stamped by found()).
    deferred: dict = field(default_factory=dict)
    # device -> {(table, column)} cc added since that device's last prepare():
    # no trigger names them yet, so edits of them are found by diff, like the above.
    uncovered: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)      # what happened, for --verbose
    # Devices that have not re-seeded the store since the server's reset: what
    # their synced state holds reaches it with their next sync or pull (a push
    # alone sends only their new edits, which a vector clock cannot tell
    # apart: nothing).  ``synced``: device -> what its synced state holds (its
    # own edits up to its last push, and what it pulled), which a re-seed sends.
    reseed_due: set = field(default_factory=set)
    synced: dict = field(default_factory=dict)

    def tick(self, dev: str) -> dict:
        clock = self.vc.setdefault(dev, {})
        clock[dev] = clock.get(dev, 0) + 1
        return dict(clock)

    def found(self, dev: str, view: dict) -> None:
        """prepare() on ``dev`` re-installs capture and diffs: what cc did with
        capture off is an edit timed *now* (README, capture off), so those events
        take the device's clock at this sync, in their order.  This matters for a
        copy made meanwhile: the copy finds the same differences on its own, and
        its events no longer causally follow the source's, which the source only
        times later (they are concurrent, as ccsync's clocks see them).

        Edits of a column cc added since the last prepare are found the same
        way; a diff sees where they ended, not how: one that left the column
        empty again (as ``ADD COLUMN`` made it) is no edit.  ``view`` is the
        device's logical view just before this prepare."""
        self.capture_off.discard(dev)
        self.uncovered.pop(dev, None)
        fresh: dict = {}
        for key, event in self.deferred.pop(dev, []):
            if event.kind == "uncovered":
                event.kind = "edit"
                now = view.get(key, {}).get("val", {})
                for col in [c for c in event.cols if now.get(c) is None]:
                    del event.cols[col]
                    self.notes.append(f"{dev}: {fmt_key(key)}.{col} ends empty as cc added "
                                      f"it: no edit")
                if not event.cols:
                    self.rows[key].remove(event)
                    continue
            if id(event.vc) not in fresh:
                fresh[id(event.vc)] = self.tick(dev)
            event.vc = fresh[id(event.vc)]

    def copy_deferred(self, src: str, new: str) -> None:
        """A byte copy made while ``src`` had edits not captured yet (capture
        off, or columns cc added): the copy finds the same differences at its
        own first sync."""
        shared: dict = {}
        for key, event in self.deferred.get(src, []):
            vc = shared.setdefault(id(event.vc), dict(event.vc))
            twin = Event(event.kind, new, vc, dict(event.cols), event.step)
            self.rows.setdefault(key, []).append(twin)
            self.deferred.setdefault(new, []).append((key, twin))

    def push(self, dev: str) -> None:
        self.synced[dev] = merge(self.synced.get(dev, {}), self.vc.setdefault(dev, {}))
        if dev not in self.reseed_due:
            self.server_vc = merge(self.server_vc, self.vc[dev])

    def reset(self, devs: Iterable[str]) -> None:
        """The server's store starts empty; every device re-seeds it later."""
        self.server_vc = {}
        self.reseed_due = set(devs)

    def reseed(self, dev: str) -> None:
        """``dev`` meets the new store (a sync or pull): its synced state goes there."""
        if dev in self.reseed_due:
            self.reseed_due.discard(dev)
            self.server_vc = merge(self.server_vc, self.synced.get(dev, {}))

    def pull(self, dev: str) -> None:
        self.vc[dev] = merge(self.vc.setdefault(dev, {}), self.server_vc)
        self.synced[dev] = merge(self.synced.get(dev, {}), self.server_vc)

    def is_tainted(self, key) -> bool:
        if key in self.tainted:
            return True
        return isinstance(key, tuple) and any(
            isinstance(part, tuple) and self.is_tainted(part) for part in key)


_COLUMNS: dict = {}              # (connection id, table) -> columns; cleared per run


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    """cc's columns of ``table`` (cached: only migrate() changes them mid-run)."""
    key = (id(conn), table)
    if key not in _COLUMNS:
        _COLUMNS[key] = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
    return _COLUMNS[key]


def logical_view(conn: sqlite3.Connection) -> dict:
    """key -> {"table", "rid", "raw": {col: value}, "val": {col: resolved}, "dups"}."""
    keys: dict = {}               # table -> rid -> key
    view: dict = {}
    for table in TABLES:
        spec = ccsync.SPEC_BY_NAME[table]
        cols = [c for c in columns(conn, table) if c not in SKIP_COLS and c not in spec.local]
        rows = conn.execute(f'SELECT id, sync_id, {", ".join(cols)} FROM "{table}" '
                            f'ORDER BY id').fetchall()
        keys[table] = {}

        def resolve(col, raw):
            if raw is None or col not in spec.refs:
                return raw
            return keys.get(spec.refs[col], {}).get(raw, ("dangling", raw))

        for rid, sid, *values in rows:
            raw = dict(zip(cols, values))
            val = {c: resolve(c, v) for c, v in raw.items()}
            key = (table, *[val[c] for c in spec.key])
            keys[table][rid] = key
            if key in view:
                view[key]["dups"] += 1
                continue
            view[key] = {"table": table, "rid": rid, "sid": sid, "raw": raw, "dups": 0,
                         "val": {c: v for c, v in val.items() if c not in KEY_COLS[table]}}
    return view


def diff_events(model: Model, before: dict, after: dict, dev: str, step: int) -> None:
    """Record one cc operation's effect as events (see the module docstring)."""
    vc = None
    for key in sorted(set(before) | set(after), key=repr):
        b, a = before.get(key), after.get(key)
        if b is not None and a is not None:
            changed = {c: a["val"].get(c) for c in a["raw"]
                       if c in b["raw"] and a["raw"][c] != b["raw"][c]
                       and c not in KEY_COLS[a["table"]]}
            if not changed:
                continue
            event = ("edit", changed)
        elif a is not None:
            event = ("create", dict(a["val"]))
        else:
            event = ("delete", {})
        vc = vc or model.tick(dev)
        spec = ccsync.SPEC_BY_NAME[key[0]]
        for col, value in event[1].items():
            if isinstance(value, tuple) and value[0] == "dangling" and col in spec.refs:
                model.cc_dangling.add((dev, spec.refs[col], value[1]))
        uncovered = {c: v for c, v in event[1].items() if event[0] == "edit"
                     and (key[0], c) in model.uncovered.get(dev, ())}
        if uncovered and dev not in model.capture_off:
            late = Event("uncovered", dev, vc, uncovered, step)
            model.rows.setdefault(key, []).append(late)
            model.deferred.setdefault(dev, []).append((key, late))
            event = (event[0], {c: v for c, v in event[1].items() if c not in uncovered})
            if not event[1]:
                continue
        made = Event(event[0], dev, vc, event[1], step)
        model.rows.setdefault(key, []).append(made)
        if dev in model.capture_off:
            model.deferred.setdefault(dev, []).append((key, made))


##### Running a program #######################################################

class ModelSim(Sim):
    """test_property's Sim, with older schemas on some devices, copies of a
    device's file and sync results recorded instead of asserted."""

    def __init__(self, n: int, skews: list, old: dict, e2e: bool = False):
        self.old = {NAMES[i]: tables for i, tables in old.items()}
        self.refusals: list = []
        # Odd seeds sync end to end: records travel and rest as encrypted batches.
        self.vault = E2E_VAULT if e2e else None
        original = test_property.fresh_cc_db

        def fresh(path: Path) -> None:
            original(path)
            tables = self.old.get(path.stem, [])
            if tables:
                conn = sqlite3.connect(str(path), isolation_level=None)
                for table in tables:
                    for col, _type in OLD_SCHEMAS[table]:
                        conn.execute(f'ALTER TABLE "{table}" DROP COLUMN "{col}"')
                conn.close()

        with mock.patch.object(test_property, "fresh_cc_db", fresh):
            super().__init__(n, skews)
        for dev in self.devices:
            dev.transport.vault = self.vault

    def sync(self, i: int, mode: str = "sync") -> ccsync.SyncResult:
        dev = self.devices[i]
        result = {"sync": dev.sync, "push": dev.push, "pull": dev.pull}[mode]()
        self.results.append((dev.name, mode, result))
        if result.refused or result.pulled.refused:
            self.refusals.append((dev.name, mode, result.as_dict()))
        return result

    def move_server(self, step: int) -> None:
        """Every device syncs with another server from now on (a new, empty file)."""
        old, self.server = self.server, ccsync.ServerStore.open(
            str(Path(self.tmp.name) / f"server-{step}.db"))
        old.conn.close()
        for dev in self.devices:
            dev.transport = ccsync.LocalTransport(self.server, dev.name)
            dev.transport.vault = self.vault

    def copy_device(self, i: int, skew: int) -> Device:
        """A new device whose database starts as a byte copy of device i's file.

        The files beside it come along, as when a user copies ~/.cc-cli: the
        journal, and the synced state a ``stamp --remove`` kept (without it a
        copied database's rows would rightly count as older than any edit).
        """
        src = self.devices[i]
        name = NAMES[len(self.devices)]
        path = src.path.parent / f"{name}.db"
        shutil.copyfile(src.path, path)
        for suffix in ("-wal", "-journal", ".ccsync-state"):
            side = Path(str(src.path) + suffix)
            if side.exists():
                shutil.copyfile(side, str(path) + suffix)
        dev = Device(path, self.server, name)
        dev.transport.vault = self.vault
        for conn in (dev.cc, dev.store.conn):
            conn.execute("PRAGMA synchronous = OFF")
        dev.cc.create_function("julianday", 1, self._julianday(skew))
        dev.store.clock = lambda skew=skew: (self.now_ms + skew) / 1000
        self.devices.append(dev)
        return dev


def pick(conn, table: str, index: int, where: str = "", args=()) -> int | None:
    ids = [r[0] for r in conn.execute(f'SELECT id FROM "{table}" {where} ORDER BY id', args)]
    return ids[index % len(ids)] if ids else None


def fields(conn, table: str) -> list[str]:
    """The fields of cc's record for ``table`` (every column but the primary key)."""
    return [c for c in columns(conn, table) if c != "id"]


def orm_create(conn, table: str, rec: dict) -> int:
    cols = [c for c in fields(conn, table) if c not in ("sync_id", "synced_at")]
    cur = conn.execute(f'INSERT INTO "{table}" ({", ".join(cols)}) VALUES '
                       f'({", ".join("?" * len(cols))})', [rec.get(c) for c in cols])
    return cur.lastrowid


def orm_read(conn, table: str, rid: int) -> dict | None:
    cols = fields(conn, table)
    row = conn.execute(f'SELECT {", ".join(cols)} FROM "{table}" WHERE id = ?', (rid,)).fetchone()
    return None if row is None else dict(zip(cols, row))


def orm_write(conn, table: str, rid: int, rec: dict) -> None:
    """cc's ORM write: every field of the record it holds."""
    cols = list(rec)
    conn.execute(f'UPDATE "{table}" SET {", ".join(f"{c} = ?" for c in cols)} WHERE id = ?',
                 [rec[c] for c in cols] + [rid])


def delete_row(conn, table: str, rid: int) -> None:
    """Deletes as cc does them (children first; version.delete leaves references)."""
    if table == "project":
        for (env,) in conn.execute("SELECT id FROM environment WHERE project_id = ?",
                                   (rid,)).fetchall():
            delete_row(conn, "environment", env)
    elif table == "environment":
        conn.execute("DELETE FROM switch_log WHERE environment_id = ?", (rid,))
    elif table == "repository":
        conn.execute("DELETE FROM skill_tag WHERE repository_id = ?", (rid,))
        conn.execute("DELETE FROM knowledge_index WHERE repository_id = ?", (rid,))
    conn.execute(f'DELETE FROM "{table}" WHERE id = ?', (rid,))


def cc_op(sim: ModelSim, model: Model, step: tuple) -> None:
    """Apply one cc step on its device's own connection."""
    kind, d, *args = step
    dev = sim.devices[d]
    cc = dev.cc
    has = lambda table, col: col in columns(cc, table)   # noqa: E731
    if kind == "version":
        name, port = args
        rid = pick(cc, "version", 0, "WHERE name = ?", (name,))
        if rid is None:
            rid = orm_create(cc, "version", {"name": name, "path": f"/home/{dev.name}/odoo/{name}",
                                             "port": port})
        rec = orm_read(cc, "version", rid)
        rec["last_fetched_at"] = "2024-05-01T08:00:00"
        orm_write(cc, "version", rid, rec)
    elif kind == "project":
        name, branch = args
        rid = pick(cc, "project", 0, "WHERE name = ?", (name,))
        if rid is None:
            rid = orm_create(cc, "project", {"name": name, "is_virtual": 0,
                                             "no_auto_archive": 0})
        rec = orm_read(cc, "project", rid)
        rec["main_branch"] = branch
        orm_write(cc, "project", rid, rec)
    elif kind in ("setting", "theme"):
        pairs = [tuple(args)] if kind == "setting" else list(zip(THEME, args[0]))
        for name, value in pairs:              # setting.upsert(on='name')
            rid = pick(cc, "setting", 0, "WHERE name = ?", (name,))
            if rid is None:
                orm_create(cc, "setting", {"name": name, "value": value})
            else:
                rec = orm_read(cc, "setting", rid)
                rec["value"] = value
                orm_write(cc, "setting", rid, rec)
    elif kind == "ignore":
        table, name, value = args
        if table == "version":
            cc.execute("INSERT OR IGNORE INTO version (name, path, port) VALUES (?, ?, ?)",
                       (name, f"/home/{dev.name}/odoo/{name}", value))
        elif table == "project":
            cc.execute("INSERT OR IGNORE INTO project (name, main_branch) VALUES (?, ?)",
                       (name, value))
        else:
            cc.execute("INSERT OR IGNORE INTO setting (name, value) VALUES (?, ?)", (name, value))
    elif kind == "environment":
        p_index, name, v_index, branch = args
        project = pick(cc, "project", p_index)
        if project is None:
            return
        version = None if v_index is None else pick(cc, "version", v_index)
        rid = pick(cc, "environment", 0, "WHERE project_id = ? AND name = ?", (project, name))
        if rid is None:
            rid = orm_create(cc, "environment", {
                "name": name, "project_id": project, "version_id": version,
                "project_path": f"/home/{dev.name}/src/{name}", "pinned": 0,
                "status": "active"})
        rec = orm_read(cc, "environment", rid)
        rec["branch_name"] = branch
        orm_write(cc, "environment", rid, rec)
    elif kind == "switch":
        e_index, t = args
        env = pick(cc, "environment", e_index)
        when = SWITCH_TIMES[t]
        if env is None or cc.execute("SELECT 1 FROM switch_log WHERE environment_id = ? AND "
                                     "switched_at = ?", (env, when)).fetchone():
            return
        rec = {"environment_id": env, "switched_at": when, "flagged": 0}
        if has("switch_log", "source"):
            rec["source"] = "auto"
        orm_create(cc, "switch_log", rec)
    elif kind == "punch":
        when = PUNCH_TIMES[args[0]]
        if cc.execute("SELECT 1 FROM switch_log WHERE environment_id IS NULL AND "
                      "switched_at = ?", (when,)).fetchone():
            return
        rec = {"environment_id": None, "switched_at": when, "flagged": 0}
        if has("switch_log", "source"):
            rec["source"] = "auto"
        orm_create(cc, "switch_log", rec)
        model.punch_times.add(when)
    elif kind == "span":
        index, ended, note = args
        rid = pick(cc, "switch_log", index)
        if rid is None or not has("switch_log", "edited"):
            return
        rec = orm_read(cc, "switch_log", rid)
        rec.update(ended_at=ended, note=note, edited=1)
        orm_write(cc, "switch_log", rid, rec)
    elif kind in ("update", "stale"):
        table, col, index, value, *how = args
        rid = pick(cc, table, index)
        if rid is None or not has(table, col):
            return
        if col == "version_id":
            value = None if value is None else pick(cc, "version", value)
        if kind == "stale":
            rec = orm_read(cc, table, rid)
            view = logical_view(cc)
            sim.sync(d, "pull")                  # a sync lands between cc's read and write
            model.found(dev.name, view)
            model.pull(dev.name)
            rec[col] = value
            before = logical_view(cc)
            orm_write(cc, table, rid, rec)
            return before                        # the diff covers the write only
        if how == ["plain"]:
            cc.execute(f'UPDATE "{table}" SET "{col}" = ? WHERE id = ?', (value, rid))
        else:
            rec = orm_read(cc, table, rid)
            rec[col] = value
            orm_write(cc, table, rid, rec)
    elif kind == "delete":
        table, index = args
        rid = pick(cc, table, index)
        if rid is not None:
            delete_row(cc, table, rid)
            if table == "version":
                model.cc_dangling.add((dev.name, "version", rid))
    elif kind == "repository":
        origin = ORIGINS[args[0]]
        if pick(cc, "repository", 0, "WHERE origin_url = ?", (origin,)) is None:
            name = origin.rsplit("/", 1)[1][:-4]
            orm_create(cc, "repository", {"name": name, "path": f"/home/{dev.name}/src/{name}",
                                          "origin_url": origin, "enabled": 1})
    elif kind == "skill_tags":
        index, rows = args
        repo = pick(cc, "repository", index)
        if repo is None:
            return
        cc.executemany(
            "INSERT INTO skill_tag (repository_id, commit_sha, tag, weight, raw_loc, "
            "committed_at, top_files) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(repository_id, commit_sha, tag) DO UPDATE SET "
            "top_files = excluded.top_files WHERE skill_tag.top_files IS NULL",
            [(repo, SHAS[s], TAGS[t], w, 10 * w, "2024-04-30T12:00:00", top)
             for s, t, w, top in rows])
    elif kind == "reindex":
        index, symbols = args
        repo = pick(cc, "repository", index)
        if repo is None:
            return
        rows = cc.execute("SELECT id, commit_count, loc_authored FROM knowledge_index "
                          "WHERE repository_id = ?", (repo,)).fetchall()
        cc.executemany("UPDATE knowledge_index SET commit_count = ?, loc_authored = ?, "
                       "last_touched = ? WHERE id = ?",
                       [((c or 0) + 1, (l or 0) + 5, "2024-05-01", rid) for rid, c, l in rows])
        have = {(s, k) for s, k in cc.execute(
            "SELECT symbol, symbol_kind FROM knowledge_index WHERE repository_id = ?", (repo,))}
        cc.executemany("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, "
                       "commit_count, loc_authored, last_touched, top_files) "
                       "VALUES (?, ?, ?, 1, 5, '2024-05-01', NULL)",
                       [(repo, *SYMBOLS[i]) for i in symbols if SYMBOLS[i] not in have])
    else:  # pragma: no cover
        raise AssertionError(step)


def rename(sim: ModelSim, model: Model, step: tuple) -> None:
    _, d, table, index, new = step
    cc = sim.devices[d].cc
    rid = pick(cc, table, index)
    if rid is None or cc.execute(f'SELECT 1 FROM "{table}" WHERE name = ?', (new,)).fetchone():
        return                                   # cc refuses a rename onto a taken name
    before = logical_view(cc)
    cc.execute(f'UPDATE "{table}" SET name = ? WHERE id = ?', (new, rid))
    after = logical_view(cc)
    model.tainted |= {(table, new)} | {k for k in set(before) ^ set(after)}
    model.tainted |= {k for k in before if k in after and before[k]["val"] != after[k]["val"]}
    model.tick(sim.devices[d].name)


def migrate(sim: ModelSim, d: int) -> set:
    """cc's sync_schema on an older database: ALTER TABLE ADD COLUMN.  The
    (table, column) pairs it added."""
    dev = sim.devices[d]
    added = set()
    for table, cols in OLD_SCHEMAS.items():
        have = columns(dev.cc, table)
        for col, type_ in cols:
            if col not in have:
                dev.cc.execute(f'ALTER TABLE "{table}" ADD COLUMN "{col}" {type_}')
                added.add((table, col))
    _COLUMNS.clear()                 # after the ALTERs: the cache must see the new columns
    return added


def uncapturable(model: Model, dev: Device, before: dict, after: dict) -> None:
    """With capture off, a deleted row ccsync never synced leaves no trace (no
    trigger fired, no shadow holds its key): ccsync cannot know it existed, so
    a copy of it elsewhere may live on.  Such keys are skipped by checks 3, 4."""
    for key in set(before) - set(after):
        sid = before[key]["sid"]
        shadow = None
        if sid is not None:
            with contextlib.suppress(sqlite3.Error):
                shadow = dev.store.conn.execute(
                    "SELECT 1 FROM _ccsync_shadow WHERE tbl = ? AND sid = ?",
                    (key[0], sid)).fetchone()
        if shadow is None:
            model.tainted.add(key)
            model.notes.append(f"{dev.name}: deleted {fmt_key(key)} unseen by ccsync")


@dataclass
class Outcome:
    program: Program
    model: Model
    final: dict
    complaints: list             # [(kind, message)]

    @property
    def failures(self) -> list:
        return failures(self.complaints)


def run(program: Program, verbose: bool = False, log=print) -> Outcome:
    """Run ``program`` in a fresh simulation; the model and the final state."""
    model = Model()
    errors: list = []
    _COLUMNS.clear()
    sim = ModelSim(program.n, program.skews, program.old, e2e=program.seed % 2 == 1)
    try:
        for i, step in enumerate(program.steps):
            kind = step[0]
            if verbose:
                log(f"  {i:3d} {step!r}")
            try:
                if kind == "tick":
                    sim.now_ms += step[1]
                elif kind == "sync":
                    _, d, mode = step
                    name = sim.devices[d].name
                    view = logical_view(sim.devices[d].cc)
                    sim.sync(d, mode)
                    model.found(name, view)              # prepare re-installs capture
                    if mode in ("sync", "pull"):
                        model.reseed(name)
                    if mode in ("sync", "push"):
                        model.push(name)
                    if mode in ("sync", "pull"):
                        model.pull(name)
                elif kind == "copy":
                    _, d, skew = step
                    new = sim.copy_device(d, skew)
                    model.vc[new.name] = dict(model.vc.get(sim.devices[d].name, {}))
                    src = sim.devices[d].name
                    if src in model.capture_off:
                        model.capture_off.add(new.name)   # the copy has no triggers either
                    if src in model.uncovered:
                        model.uncovered[new.name] = set(model.uncovered[src])
                    model.synced[new.name] = dict(model.synced.get(src, {}))
                    if src in model.reseed_due:
                        model.reseed_due.add(new.name)
                    model.copy_deferred(src, new.name)
                    model.cc_dangling |= {(new.name, t, rid) for who, t, rid in
                                          model.cc_dangling if who == sim.devices[d].name}
                    if verbose:
                        log(f"      -> device {new.name} (copy of {sim.devices[d].name})")
                elif kind == "reset":
                    sim.server.reset()              # devices re-seed it as they sync
                    model.reset(d.name for d in sim.devices)
                elif kind == "move":
                    sim.move_server(i)
                    model.reset(d.name for d in sim.devices)
                elif kind == "migrate":
                    name = sim.devices[step[1]].name
                    model.uncovered.setdefault(name, set()).update(migrate(sim, step[1]))
                elif kind == "capture_off":
                    _, d, how = step
                    getattr(sim.devices[d].store, how)()
                    model.capture_off.add(sim.devices[d].name)
                elif kind == "rename":
                    rename(sim, model, step)
                else:
                    cc = sim.devices[step[1]].cc
                    before = logical_view(cc)
                    got = cc_op(sim, model, step)
                    if got is not None:
                        before = got
                    after = logical_view(cc)
                    dev = sim.devices[step[1]]
                    if dev.name in model.capture_off:
                        uncapturable(model, dev, before, after)
                    diff_events(model, before, after, dev.name, i)
            except sqlite3.Error as exc:
                errors.append(("cc-error", f"step {i} {step!r}: {type(exc).__name__}: {exc}"))
        for d in range(len(sim.devices)):            # every device ends on the same schema
            migrate(sim, d)
        for dev in sim.devices:                      # settle's first sync finds them
            if dev.name in model.capture_off or dev.name in model.uncovered:
                model.found(dev.name, logical_view(dev.cc))
        sim.settle(2)
        final = final_state(sim)
    except Exception as exc:                         # noqa: BLE001 - reported, not hidden
        tb = traceback.format_exc(limit=-3)
        return Outcome(program, model, {}, [("crash", f"{type(exc).__name__}: {exc}\n{tb}")])
    finally:
        sim.close()
    final["errors"] = errors
    return Outcome(program, model, final, oracle(model, final))


def final_state(sim: ModelSim) -> dict:
    devs = sim.devices
    return {
        "names": [d.name for d in devs],
        "contents": [d.snapshot() for d in devs],
        "views": [logical_view(d.cc) for d in devs],
        "pending": [{t: c for t, c in d.store.pending().items() if any(c.values())}
                    for d in devs],
        "pending_refs": [d.store.pending_references() for d in devs],
        "refused": [d.store.refused() for d in devs],
        "held": [{k: v for k, v in d.store.held().items() if v} for d in devs],
        "sync_refusals": list(sim.refusals),
        "server_payloads": server_payloads(sim),
        "plaintext_rows": sim.server.conn.execute(
            "SELECT count(*) FROM change WHERE payload != ''").fetchone()[0] if sim.vault else 0,
    }


def server_payloads(sim: ModelSim) -> str:
    """Every value the server holds, as text (end to end: its batches opened)."""
    texts = [r[0] for r in sim.server.conn.execute("SELECT payload FROM change")]
    if sim.vault is not None:
        texts += [json.dumps(sim.vault.open_batch(data, 1 << 30)) for (data,) in
                  sim.server.conn.execute("SELECT data FROM batch")]
    return " ".join(texts)


##### The oracle ##############################################################

def _undangle(snapshot: dict) -> dict:
    def fix(v):
        if isinstance(v, list):
            return [None if isinstance(x, str) and x.startswith("dangling:") else x for x in v]
        return None if isinstance(v, str) and v.startswith("dangling:") else v
    return {t: {sid: {c: fix(v) for c, v in rec.items()} for sid, rec in rows.items()}
            for t, rows in snapshot.items()}


def _first_difference(a: dict, b: dict) -> str:
    for table in sorted(set(a) | set(b)):
        ra, rb = a.get(table, {}), b.get(table, {})
        for sid in sorted(set(ra) | set(rb)):
            if ra.get(sid) != rb.get(sid):
                return f"{table} {sid}: {ra.get(sid)} vs {rb.get(sid)}"
    return "?"


def fmt_key(key) -> str:
    if not isinstance(key, tuple):
        return repr(key)
    if key and key[0] == "dangling":
        return f"dangling#{key[1]}"
    return f"{key[0]}(" + ", ".join(fmt_key(p) if isinstance(p, tuple) else repr(p)
                                  for p in key[1:]) + ")"


def maximal(events: list) -> list:
    return [e for e in events if not any(dominates(f.vc, e.vc) for f in events if f is not e)]


def needed(key, view: dict) -> bool:
    """A live row needs ``key`` as its required parent."""
    return any(REQUIRED_PARENT.get(k[0]) == key[0] and k[1] == key for k in view)


def _skip_row(model: Model, key) -> bool:
    if model.is_tainted(key):
        return True
    return key[0] == "setting" and ccsync.setting_policy(key[1]) is not None


def check_rows(model: Model, view: dict, who: str) -> list:
    """Checks 3 and 4 on one device's final logical view."""
    out = []
    for key, events in model.rows.items():
        if _skip_row(model, key):
            continue
        top = maximal(events)
        present = key in view
        steps = ",".join(f"{e.kind}@{e.dev}#{e.step}" for e in top)
        if all(e.kind == "delete" for e in top):
            if present and not needed(key, view):
                out.append(("resurrection", f"{who}: {fmt_key(key)} is back, though its "
                            f"latest events are deletes ({steps})"))
        elif not any(e.kind == "delete" for e in top) and not present:
            out.append(("lost row", f"{who}: {fmt_key(key)} is missing, though its latest "
                        f"events are {steps}"))
        if not present:
            continue
        row = view[key]
        deletes = [e for e in events if e.kind == "delete"]
        for col, value in row["val"].items():
            writes = [e for e in events if col in e.cols]
            if not writes:
                continue
            # A delete supersedes the writes before it: a row back from the dead
            # (a concurrent edit, or a child that needs it) owes nothing to them
            # when they are all the column has.  But a tombstone erases no cell:
            # once some write of the column is concurrent with the deletes, the
            # cell is the latest write by clock, and one before a delete can beat
            # the concurrent one (ccsync knows clocks, not causality: both may be
            # older than the tombstone).  Any causally maximal write qualifies.
            live = [e for e in writes if not any(dominates(x.vc, e.vc) for x in deletes)]
            if live:
                live = writes
            if not live:
                if value is not None and value not in [e.cols[col] for e in writes] and not (
                        isinstance(value, tuple) and value[0] == "dangling"):   # check 2's
                    out.append(("lost edit", f"{who}: {fmt_key(key)}.{col} = "
                                f"{fmt_key(value)}, a value no device ever wrote"))
                continue
            top_w = maximal(live)
            expected = [e.cols[col] for e in top_w]
            if value in expected:
                continue
            if any(model.is_tainted(v) for v in expected + [value] if isinstance(v, tuple)):
                continue
            if value is None and any(isinstance(v, tuple) and v not in view for v in expected):
                continue                         # a nullable reference to a row now absent
            if isinstance(value, tuple) and value[0] == "dangling":
                continue                         # reported by check 2
            out.append(("lost edit", f"{who}: {fmt_key(key)}.{col} = {fmt_key(value)}, "
                        f"expected {' or '.join(fmt_key(v) for v in expected)} (from "
                        f"{','.join(f'{e.kind}@{e.dev}#{e.step}' for e in top_w)})"))
    for key, row in view.items():
        if row["dups"]:
            out.append(("divergence", f"{who}: {row['dups'] + 1} rows of key {fmt_key(key)}"))
        if key not in model.rows and not _skip_row(model, key):
            out.append(("phantom", f"{who}: {fmt_key(key)} exists, but no device ever "
                        f"wrote it"))
    return out


def oracle(model: Model, final: dict) -> list:
    """Every complaint about the final state: [(kind, message)], empty when all is well."""
    out = list(final.get("errors", []))
    names, contents, views = final["names"], final["contents"], final["views"]
    # 1. content
    base = _undangle(contents[0])
    for name, snap in zip(names[1:], contents[1:]):
        if _undangle(snap) != base:
            out.append(("divergence", f"{name} differs from {names[0]}: "
                        f"{_first_difference(base, _undangle(snap))}"))
    for i, name in enumerate(names):
        if final["pending"][i] or final["pending_refs"][i]:
            out.append(("pending", f"{name}: pending {final['pending'][i]}, "
                        f"references {final['pending_refs'][i]}"))
        if final["refused"][i]:
            out.append(("refused", f"{name}: refused {final['refused'][i]}"))
        if final["held"][i]:
            out.append(("held", f"{name}: held {final['held'][i]}"))
    for name, mode, result in final["sync_refusals"]:
        out.append(("refused", f"{name} {mode}: {json.dumps(result, default=str)[:300]}"))
    if SECRET_VALUE in final["server_payloads"] or "github_pat" in final["server_payloads"]:
        out.append(("secret", "github_pat reached the server"))
    if final["plaintext_rows"]:
        out.append(("plaintext", f"{final['plaintext_rows']} record(s) in plaintext on an "
                                 f"end-to-end server"))
    # 2. references
    for name, snap, view in zip(names, contents, views):
        for table, rows in snap.items():
            for sid, rec in rows.items():
                for col, value in rec.items():
                    values = value if isinstance(value, list) else [value]
                    if any(isinstance(v, str) and v.startswith("dangling:") for v in values):
                        kind = "dangling"
                        parent = ccsync.SPEC_BY_NAME[table].refs.get(col)
                        if isinstance(value, str) and (name, parent, int(
                                value.split(":")[1])) in model.cc_dangling:
                            kind = "note: cc-made dangling"   # cc's doing, not ccsync's
                        out.append((kind, f"{name}: {table}.{col} of {sid} = {value} "
                                    f"(row {rec})"))
                if table == "environment" and rec.get("project_id") is None:
                    out.append(("dangling", f"{name}: environment {sid} has no project"))
        for key in view:
            if key[0] == "switch_log" and key[1] is None and key[2] not in model.punch_times:
                out.append(("punch-out", f"{name}: switch_log at {key[2]} has no environment "
                            f"but cc never punched out then"))
    # 3 and 4, on every device (messages deduplicated across devices)
    seen = set()
    for name, view in zip(names, views):
        for kind, msg in check_rows(model, view, name):
            tail = msg.split(": ", 1)[1]
            if (kind, tail) not in seen:
                seen.add((kind, tail))
                out.append((kind, msg))
    return out


def failures(complaints: list) -> list:
    """The complaints that fail a program (notes are for the record only)."""
    return [(k, m) for k, m in complaints if not k.startswith("note")]


def run_seed(seed: int, verbose: bool = False, renames=None, removes=None, resets=None,
             log=print) -> Outcome:
    return run(generate(seed, renames, removes, resets), verbose, log)
