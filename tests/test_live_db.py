"""ccsync as a guest in cc's live database: the backup before its first change, the
SQLite version it needs, its lock policy, records it keeps when it cannot apply them,
and large rows over the real HTTP path.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import threading

import pytest

import ccsync
from conftest import content, make_cc_db


def converge(*devs, rounds: int = 2) -> None:
    for _ in range(rounds):
        for dev in devs:
            dev.sync()


def values_of(conn) -> dict:
    """Synced content without row identities."""
    return {t: sorted(map(repr, rows.values())) for t, rows in content(conn).items()}


##### the backup before the first change #######################################

def test_first_stamp_backs_the_database_up_before_changing_it(devices, tmp_path):
    a = devices("a")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    before = values_of(a.cc)

    a.store.prepare()

    backups = list(tmp_path.glob("a.db.ccsync-backup-*"))
    assert [str(p) for p in backups] == [a.store.backup_path]
    assert backups[0].stat().st_mode & 0o777 == 0o600
    copy_ = sqlite3.connect(str(backups[0]))
    names = {n for (n,) in copy_.execute("SELECT name FROM sqlite_master")}
    assert not any(n.startswith("_ccsync_") for n in names)      # taken before any change
    cols = [r[1] for r in copy_.execute("PRAGMA table_info(project)")
            if r[1] not in ccsync.SYNC_COLUMNS]
    assert copy_.execute(f"SELECT {', '.join(cols)} FROM project").fetchall() == \
        a.sql(f"SELECT {', '.join(cols)} FROM project")
    copy_.close()
    assert values_of(a.cc) == before          # stamping changed only cc's sync columns

    again = ccsync.open_store(str(a.path))
    again.prepare()                           # later runs make no new backup
    assert again.backup_path is None
    assert len(list(tmp_path.glob("a.db.ccsync-backup-*"))) == 1
    again.conn.close()


def test_a_backup_that_cannot_be_written_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "cc.db"
    make_cc_db(path).close()
    store = ccsync.open_store(str(path))

    def fail(*_args, **_kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite3, "connect", fail)
    with pytest.raises(ccsync.StoreError, match="cannot back up .* nothing was changed"):
        store.prepare()
    monkeypatch.undo()
    assert not store.installed()
    assert not list(tmp_path.glob("cc.db.ccsync-backup-*"))
    store.conn.close()


def test_sync_reports_where_the_backup_went(devices):
    a = devices("a")
    result = a.sync()
    assert result.backup and result.as_dict()["backup"] == result.backup
    assert any("backed up the database to" in line
               for line in ccsync.summary_lines(result, push=True, pull=True))
    assert a.sync().backup is None


##### the SQLite library ccsync needs ##########################################

def test_an_sqlite_older_than_the_minimum_is_refused_clearly():
    with pytest.raises(ccsync.StoreError, match=r"SQLite 3\.24\.0 is too old: ccsync needs "
                                                r"3\.31\.0 or newer") as caught:
        ccsync.check_sqlite((3, 24, 0))
    assert "sqlite_version" in caught.value.hint
    ccsync.check_sqlite(sqlite3.sqlite_version_info)          # this machine's is fine


def test_the_cli_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    db = tmp_path / "cc.db"
    make_cc_db(db).close()
    real = ccsync.check_sqlite
    monkeypatch.setattr(ccsync, "check_sqlite", lambda *a: real((3, 20, 1)))
    assert ccsync.main(["status", "--db", str(db)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ccsync: error: SQLite 3.20.1 is too old") and \
        err[1].startswith("hint:") and len(err) == 2


##### the lock policy ###########################################################

class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 4))
        self.now += seconds


def test_short_writes_never_wait():
    t = FakeTime()
    gate = ccsync.WriteGate(clock=t.clock, sleep=t.sleep)
    for _ in range(20):                       # 20 transactions of 1 ms, 10 ms apart
        gate.enter()
        t.now += 0.001
        gate.leave()
        t.now += 0.010
    assert t.slept == []


def test_a_burst_past_the_slice_leaves_the_lock_free_longer_than_a_waiter_sleeps():
    t = FakeTime()
    gate = ccsync.WriteGate(clock=t.clock, sleep=t.sleep)
    gate.enter()
    t.now += 0.06
    assert not gate.over()
    t.now += 0.05
    assert gate.over()                         # 110 ms into the burst: commit now
    gate.leave()
    gate.enter()                               # the next write waits out the gap
    # A writer that waited up to 110 ms sleeps at most 25 ms between tries.
    assert t.slept and t.slept[0] > 0.025
    assert t.slept[0] == pytest.approx(ccsync.lock_gap(0.11))


@pytest.mark.parametrize("waited_ms, sleep_ms", [(0, 1), (2, 2), (5, 5), (17, 10), (40, 20),
                                                 (100, 25), (200, 50), (5000, 100)])
def test_the_gap_follows_sqlites_busy_handler(waited_ms, sleep_ms):
    assert ccsync.lock_gap(waited_ms / 1000) > sleep_ms / 1000


def test_a_long_job_commits_in_slices(devices, monkeypatch):
    """A big page is written in several short transactions, not one long one."""
    a, b = devices("a", "b")
    a.cc.execute("BEGIN")
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                     ((f"opt.{i:05d}", "x" * 50) for i in range(3000)))
    a.cc.execute("COMMIT")
    a.sync()
    commits = []
    real = ccsync.transaction

    def counting(conn):
        top = not conn.in_transaction
        ctx = real(conn)
        if top and conn is b.store.conn:
            commits.append(1)
        return ctx

    monkeypatch.setattr(ccsync, "transaction", counting)
    monkeypatch.setattr(b.store.gate, "slice_s", 0.005)
    b.sync(page_size=3000)
    assert len(commits) > 3
    assert b.sql("SELECT count(*) FROM setting")[0][0] == 3000


##### records a device cannot apply ############################################

def _captured(dev, table: str) -> dict:
    dev.store.prepare()
    return copy.deepcopy(next(r for r in dev.store.capture().records if r and r["t"] == table))


def test_an_error_of_the_machine_rolls_the_page_back_and_is_not_a_refusal(devices, monkeypatch):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    record = _captured(a, "project")
    b.store.prepare()

    def full(*_a, **_kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(ccsync.Store, "_apply_record", full)
    with pytest.raises(sqlite3.OperationalError):
        b.store.apply_page([record], 7)
    assert b.store.cursor == 0 and b.store.held() == {"refused": {}, "aside": {}}
    monkeypatch.undo()
    assert b.store.apply_page([record], 7).applied == 1 and b.store.cursor == 7


@pytest.mark.parametrize("exc, env", [
    (sqlite3.OperationalError("database is locked"), True),
    (sqlite3.OperationalError("disk I/O error"), True),
    (sqlite3.OperationalError("attempt to write a readonly database"), True),
    (MemoryError(), True),
    (sqlite3.IntegrityError("UNIQUE constraint failed: repository.path"), False),
    (sqlite3.ProgrammingError("Error binding parameter 1"), False),
    (KeyError("skill_tag_ids"), False),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), False),
])
def test_environment_errors_are_told_from_record_errors(exc, env):
    assert ccsync.environment_error(exc) is env


def test_a_record_for_a_table_cc_adds_later_is_kept_aside_then_applied(tmp_path, server):
    full = make_cc_db(tmp_path / "a.db")
    full.execute("INSERT INTO version (name, path) VALUES ('17.0', '/a/17')")
    store_a = ccsync.open_store(str(tmp_path / "a.db"))
    ccsync.sync_once(store_a, ccsync.LocalTransport(server, "a"))

    old = sqlite3.connect(str(tmp_path / "b.db"), isolation_level=None)  # an older cc:
    old.execute("CREATE TABLE setting (id INTEGER PRIMARY KEY AUTOINCREMENT, "  # no version
                "name TEXT UNIQUE NOT NULL, value TEXT, sync_id TEXT, synced_at TEXT)")
    store_b = ccsync.open_store(str(tmp_path / "b.db"))
    first = ccsync.sync_once(store_b, ccsync.LocalTransport(server, "b"))
    assert first.pulled.aside == 1 and not first.pulled.refused
    assert store_b.held()["aside"] == {"table not in this database": 1}

    old.execute("CREATE TABLE version (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE "
                "NOT NULL, path TEXT NOT NULL, port TEXT, pyenv_virtualenv TEXT, branch TEXT, "
                "last_fetched_at TEXT, sync_id TEXT, synced_at TEXT)")   # cc migrates
    second = ccsync.sync_once(store_b, ccsync.LocalTransport(server, "b"))
    assert second.pulled.applied == 1
    assert old.execute("SELECT name FROM version").fetchall() == [("17.0",)]
    assert store_b.held() == {"refused": {}, "aside": {}}
    for conn in (full, old, store_a.conn, store_b.conn):
        conn.close()


def test_refused_records_show_in_status_and_are_retried_by_a_newer_version(
        devices, server, monkeypatch, capsys):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    record = _captured(a, "project")
    record["p"]["v"]["workspace_id"] = {"$b64": "AAAA"}      # a name reference, not a blob
    record["c"]["workspace_id"] = record["c"]["name"]
    server.conn.execute(                      # stored by an older, laxer server
        "INSERT INTO change (tbl, sid, dev, clocks, payload, received_at, device) "
        "VALUES (?, ?, ?, ?, ?, '2026-01-01T00:00:00Z', 'a')",
        (record["t"], record["id"], record["dev"], json.dumps(record["c"]),
         json.dumps(record["p"])))
    a.sql("INSERT INTO project (name) VALUES ('beta')")
    a.sync()

    result = b.sync()
    assert result.pulled.refused == {"malformed name in workspace_id": 1}
    assert b.sql("SELECT name FROM project") == [("beta",)]
    assert ccsync.main(["status", "--db", str(b.path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rejected"] == {"malformed name in workspace_id": 1}

    assert b.sync().pulled.refused == {}               # not retried by the same version
    monkeypatch.setattr(ccsync, "__version__", "99.0")
    again = b.sync()
    assert again.pulled.refused == {"malformed name in workspace_id": 1}   # tried again


##### large rows over the real HTTP path #######################################

@pytest.fixture
def http_server(tmp_path):
    server = ccsync.SyncServer(("127.0.0.1", 0), str(tmp_path / "server.db")).start()
    registry = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    keys = {name: registry.register(name) for name in ("a", "b")}
    registry.conn.close()
    yield server, keys
    server.stop()


def test_large_rows_travel_in_pages_bounded_by_bytes(tmp_path, http_server):
    server, keys = http_server
    a = make_cc_db(tmp_path / "a.db")
    b = make_cc_db(tmp_path / "b.db")
    big = "x" * (3 * 1024 * 1024)             # under the 4 MiB value limit
    for i in range(5):                         # 15 MiB in all: more than one page
        a.execute("INSERT INTO environment (name, project_id, notes) VALUES (?, 1, ?)",
                  (f"env{i}", big + str(i)))
    a.execute("INSERT INTO project (name) VALUES ('acme')")
    stores = {n: ccsync.open_store(str(tmp_path / f"{n}.db")) for n in ("a", "b")}
    clients = {n: ccsync.Client(server.url, keys[n], timeout=60) for n in ("a", "b")}
    pages = []
    real_pull = clients["b"].pull

    def counting(cursor, limit=ccsync.PULL_PAGE, since=None, report=None, **kw):
        page = real_pull(cursor, limit, since, report, **kw)
        pages.append(len(page["records"]))
        return page

    clients["b"].pull = counting
    assert ccsync.sync_once(stores["a"], clients["a"]).accepted == 6
    got = ccsync.sync_once(stores["b"], clients["b"])
    assert got.pulled.applied == 6 and not got.pulled.refused
    assert len([p for p in pages if p]) >= 2
    assert b.execute("SELECT notes FROM environment WHERE name = 'env4'").fetchone()[0] == \
        big + "4"
    for conn in (a, b, *(s.conn for s in stores.values())):
        conn.close()


def test_a_value_over_the_limit_is_refused_at_push_and_stays_pending(tmp_path, http_server):
    server, keys = http_server
    a = make_cc_db(tmp_path / "a.db")
    a.execute("INSERT INTO setting (name, value) VALUES ('huge', ?)",
              ("y" * (4 * 1024 * 1024 + 1),))
    a.execute("INSERT INTO setting (name, value) VALUES ('small', 'ok')")
    store = ccsync.open_store(str(tmp_path / "a.db"))
    result = ccsync.sync_once(store, ccsync.Client(server.url, keys["a"], timeout=60))
    assert result.accepted == 1
    assert result.refused == {f"value of value is larger than {4 * 1024 * 1024} bytes": 1}
    assert store.pending()["setting"]["insert"] == 1
    a.close()
    store.conn.close()


##### deletes of rows never stamped #############################################

def test_a_row_created_and_deleted_between_two_syncs_deletes_its_natural_twin(devices):
    """One natural key is one row: b creating and deleting 'theme' before b ever synced
    it deletes the 'theme' a made earlier, on every device."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sync()
    b.store.prepare()                          # capture on; 'theme' not pulled yet
    b.sql("INSERT INTO setting (name, value) VALUES ('theme', 'light')")
    b.sql("DELETE FROM setting WHERE name = 'theme'")
    b.sql("INSERT INTO project (name) VALUES ('tmp')")
    b.sql("INSERT INTO environment (name, project_id) VALUES ('dev', "
          "(SELECT id FROM project WHERE name = 'tmp'))")
    b.sql("DELETE FROM environment")
    b.sql("DELETE FROM project WHERE name = 'tmp'")
    assert b.store.pending()["setting"]["delete"] == 0     # not yet named: no sync_id
    converge(a, b)
    converge(a, b)
    for dev in (a, b):
        assert dev.sql("SELECT name FROM setting") == []
        assert dev.sql("SELECT name FROM project") == [("acme",)]
    assert content(a.cc) == content(b.cc)


def test_a_secret_setting_created_and_deleted_sends_nothing(devices, server):
    a = devices("a")
    a.store.prepare()
    a.sql("INSERT INTO setting (name, value) VALUES ('github_pat', 'ghp_x')")
    a.sql("DELETE FROM setting")
    a.sync()
    assert server.stats()["records"] == 0


def test_an_orm_write_of_a_stale_empty_sync_id_keeps_the_rows_identity(devices):
    """cc's ORM writes back every field it read, sync_id included: read before the
    first stamp, written after it, the row must keep the id it was given."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'main')")
    cols = [r[1] for r in a.sql("PRAGMA table_info(project)") if r[1] != "id"]
    held = dict(zip(cols, a.sql(f"SELECT {', '.join(cols)} FROM project")[0]))  # cc reads
    a.sync()                                  # ccsync stamps and pushes meanwhile
    sid = a.sql("SELECT sync_id FROM project")[0][0]
    held["main_branch"] = "develop"
    a.sql(f"UPDATE project SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = 1",
          *held.values())                      # sync_id = NULL, synced_at = NULL
    assert a.sql("SELECT sync_id FROM project") == [(sid,)]
    converge(a, b)
    assert b.sql("SELECT sync_id, main_branch FROM project") == [(sid, "develop")]
    assert content(a.cc) == content(b.cc)


##### columns kept aside, then back-filled ######################################

def test_a_column_this_cc_lacks_is_kept_and_filled_in_once_cc_adds_it(devices):
    a, b = devices("a", "b")
    a.sql("ALTER TABLE setting ADD COLUMN scope TEXT")          # a's cc is newer
    a.sql("INSERT INTO setting (name, value, scope) VALUES ('theme', 'dark', 'user')")
    a.sql("INSERT INTO setting (name, value, scope) VALUES ('lang', 'en', 'site')")
    converge(a, b)
    assert b.sql("SELECT name, value FROM setting ORDER BY name") == [("lang", "en"),
                                                                       ("theme", "dark")]
    assert not b.store.held()["refused"]
    b.sql("ALTER TABLE setting ADD COLUMN scope TEXT")          # b's cc migrates
    b.sql("UPDATE setting SET scope = 'mine' WHERE name = 'lang'")   # before any sync
    converge(a, b)
    assert b.sql("SELECT name, scope FROM setting ORDER BY name") == [("lang", "mine"),
                                                                       ("theme", "user")]
    assert content(a.cc) == content(b.cc)      # b's own write is the later edit: it won
    a.sql("UPDATE setting SET scope = 'global' WHERE name = 'theme'")
    converge(a, b)
    assert b.sql("SELECT scope FROM setting WHERE name = 'theme'") == [("global",)]


##### the sync protocol ##########################################################

@pytest.mark.parametrize("server_protocol, upgrade", [(ccsync.PROTOCOL + 1, "on this device"),
                                                       (ccsync.PROTOCOL - 1, "on the server")])
def test_a_device_and_a_server_of_different_protocols_say_which_to_upgrade(
        tmp_path, server_protocol, upgrade):
    server = ccsync.SyncServer(("127.0.0.1", 0), str(tmp_path / "server.db"))
    server.protocol = server_protocol
    server.start()
    try:
        registry = ccsync.ServerStore.open(str(tmp_path / "server.db"))
        key = registry.register("a")
        registry.conn.close()
        make_cc_db(tmp_path / "a.db").execute("INSERT INTO project (name) VALUES ('acme')")
        store = ccsync.open_store(str(tmp_path / "a.db"))
        with pytest.raises(ccsync.RemoteError, match=f"upgrade ccsync {upgrade}") as caught:
            ccsync.sync_once(store, ccsync.Client(server.url, key))
        assert caught.value.kind == "protocol" and caught.value.hint
        assert store.pending()["project"]["insert"] == 1          # nothing was exchanged
        checked = ccsync.ServerStore.open(str(tmp_path / "server.db"))
        assert checked.stats()["records"] == 0
        checked.conn.close()
        store.conn.close()
    finally:
        server.stop()


def test_matching_protocols_sync_and_answers_name_theirs(tmp_path, http_server):
    server, keys = http_server
    answer = ccsync.Client(server.url, keys["a"]).hello()
    assert answer["protocol"] == ccsync.PROTOCOL


##### time entries are never turned into punch-outs ##############################

def _env_with_entry(a, b):
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('dev', 1)")
    converge(a, b)


def test_an_environment_deleted_while_another_device_records_time_on_it_stays(devices):
    a, b = devices("a", "b")
    _env_with_entry(a, b)
    a.sql("DELETE FROM environment WHERE name = 'dev'")          # cc's delete on a
    b.sql("INSERT INTO switch_log (environment_id, switched_at, flagged, source) VALUES "
          "((SELECT id FROM environment WHERE name = 'dev'), '2026-12-01T09:00:00.000001', "
          "0, 'auto')")                                         # b punches in on it
    converge(a, b)
    for dev in (a, b):
        assert dev.sql("SELECT s.switched_at, e.name FROM switch_log s "
                       "JOIN environment e ON e.id = s.environment_id") == \
            [("2026-12-01T09:00:00.000001", "dev")]
        assert dev.sql("SELECT count(*) FROM switch_log WHERE environment_id IS NULL") == [(0,)]
    assert content(a.cc) == content(b.cc)
    b.sql("DELETE FROM switch_log")                              # once no entry needs it
    converge(a, b)
    converge(a, b)
    for dev in (a, b):
        assert dev.sql("SELECT count(*) FROM environment") == [(0,)]
        assert dev.sql("SELECT count(*) FROM project") == [(1,)]
    assert content(a.cc) == content(b.cc)


def test_a_time_entry_that_arrives_before_its_environment_waits_for_it(devices):
    a, b = devices("a", "b")
    _env_with_entry(a, b)
    a.sql("INSERT INTO environment (name, project_id) VALUES ('new', 1)")
    a.sql("INSERT INTO switch_log (environment_id, switched_at, source) VALUES "
          "((SELECT id FROM environment WHERE name = 'new'), '2026-12-01T10:00:00.000001', "
          "'auto')")
    a.store.prepare()
    records, position = [], None
    while True:                                   # one batch per table
        batch = a.store.capture(position, 1000)
        if batch.next_pos is None:
            break
        records += [r for r in batch.records if r]
        position = batch.next_pos
    entry = [r for r in records if r["t"] == "switch_log"]
    assert len(entry) == 1
    b.store.prepare()
    b.store.apply_page(entry, None)                     # the entry alone, first
    assert b.sql("SELECT count(*) FROM switch_log") == [(0,)]     # waits, no punch-out
    assert b.store.pending_references() == 1
    b.store.apply_page([r for r in records if r["t"] == "environment"], None)
    b.store.resolve_pending()
    assert b.sql("SELECT e.name FROM switch_log s JOIN environment e "
                 "ON e.id = s.environment_id") == [("new",)]
