"""A reviewer's attacks on collection, quotas and authorship (commit 3c5f3e4).

Each test states the behaviour ccsync should have; on that commit all but
the control failed.  ``Clock``, ``keyed``, ``devices``, ``settings`` and
``sync_all`` come from test_collect.py.  Collection on the horizon alone takes
only rows of tables no reference column names (ccsync.COLLECTABLE), so the
cases that need a collected row use settings, time entries and backups; the
referenced tables' deleted rows wait for every device's answer as well
(test_collect_referenced.py).
"""

from __future__ import annotations

import sqlite3

import pytest

import ccsync
from conftest import Device, key_author, keyed
from test_collect import DAY, Clock, devices, settings, sync_all
from test_transport import register, start_server  # noqa: F401  (fixture)


def projects(device, *names: str) -> None:
    for name in names:
        device.sql("INSERT INTO project (name, main_branch) VALUES (?, 'main')", name)


def names(device) -> set[str]:
    return {n for (n,) in device.sql("SELECT name FROM project")}


def setting_names(device) -> set[str]:
    return {n for (n,) in device.sql("SELECT name FROM setting")}


def newcomer(tmp_path, server, name: str = "n") -> Device:
    """A device that joins now and syncs twice."""
    (device,) = devices(tmp_path, server, name)
    device.sync()
    device.sync()
    return device


def pull_only(device) -> None:
    """`ccsync pull`: merges, never reports how far (no push went first)."""
    result = device.pull()
    assert result.quota is None and not result.pulled.refused


##### Rows a live row still names ############################################

def test_a_deleted_project_kept_for_an_environment_made_elsewhere_is_not_collected(tmp_path):
    """a deletes acme while b adds an environment to it: both keep acme for
    the environment (the server still reads acme as deleted).  Collecting it
    leaves a newcomer with an environment whose project never comes."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    projects(a, "acme")
    sync_all(a, b)
    (pid,) = b.sql("SELECT id FROM project")[0]
    b.sql("INSERT INTO environment (name, project_id, project_path) VALUES ('main', ?, '/x')",
          pid)
    a.sql("DELETE FROM project WHERE name = 'acme'")
    sync_all(a, b, rounds=3)
    assert names(a) == names(b) == {"acme"}
    for _ in range(3):                  # report, ask, answer: both hold acme
        server.collect()
        sync_all(a, b)
    assert server.collect() == 0

    n = newcomer(tmp_path, server)
    assert n.store.pending_references() == 0
    assert n.snapshot() == a.snapshot()


def test_a_reference_to_a_collected_version_does_not_wait_forever(tmp_path):
    """cc's version.delete leaves environment.version_id at the deleted id
    (ccsync reads it as NULL); once 17.0 is collected, a newcomer's
    environment waits for a parent that is gone, on every sync."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    projects(a, "acme")
    a.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/o', '8069')")
    a.sql("INSERT INTO environment (name, project_id, version_id, project_path) "
          "VALUES ('main', 1, 1, '/x')")
    sync_all(a, b)
    a.sql("DELETE FROM version WHERE name = '17.0'")
    sync_all(a, b, rounds=3)
    collected = 0
    for _ in range(3):                  # report, ask, answer: main still names 17.0
        collected += server.collect()
        sync_all(a, b)
    assert collected + server.collect() == 0    # a row a live row names is kept

    n = newcomer(tmp_path, server)
    assert n.snapshot() == a.snapshot()
    assert n.store.pending_references() == 0


##### Devices that have not reported ##########################################

def test_an_unsent_edit_of_a_row_collected_meanwhile_brings_back_the_whole_row(tmp_path):
    """c only pulls, then is forgotten (not seen for 31 days), so collection
    no longer waits for it; its cursor is past the delete, so it is not stale
    by its cursor.  It edited the time entry after a deleted it: its push must
    not make that edit alone the entry on the server."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b, c = devices(tmp_path, server, "a", "b", "c")
    projects(a, "acme")
    a.sql("INSERT INTO environment (name, project_id, project_path) VALUES ('main', 1, '/x')")
    a.sql("INSERT INTO switch_log (environment_id, switched_at, flagged, source) "
          "VALUES (1, '2024-05-01T09:00:00', 0, 'auto')")
    sync_all(a, b)
    pull_only(c)
    a.sql("DELETE FROM switch_log")
    a.push()
    c.sql("UPDATE switch_log SET note = 'late'")    # after a's delete: the entry stays on c
    pull_only(c)
    clock.now += 31 * DAY
    sync_all(a, b)
    assert server.collect() == 1 and not server.stale(c.store.cursor)
    sync_all(c, a, b)

    n = newcomer(tmp_path, server)
    assert n.snapshot() == a.snapshot() == c.snapshot()
    assert a.sql("SELECT note FROM switch_log") == [("late",)]


def test_records_kept_aside_do_not_outlive_a_rejoin(tmp_path):
    """c's cc has no backup table yet: the row arrives and is kept aside.
    Deleted and collected while c was away, it must not come back on c alone
    once cc adds the table."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b, c = devices(tmp_path, server, "a", "b", "c")
    c.sql("DROP TABLE backup")
    a.sql("INSERT INTO backup (name, env_name, db_name, file_path, created_at) "
          "VALUES ('nightly', 'main', 'acme', '/b/1.dump', '2024-05-01T09:00:00')")
    sync_all(a, b, c)
    a.sql("DELETE FROM backup")
    sync_all(a, b)
    clock.now += 31 * DAY
    sync_all(a, b)
    assert server.collect() == 1
    c.sync()                                            # stale: rejoins
    c.sql("CREATE TABLE backup (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
          "note TEXT, env_name TEXT NOT NULL, db_name TEXT NOT NULL, database_id INTEGER, "
          "file_path TEXT NOT NULL, size_bytes INTEGER, created_at TEXT NOT NULL, "
          "odoo_version TEXT, sync_id TEXT, synced_at TEXT)")
    sync_all(c, a, b)
    assert c.sql("SELECT name FROM backup") == a.sql("SELECT name FROM backup") == []


##### Collection racing a pull or a push ######################################

def interleave_collect(server, method: str, collector, *, locked: bool = False) -> None:
    """Make ``server.<method>`` run ``collector.collect()`` (another connection
    to the same store, as the server's collecting thread) right after it
    returns, once.  ``locked``: the collection must find the store locked
    (the method runs inside a write transaction, so none can come between)."""
    real = getattr(server, method)

    def then_collect(*args, **kw):
        answer = real(*args, **kw)
        setattr(server, method, real)
        if locked:
            collector.conn.execute("PRAGMA busy_timeout = 50")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                collector.collect()
        else:
            assert collector.collect() == 1
        return answer

    setattr(server, method, then_collect)


def forgotten_c(tmp_path):
    """a, b and c; c pulled once and then was not seen for 31 days (collection
    no longer waits for it); a deleted p1 meanwhile, and a and b merged that."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    collector = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b, c = devices(tmp_path, server, "a", "b", "c")
    settings(a, "p1", "p0")
    sync_all(a, b)
    pull_only(c)
    a.sql("DELETE FROM setting WHERE name = 'p1'")
    clock.now += 31 * DAY
    sync_all(a, b)
    return server, collector, (a, b, c)


def test_a_collection_between_a_pulls_stale_check_and_its_read_loses_no_delete(tmp_path):
    server, collector, (a, b, c) = forgotten_c(tmp_path)
    settings(a, "p9")
    a.push()                    # a record past the horizon: c's cursor would pass the delete
    interleave_collect(server, "collected_through", collector)
    pull_only(c)
    sync_all(a, b, c)
    assert setting_names(c) == setting_names(a) == {"p0", "p9"}
    collector.conn.close()


def test_no_collection_comes_between_a_pushs_stale_check_and_its_store(tmp_path):
    server, collector, (a, b, c) = forgotten_c(tmp_path)
    settings(c, "c1")
    interleave_collect(server, "stale", collector, locked=True)
    c.push()
    sync_all(a, b, c)
    assert setting_names(c) == setting_names(a) == {"p0", "c1"}
    collector.conn.close()


##### What a report may claim ################################################

def test_a_report_past_the_newest_record_does_not_blind_every_device(tmp_path):
    """A device reports (for its own id) a cursor the server never handed
    out; collected_through moves there, every device's cursor follows, and
    nobody receives another record."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    projects(a, "p1")
    a.sync()
    server.note_reader("a", a.transport.author, a.store.device_id, 10 ** 12)
    server.collect()
    b.sync()
    projects(a, "from-a")
    projects(b, "from-b")
    sync_all(a, b, rounds=3)
    assert names(a) == names(b) == {"p1", "from-a", "from-b"}


def test_an_odd_device_id_in_a_report_gets_a_clear_answer(tmp_path, start_server):
    srv = start_server()
    client = ccsync.Client(srv.url, register(srv, "a"))
    try:
        answer = client._request("/v1/pull", {"cursor": 0, "limit": 10, "merged": 1,
                                              "dev": client.author + ".\udc80"})
    except ccsync.RemoteError as exc:
        assert "500" not in str(exc), exc
    else:
        assert "records" in answer
    finally:
        client.close()
    assert not any("UnicodeEncodeError" in line for line in srv.lines), srv.lines


##### Quotas ##################################################################

def test_a_device_at_its_quota_may_delete_rows(tmp_path):
    """Deleting is how a user gets back under a stored-records quota; the
    tombstones count as growth, so the push is refused and nothing is freed."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"),
                                     quota=ccsync.Quota(records=3))
    (a,) = devices(tmp_path, server, "a")
    projects(a, "p1", "p2", "p3")
    assert a.push().accepted == 3
    a.sql("DELETE FROM project")
    assert a.push().quota is None


def test_a_reseed_the_new_store_refuses_is_not_dropped(tmp_path):
    """The server is rebuilt with a quota; the re-seed's push is refused
    whole, reseed_server does not read the answer, adopts the store, and the
    rows never reach it (nothing pending, no error)."""
    old = ccsync.ServerStore.open(str(tmp_path / "old.db"))
    (a,) = devices(tmp_path, old, "a")
    projects(a, "p1", "p2", "p3", "p4", "p5")
    a.sync()
    new = ccsync.ServerStore.open(str(tmp_path / "new.db"), quota=ccsync.Quota(records=3))
    a.transport, _ = keyed(new, "a")
    with pytest.raises(ccsync.RemoteError) as refused:
        a.sync()
    assert refused.value.kind == "quota" and new.stats()["records"] == 0
    a.transport.server = ccsync.ServerStore(new.conn)          # the operator lifts the quota
    assert a.sync().reseeded == 5
    assert new.stats()["records"] == 5


def test_a_reseed_fits_the_servers_max_push_records(tmp_path, start_server):
    """Pushes halve their batch when told too_large; the re-seed does not,
    so with --max-push-records below its 2,000 rows every sync fails."""
    old = ccsync.ServerStore.open(str(tmp_path / "old.db"))
    (a,) = devices(tmp_path, old, "a")
    a.cc.executemany("INSERT INTO project (name) VALUES (?)", [(f"p{i}",) for i in range(300)])
    a.sync()
    srv = start_server("new.db", quota=ccsync.Quota(push_records=100))
    a.transport = ccsync.Client(srv.url, register(srv, "a"))
    assert a.sync().reseeded == 300


##### Device ids ##############################################################

def test_own_ids_lists_each_id_once(tmp_path, server):
    """Every new id doubles the entries of the one before it, so the 16 kept
    hold only 8 ids (edits kept under an older one stop going out as own)."""
    a = Device(tmp_path / "a.db", server, "a")
    a.store.prepare()
    for _ in range(3):
        a.store.take_author(key_author(server.register("a", rotate=True)))
    ids = a.store.own_ids()
    assert len(ids) == len(set(ids)), ids


def test_control_the_plain_case_collects(tmp_path):
    """Control for the tests above: with nothing in the way, the helpers collect."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "p1")
    sync_all(a, b)
    a.sql("DELETE FROM setting")
    sync_all(a, b, rounds=3)
    assert server.collect() == 1
