"""What a re-seed did not give the server's new store stays on the device
that holds it, through the rejoin that follows and every later one.

A device re-seeding a new store rejoins it (tests/test_reseed_rejoins.py):
rows of its synced state the store does not hand out go.  Some the store
never had: rows it refused (another key's, in plaintext, while that device
is away; a value over its limit), records kept aside for a table this cc
lacks that it refused, settings made local since they synced (a re-seed
leaves them out), records kept here as refused.  Those are noted
(_ccsync_kept) until a pull hands them out; a first version of the rejoin
dropped them, at once or at a later rejoin (a review's findings, each red
then).  Also: the full diff on the device that deleted a listed row.
"""

from __future__ import annotations

import pytest

import ccsync
from conftest import Device, key_author, keyed, make_cc_db
from model_sim import E2E_VAULT
from test_collect import devices, names, settings, sync_all


def forget_and_collect(server, *forgotten) -> int:
    """The server forgets the readers of ``forgotten`` (as --forget-after does)
    and collects."""
    server.conn.executemany("DELETE FROM reader WHERE device = ?", [(n,) for n in forgotten])
    server.conn.commit()
    return server.collect()


# -- 1. rows kept at the re-seed are kept only until the next rejoin starts -----------


def setup_b_holds_only_copy(tmp_path):
    """a, b, c on one (plaintext, keyed) server; after reset-store, a is gone
    for good: b's re-seed of a's rows is refused (another key's), so b holds
    the only copy of a1..a3.  c re-seeds and deletes some of its own rows,
    so the new store has something to collect."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b, c = devices(tmp_path, server, "a", "b", "c")
    settings(a, "a1", "a2", "a3")
    settings(b, "b1")
    settings(c, *(f"c{i}" for i in range(30)))
    sync_all(a, b, c)
    server.reset()                          # a is away for good
    c.sync()                                # c re-seeds the new store first
    c.sql("DELETE FROM setting WHERE name IN ('c27', 'c28', 'c29')")
    sync_all(c)
    return server, a, b, c


def test_a_collect_during_the_rejoin_pull_after_a_reseed_drops_rows_kept_at_it(tmp_path):
    """The pull after b's re-seed is several pages; the store collects c's
    deletes between two of them, so the next page says 'stale' and b starts
    the rejoin again (_start_rejoin): that empties _ccsync_seen, rows kept
    at the re-seed included, and finish_rejoin then deletes a1..a3 here."""
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    pull, swept = b.transport.pull, []

    def collecting_on_second_page(cursor, *args, **kw):
        if cursor > 0 and not swept and b.store.rejoining():
            swept.append(forget_and_collect(server, 'a', 'b'))
        return pull(cursor, *args, **kw)

    b.transport.pull = collecting_on_second_page
    result = b.sync(page_size=5)

    assert result.reseeded > 0 and swept == [3]
    assert names(b) >= {"a1", "a2", "a3"}, "rows only b holds went with the second rejoin"
    assert b.store.kept_here() == 3


def test_the_status_says_which_rows_only_this_device_holds(tmp_path, capsys, monkeypatch):
    for name in list(ccsync.os.environ):        # no server of this machine's own
        if name.startswith(("CC_", "CCSYNC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    assert ccsync.main(["status", "--db", str(b.path)]) == 0
    assert "3 row(s) only this device holds" in capsys.readouterr().out
    a.sync()                                # a is back: its own rows reach the store
    b.sync()
    assert b.store.kept_here() == 0 and names(b) >= {"a1", "a2", "a3"}


def test_a_later_rejoin_drops_rows_the_new_store_refused_at_the_reseed(tmp_path):
    """b keeps a1..a3 at its re-seed (the store refused them), but they are
    in b's synced state as if the store held them: the next time b rejoins
    (away longer than --forget-after: a stale push, _push_rejoining), the
    store hands none of them out and finish_rejoin deletes them here."""
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    assert names(b) >= {"a1", "a2", "a3"}   # the commit's own guarantee holds here
    c.sql("DELETE FROM setting WHERE name IN ('c0', 'c1')")
    sync_all(c)
    assert forget_and_collect(server, 'a', 'b') > 0             # b was away longer than the server keeps deletes
    b.sql("INSERT INTO setting (name, value) VALUES ('b2', 'v')")   # so the push comes first

    b.sync()

    assert names(b) >= {"a1", "a2", "a3"}, "rows only b holds went with a later rejoin"


# -- 2. records kept aside (a table this cc lacks) are re-seeded, but their results
#       are not read: refused (or over quota) they are dropped by the rejoin ----------


def aside_setup(tmp_path, *, quota=None, revoke=False):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"),
                                     **({"quota": quota} if quota else {}))

    def device(name, older=None):
        cc = make_cc_db(tmp_path / f"{name}.db")
        if older:
            cc.executescript(older)
        d = Device(tmp_path / f"{name}.db", server, name)
        d.transport, d.key = keyed(server, name)
        return d

    old = device("old")
    old.sql("INSERT INTO repository (name, path) VALUES ('r', '/src/r')")
    old.sql("INSERT INTO knowledge_index (repository_id, symbol) VALUES (1, 'ledger')")
    old.sync()
    lap = device("lap", older="DROP TABLE knowledge_index;")
    lap.sql("INSERT INTO setting (name, value) VALUES ('lap', 'v')")
    sync_all(lap)
    if revoke:
        server.revoke("old")
    return server, old, lap


def aside(device) -> int:
    return device.store.conn.execute(
        "SELECT count(*) FROM _ccsync_held WHERE kind = 'aside'").fetchone()[0]


def test_records_kept_aside_that_the_new_store_refuses_are_dropped_by_the_rejoin(tmp_path):
    """Like test_rows_another_devices_key_made_stay_here_when_only_this_device_reseeds,
    for a table lap's cc lacks: 'old' (not revoked, just away) wrote the
    knowledge_index row; lap's re-seed of it is refused (old's key), and
    the rejoin deletes lap's only copy (the refused results of the aside
    pushes are never read)."""
    server, old, lap = aside_setup(tmp_path)
    assert aside(lap) == 1
    server.reset()                          # old is away

    result = lap.sync()

    assert result.reseeded > 0 and not lap.store.rejoining()
    assert aside(lap) == 1, "the record only lap kept aside is gone"


def test_records_kept_aside_are_dropped_when_their_reseed_push_is_over_quota(tmp_path):
    """The aside push's quota answer is ignored (the shadow push raises on
    it): the store took none, lap adopts it anyway, and the rejoin drops the
    records kept aside.  'old' is revoked, so a copy would be taken."""
    server, old, lap = aside_setup(tmp_path, revoke=True)
    server.reset()
    push = lap.transport.push

    def quota_full_for_the_aside_push(records, cursor=None):
        if any(r["t"] == "knowledge_index" for r in records):
            server.quota = ccsync.Quota(records=1)      # the shadow went; this one is over
        return push(records, cursor)

    lap.transport.push = quota_full_for_the_aside_push
    with pytest.raises(ccsync.RemoteError) as raised:
        lap.sync()
    assert raised.value.kind == "quota"
    assert lap.store.meta("server_store") != server.store_id     # not adopted: tried again
    assert aside(lap) == 1, "lap adopted a store that took none of its aside records"


# -- 3. a setting made local after it synced: the re-seed skips it, the rejoin deletes it


def test_a_setting_made_local_after_it_synced_is_deleted_by_the_reseed_rejoin(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    (a,) = devices(tmp_path, server, "a")
    a.sql("INSERT INTO setting (name, value) VALUES ('editor', 'vim')")
    a.sync()
    a.sql("INSERT INTO setting (name, value) VALUES (?, 'editor')",
          ccsync.LOCAL_SETTINGS_SETTING)   # from now on 'editor' stays on this machine
    a.sync()
    server.reset()

    a.sync()

    assert a.sql("SELECT value FROM setting WHERE name = 'editor'") == [("vim",)], \
        "a local setting was deleted"


def test_a_setting_made_local_by_the_option_after_it_synced_survives_a_reseed(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    (a,) = devices(tmp_path, server, "a")
    a.sql("INSERT INTO setting (name, value) VALUES ('editor', 'vim')")
    a.sync()
    a.store = ccsync.open_store(str(a.path), local_settings=["editor"])
    server.reset()

    a.sync()

    assert a.sql("SELECT value FROM setting WHERE name = 'editor'") == [("vim",)], \
        "a local setting was deleted"


# -- 4. the full diff on the device that deleted the row, long after its delete synced


@pytest.mark.parametrize("settled", [True, False], ids=["delete-settled", "delete-synced"])
def test_a_full_diff_on_the_deleting_device_does_not_beat_a_real_list_edit(tmp_path, settled):
    """As test_a_full_diff_leaves_a_list_that_lost_only_deleted_ids_as_it_was,
    but the diff runs on the device that deleted 'staging' (a), after its
    delete went out: b's later real edit of the list (prod) must survive."""
    from test_collect_referenced import acme_on_two, newcomer, settle
    server, a, b = acme_on_two(tmp_path, "UPDATE project SET environment_ids = '[1]'")
    a.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('staging', 1, 1, 1, '/y')")
    a.sql("UPDATE project SET environment_ids = '[1,2]'")
    sync_all(a, b)
    a.sql("DELETE FROM environment WHERE name = 'staging'")      # cc leaves the id in the list
    if settled:
        settle(server, a, b)
    else:
        sync_all(a, b)
    b.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('prod', 1, 1, 1, '/p')")
    prod = b.sql("SELECT id FROM environment WHERE name = 'prod'")[0][0]
    b.sql(f"UPDATE project SET environment_ids = '[1,{prod}]'")     # a real edit, on b
    b.sync()
    for (trigger,) in a.sql("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                            "AND tbl_name = 'project'"):
        a.sql(f'DROP TRIGGER "{trigger}"')
    a.store = ccsync.open_store(str(a.path))
    a.sync()                                            # the diff, then the sync
    sync_all(a, b)
    for device in (a, b):
        listed = device.sql("SELECT e.name FROM project p, json_each(p.environment_ids) j "
                            "JOIN environment e ON e.id = j.value")
        assert ("prod",) in listed, (device.path.name, listed)


# -- 5. records refused on apply here (kept for a later version) are not re-seeded --


def test_records_kept_as_refused_here_are_dropped_by_the_reseed_rejoin(tmp_path):
    """b kept one of a's records as refused (_ccsync_held kind 'refused', for
    a later ccsync; made here with Incoming._hold, as _apply_one does for any
    record that cannot apply here).  a is then gone and the store reset: b
    re-seeds its shadow (not that record), and the rejoin deletes b's only
    copy.  Before the change adopt_server only set cursor 0: it was kept."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "a1")
    settings(b, "b1")
    a.sync()
    raw = server.pull(0)["records"][0]
    sync_all(b)
    with b.store._write():
        b.store._hold(dict(raw, id="0" * 32), "refused", "cannot apply here: test")
    server.reset()                          # a is away for good

    b.sync()

    assert b.store.held()["refused"], "the record only b kept went"


# -- 6. more paths through a re-seed that lose nothing --------------------------------


def synced_pair(tmp_path, vault, rows: int):
    """A server and devices a and b (``vault``: end to end), with ``rows``
    settings made on a and synced to b."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    a.transport.vault = b.transport.vault = vault
    settings(a, *(f"s{i}" for i in range(rows)))
    sync_all(a, b)
    return server, a, b


@pytest.mark.parametrize("vault", [None, E2E_VAULT], ids=["plaintext", "e2e"])
def test_a_pull_since_that_meets_a_new_store_finishes_the_rejoin_next_sync(tmp_path, vault):
    server, a, b = synced_pair(tmp_path, vault, 10)
    server.reset()
    a.sync()
    a.sql("DELETE FROM setting WHERE name = 's0'")
    sync_all(a)
    b.sql("INSERT INTO setting (name, value) VALUES ('mine', 'v')")
    b.sync(since="2000-01-01T00:00:00Z")
    assert b.store.rejoining()
    b.sync()
    assert not b.store.rejoining()
    sync_all(a, b)
    assert names(a) == names(b) and "mine" in names(b) and "s0" not in names(b)


@pytest.mark.parametrize("vault", [None, E2E_VAULT], ids=["plaintext", "e2e"])
def test_a_second_reset_during_the_rejoin_pull_loses_nothing(tmp_path, vault):
    server, a, b = synced_pair(tmp_path, vault, 20)
    settings(b, "b1")
    sync_all(a, b)
    server.reset()
    a.sync()                                # the new store holds a's rows: several pages
    pull, resets = b.transport.pull, []

    def reset_on_second_page(cursor, *args, **kw):
        if cursor > 0 and not resets and b.store.rejoining():
            server.reset()
            resets.append(1)
        return pull(cursor, *args, **kw)

    b.transport.pull = reset_on_second_page
    b.sync(page_size=4)
    assert resets
    b.transport.pull = pull
    b.sync()
    assert not b.store.rejoining()
    sync_all(a, b)
    assert names(a) == names(b) == {f"s{i}" for i in range(20)} | {"b1"}


@pytest.mark.parametrize("vault", [None, E2E_VAULT], ids=["plaintext", "e2e"])
def test_a_reseed_cut_short_then_resumed_loses_nothing(tmp_path, vault):
    server, a, b = synced_pair(tmp_path, vault, 40)
    server.reset()
    push, calls = b.transport.push, []

    def fail_second(records, cursor=None):
        calls.append(1)
        if len(calls) == 2:
            raise ccsync.RemoteError("cut").with_kind("network")
        return push(records, cursor)

    b.transport.push = fail_second
    monkey = pytest.MonkeyPatch()
    monkey.setattr(ccsync, "PUSH_BATCH", 5)
    try:
        with pytest.raises(ccsync.RemoteError):
            b.sync()
        assert not b.store.rejoining() and b.store.meta("server_store") != server.store_id
        b.transport.push = push
        b.sync()
    finally:
        monkey.undo()
    assert names(b) == {f"s{i}" for i in range(40)}
    sync_all(a, b)
    assert names(a) == names(b)
