"""Shared fixtures: device databases built from cc 4.0's real schema, a server store.

The schema is a copy of cc 4.0's (tests/cc-schema.sql); nothing here reads
outside the repository.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the same property examples every time (a red build is reproducible,
# never a fresh random draw); local runs draw as many fresh ones, and
# ``make hunt`` runs the long forms.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The tests start ccsync in hundreds of child processes.  Where the environment
# forbids bytecode files (PYTHONDONTWRITEBYTECODE), each would compile the whole
# module again; a cache of their own, outside the repository, lets the first
# compile it for the rest.
_PYCACHE = tempfile.mkdtemp(prefix="ccsync-test-pycache-")
atexit.register(shutil.rmtree, _PYCACHE, ignore_errors=True)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE

import ccsync  # noqa: E402

SCHEMA = (Path(__file__).resolve().parent / "cc-schema.sql").read_text()
# Where the property and fuzz tests keep their many small databases: make test's
# scratch (removed when it ends), else /dev/shm (in memory), else the default.
TMP_ROOT = os.environ.get("CCSYNC_TEST_TMP") or ("/dev/shm" if os.access("/dev/shm", os.W_OK)
                                                 else None)


def make_cc_db(path: Path) -> sqlite3.Connection:
    """A fresh cc 4.0 database at ``path``; returns cc's own (autocommit) connection."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=5)
    conn.executescript(f"BEGIN; {SCHEMA}; COMMIT;")     # one commit, not one per table
    return conn


class Device:
    """One simulated machine: cc's connection to its database plus ccsync's Store."""

    def __init__(self, path: Path, server: ccsync.ServerStore, name: str):
        self.path = path
        self.name = name
        self.cc = make_cc_db(path) if not path.exists() else sqlite3.connect(
            str(path), isolation_level=None, timeout=5)
        self.store = ccsync.open_store(str(path))
        self.transport = ccsync.LocalTransport(server, name)

    def sql(self, query: str, *args):
        """Run SQL as cc would (its own connection, autocommit)."""
        return self.cc.execute(query, args).fetchall()

    def sync(self, **kw) -> ccsync.SyncResult:
        return ccsync.sync_once(self.store, self.transport, **kw)

    def push(self) -> ccsync.SyncResult:
        return self.sync(pull=False)

    def pull(self) -> ccsync.SyncResult:
        return self.sync(push=False)

    def snapshot(self) -> dict:
        return content(self.cc)


def key_author(api_key: str) -> str:
    """The author prefix of the device ids made under ``api_key``."""
    return ccsync.author_prefix(ccsync.DeviceKeys.from_api_key(api_key).key_id)


def keyed(server: ccsync.ServerStore, name: str, key: str | None = None):
    """A registered device's in-process transport, its authorship checked as
    over HTTP (``key``: one registered already): (transport, api key)."""
    key = key or server.register(name)
    return ccsync.LocalTransport(server, name, author=key_author(key)), key


def content(conn: sqlite3.Connection) -> dict:
    """Synced content, comparable across devices.

    Integer ids become the referenced row's sync_id; device-local columns,
    ids and synced_at are left out; local-only settings are left out.
    """
    out = {}
    sid_of = {}
    for spec in ccsync.SPEC:
        sid_of[spec.name] = dict(conn.execute(f'SELECT id, sync_id FROM "{spec.name}"'))
    for spec in ccsync.SPEC:
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{spec.name}")')]
        keep = [c for c in cols if c not in ("id", "synced_at", *spec.local)]
        rows = {}
        for row in conn.execute(f'SELECT {", ".join(keep)} FROM "{spec.name}"'):
            rec = dict(zip(keep, row))
            if spec.name == "setting" and ccsync.setting_policy(rec["name"]):
                continue
            for col, parent in spec.refs.items():
                if rec.get(col) is not None:
                    rec[col] = sid_of[parent].get(rec[col], f"dangling:{rec[col]}")
            for col, target in spec.list_refs.items():
                parsed = ccsync.parse_id_list(rec.get(col))
                if parsed is not None:
                    rec[col] = sorted(sid_of[target].get(i, f"dangling:{i}") for i in parsed[0])
            if "workspace_id" in rec:
                rec.pop("workspace_id")
            rows[rec.pop("sync_id")] = rec
        out[spec.name] = rows
    return out


def pytest_collection_modifyitems(session, config, items):
    """Start the model-based programs early, on the other cores (see test_model.py)."""
    if any(item.name == "test_model_programs" for item in items):
        import test_model
        test_model.start_programs()


def pytest_sessionfinish(session, exitstatus):
    model = sys.modules.get("test_model")
    if model is not None:
        model.stop_programs()


@pytest.fixture
def server(tmp_path):
    store = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    yield store
    store.conn.close()


@pytest.fixture
def devices(tmp_path, server):
    """A factory: devices('a', 'b', 'c') -> list of Device on one server."""
    made = []

    def factory(*names):
        new = [Device(tmp_path / f"{n}.db", server, n) for n in names]
        made.extend(new)
        return new if len(new) > 1 else new[0]

    yield factory
    for d in made:
        d.store.conn.close()
        d.cc.close()
