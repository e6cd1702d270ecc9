"""Collection on the server: deleted rows go once every device has merged the delete.

Devices report how far they have merged (with every edit made before that
sent); the server drops a deleted row, tombstone and all, when every
device seen lately is past its records.  A device away longer than the
server's --forget-after, or a copy of a database made before a
collection, catches up from the start ("rejoins"): rows the server no
longer has go there too, unless edited there since (those come back as
new rows).
"""

from __future__ import annotations

import shutil
import sqlite3
import time

import pytest

import ccsync
from conftest import Device, keyed, make_cc_db
from test_transport import register, start_server  # noqa: F401  (fixture)

DAY = 86400.0


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def devices(tmp_path, server, *names):
    made = []
    for name in names:
        device = Device(tmp_path / f"{name}.db", server, name)
        device.transport, device.key = keyed(server, name)
        made.append(device)
    return made


def settings(device, *names):
    """Settings, a table no other row references (so its deleted rows can go)."""
    for name in names:
        device.sql("INSERT INTO setting (name, value) VALUES (?, 'v')", name)


def held(server) -> set[str]:
    """The setting names the server holds any record of."""
    names = set()
    for (payload,) in server.conn.execute("SELECT payload FROM change WHERE tbl = 'setting'"):
        names.add(ccsync.json.loads(payload)["k"].get("name"))
    return names


def names(device) -> set[str]:
    return {n for (n,) in device.sql("SELECT name FROM setting")}


def sync_all(*devs, rounds: int = 2):
    for _ in range(rounds):
        for device in devs:
            result = device.sync()
            assert result.quota is None and not result.refused


def test_rows_other_rows_may_reference_wait_for_every_devices_answer(tmp_path):
    """A deleted project is not collected on the horizon alone: the devices
    have not said yet that nothing they hold names it (test_collect_referenced)."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    sync_all(a, b)
    a.sql("DELETE FROM project")
    sync_all(a, b, rounds=3)
    assert server.horizon() > 0 and server.collect() == 0
    assert "project" not in ccsync.COLLECTABLE and "switch_log" in ccsync.COLLECTABLE
    assert "environment" not in ccsync.COLLECTABLE          # a time entry's parent


def symbols(device) -> set[str]:
    return {s for (s,) in device.sql("SELECT symbol FROM knowledge_index")}


def test_a_reindex_leaves_no_deleted_code_index_rows_on_the_server(tmp_path):
    # The indexer deletes and re-inserts knowledge_index and skill_tag rows;
    # only a repository's id lists name them, and those read the same once
    # the rows are gone: an id of a row not here is left out of the list.
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    a.sql("INSERT INTO repository (name, path, origin_url) VALUES ('r', '/r', 'https://x/r.git')")
    for symbol in ("s1", "s2", "s3", "s4"):
        a.sql("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind) "
              "VALUES (1, ?, 'function')", symbol)
    a.sql("INSERT INTO skill_tag (repository_id, commit_sha, tag) VALUES (1, 'c1', 'orm')")
    a.sql("UPDATE repository SET knowledge_index_ids = '[1,2,3,4]', skill_tag_ids = '[1]'")
    sync_all(a, b)
    a.sql("DELETE FROM knowledge_index WHERE symbol IN ('s2', 's3')")          # re-indexed
    a.sql("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind) "
          "VALUES (1, 's5', 'function')")
    a.sql("DELETE FROM skill_tag")
    sync_all(a, b, rounds=3)
    kept = server.stats()["records"]
    assert server.collect() == 3
    assert server.stats()["records"] == kept - 6          # each row and its tombstone
    assert {t for (t,) in server.conn.execute("SELECT DISTINCT tbl FROM change")} == \
        {"repository", "knowledge_index"}
    c = Device(tmp_path / "c.db", server, "c")
    c.transport, c.key = keyed(server, "c")
    sync_all(a, b, c)
    assert symbols(a) == symbols(b) == symbols(c) == {"s1", "s4", "s5"}
    assert c.sql("SELECT count(*) FROM skill_tag") == [(0,)]
    digests = {d.store.content_digest(b"k") for d in (a, b, c)}
    assert len(digests) == 1 and None not in digests       # what every device syncs agrees
    lists = {d.name: ccsync.parse_id_list(d.sql("SELECT knowledge_index_ids FROM repository")
                                          [0][0])[0] for d in (a, b, c)}
    live = {d.name: {rid for (rid,) in d.sql("SELECT id FROM knowledge_index WHERE symbol IN "
                                             "('s1', 's4')")} for d in (a, b, c)}
    for name, ids in lists.items():
        assert live[name] <= set(ids), (name, ids)         # the live rows are still listed


def test_a_deleted_row_goes_once_every_device_has_merged_its_delete(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "p1", "p2", "p3")
    sync_all(a, b)
    a.sql("DELETE FROM setting WHERE name = 'p1'")
    a.sync()
    assert server.collect() == 0                # b has not merged the delete
    b.sync()
    assert server.collect() == 0                # ... and has not said so yet
    sync_all(a, b)

    before = server.stats()["records"]
    assert server.collect() == 1
    assert held(server) == {"p2", "p3"}
    assert server.stats()["records"] == before - 2       # the row and its tombstone
    assert server.collect() == 0
    c = Device(tmp_path / "c.db", server, "c")
    c.transport, c.key = keyed(server, "c")
    sync_all(a, b, c)
    assert a.snapshot() == b.snapshot() == c.snapshot()
    assert names(c) == {"p2", "p3"}
    usage = dict(server.conn.execute("SELECT device, records FROM usage"))
    counted = dict(server.conn.execute("SELECT device, count(*) FROM change GROUP BY device"))
    assert {d: n for d, n in usage.items() if n} == counted


def test_a_device_away_too_long_rejoins_and_keeps_its_own_edits(tmp_path):
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b, c = devices(tmp_path, server, "a", "b", "c")
    settings(a, "p1", "p2", "p3")
    sync_all(a, b, c)
    c.sql("UPDATE setting SET value = 'c-work' WHERE name = 'p1'")   # c goes offline
    a.sql("DELETE FROM setting WHERE name IN ('p1', 'p3')")
    sync_all(a, b)
    assert server.collect() == 0                # c still holds collection back

    clock.now += 31 * DAY
    sync_all(a, b)
    assert server.collect() == 2
    assert held(server) == {"p2"}

    back = c.sync()                             # told it is stale; rejoins
    assert back.rejoined == 1 and back.quota is None    # p3 went; p1 goes out again
    sync_all(a, b, c)
    assert a.snapshot() == b.snapshot() == c.snapshot()
    assert names(a) == {"p1", "p2"}             # p1 came back with c's edit, p3 stays gone
    assert a.sql("SELECT value FROM setting WHERE name = 'p1'") == [("c-work",)]
    assert not c.store.rejoining()


def test_a_copy_of_a_database_made_before_a_collection_loses_the_collected_rows(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "p1", "p2")
    sync_all(a, b)
    copy = tmp_path / "elsewhere" / "a.db"
    copy.parent.mkdir()
    a.cc.execute("VACUUM INTO ?", (str(copy),))
    a.sql("DELETE FROM setting WHERE name = 'p1'")
    sync_all(a, b)
    assert server.collect() == 1

    moved = Device(copy, server, "a")
    moved.transport, _ = keyed(server, "a", a.key)
    moved.sync()
    sync_all(a, b, moved)
    assert names(moved) == {"p2"}
    assert moved.snapshot() == a.snapshot() == b.snapshot()
    assert moved.store.device_id != a.store.device_id
    moved.store.conn.close()


@pytest.mark.parametrize("deleter", ["a", "b"])
def test_a_copy_made_before_ccsync_ran_joins_without_the_rows_collected_meanwhile(tmp_path,
                                                                                deleter):
    """A cc database copied onto a new machine before ccsync ever ran there
    or here joins later, once the rows deleted here meanwhile were collected.
    Its rows predate ccsync (clock 0), and the server, holding no delete of
    them any more, took them alive: every device but the ones that merged
    the delete had them back.  A device that holds them deleted sends the
    delete again, so they go everywhere."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    cc = make_cc_db(tmp_path / "a.db")
    cc.execute("INSERT INTO setting (name, value) VALUES ('x', 'v')")
    cc.execute("INSERT INTO project (name, main_branch) VALUES ('gone', 'main')")
    cc.execute("INSERT INTO setting (name, value) VALUES ('y', 'v')")
    cc.close()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "a.db", tmp_path / "elsewhere" / "c.db")
    a, b = devices(tmp_path, server, "a", "b")
    sync_all(a, b)
    by = {"a": a, "b": b}[deleter]
    by.sql("DELETE FROM setting WHERE name = 'x'")
    by.sql("DELETE FROM project WHERE name = 'gone'")
    for _ in range(3):
        sync_all(a, b)
        server.collect()
    assert not server.conn.execute("SELECT 1 FROM change WHERE tbl IN ('setting', 'project') "
                                   "AND payload LIKE '%gone%'").fetchone()

    (c,) = devices(tmp_path / "elsewhere", server, "c")
    sync_all(c, a, b, c)

    for device in (a, b, c):
        assert names(device) == {"y"} and not device.sql("SELECT name FROM project")
    (late,) = devices(tmp_path, server, "late")
    late.sync()
    assert late.snapshot() == a.snapshot() == b.snapshot() == c.snapshot()


def _copy_before_ccsync(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    cc = make_cc_db(tmp_path / "a.db")
    cc.execute("INSERT INTO setting (name, value) VALUES ('x', 'v')")
    cc.execute("INSERT INTO setting (name, value) VALUES ('y', 'v')")
    cc.close()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "a.db", tmp_path / "elsewhere" / "c.db")
    return server


def test_a_delete_a_pull_finds_the_server_lacks_goes_in_the_same_sync(tmp_path):
    """The delete found to send again comes from the pull, after the push
    leg: it goes in the same sync (a sync that reported success once left it
    pending, the row back on every other device until the next sync, and
    unsent() said nothing waited)."""
    server = _copy_before_ccsync(tmp_path)
    a, b = devices(tmp_path, server, "a", "b")
    sync_all(a, b)
    a.sql("DELETE FROM setting WHERE name = 'x'")
    for _ in range(3):
        sync_all(a, b)
        server.collect()
    (c,) = devices(tmp_path / "elsewhere", server, "c")
    c.sync()

    result = a.sync()                     # merges c's clock-0 'x': sends the delete again

    assert result.quota is None and not result.refused
    assert not a.store.unsent()
    pending = a.store.pending()["setting"]["delete"]
    assert pending == 0, f"a sync that reported success left {pending} delete(s) pending"
    c.sync()
    assert names(c) == names(a) == {"y"}


def test_a_rejoin_sends_no_delete_the_server_still_holds(tmp_path):
    """A rejoin pulls the store from the start, including the clock-0 first
    versions of pre-ccsync rows whose delete the store still holds: the pull
    brings that delete too, so none is sent again (each would be a new
    record, and the row's collection would wait again)."""
    server = _copy_before_ccsync(tmp_path)
    a, b = devices(tmp_path, server, "a", "b")
    sync_all(a, b)
    b.sql("DELETE FROM setting WHERE name = 'x'")
    sync_all(a, b)
    before = server.conn.execute("SELECT count(*) FROM change").fetchone()[0]

    a.store.start_rejoin()
    sent = [a.sync().sent, a.sync().sent]
    sync_all(a, b)

    assert names(a) == names(b) == {"y"}
    tombstones = server.conn.execute(
        "SELECT count(*) FROM change WHERE dev = ? AND clocks LIKE '%\"~\"%'",
        (a.store.device_id,)).fetchone()[0]
    after = server.conn.execute("SELECT count(*) FROM change").fetchone()[0]
    assert sent == [0, 0] and (tombstones, after) == (0, before), \
        f"the rejoin re-sent a delete the store held: {tombstones} new tombstone(s) of a"


def test_a_device_cannot_report_for_another_devices_id(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "p1")
    sync_all(a, b)
    a.sql("DELETE FROM setting")
    a.sync()
    server.note_reader("a", a.transport.author, b.store.device_id, 10 ** 9)
    assert server.collect() == 0
    assert dict(server.conn.execute("SELECT dev, merged FROM reader"))[b.store.device_id] < 10


def test_a_stale_push_stores_nothing(tmp_path):
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "p1", "p2")
    sync_all(a, b)
    old = b.store.cursor
    a.sql("DELETE FROM setting WHERE name = 'p1'")
    clock.now += 31 * DAY
    sync_all(a)
    assert server.collect() == 1
    before = server.stats()
    answer = b.transport.push([], old)
    assert answer["stale"] is True and server.stats() == before
    assert b.transport.pull(old)["stale"] is True


def test_the_running_server_collects_on_its_own(tmp_path, start_server):
    srv = start_server(collect_every=0.1)
    a = Device(tmp_path / "a.db", None, "a")
    b = Device(tmp_path / "b.db", None, "b")
    a.transport = ccsync.Client(srv.url, register(srv, "a"))
    b.transport = ccsync.Client(srv.url, register(srv, "b"))
    settings(a, "p1", "p2")
    sync_all(a, b)
    a.sql("DELETE FROM setting WHERE name = 'p1'")
    sync_all(a, b, rounds=3)
    for _ in range(100):
        if any("collected 1 deleted row" in line for line in srv.lines):
            break
        time.sleep(0.05)
    assert any("collected 1 deleted row" in line for line in srv.lines), srv.lines
    conn = sqlite3.connect(srv.data_path)
    assert conn.execute("SELECT count(*) FROM change WHERE tbl = 'setting'").fetchone() == (1,)
    conn.close()
    assert names(a) == names(b) == {"p2"}
    shutil.rmtree(tmp_path / "a.db", ignore_errors=True)


def test_a_server_that_keeps_saying_stale_gets_one_clear_error(tmp_path):
    """The server may collect again while a device catches up; after a few
    rejoins the sync ends with a clear error (never a loop, never a traceback)."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    (a,) = devices(tmp_path, server, "a")
    settings(a, "p1")
    real_push = a.transport.push
    a.transport.push = lambda records, cursor=None: {"stale": True, "results": [],
                                                     "store": server.store_id}
    try:
        a.sync()
    except ccsync.RemoteError as exc:
        assert exc.kind == "stale" and "nothing was lost" in (exc.hint or "")
    else:
        raise AssertionError("no error")
    a.transport.push = real_push
    assert a.sync().accepted == 1
