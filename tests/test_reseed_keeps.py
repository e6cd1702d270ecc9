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

import secrets
import shutil

import pytest

import ccsync
from conftest import Device, keyed, make_cc_db
from model_sim import E2E_VAULT
from test_collect import devices, held, names, settings, sync_all


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


def test_rows_kept_at_a_reseed_survive_a_collect_during_its_rejoin(tmp_path):
    """The pull after b's re-seed is several pages; the store collects c's
    deletes between two of them, so the next page says 'stale' and b starts
    the rejoin again: a1..a3, which only b holds, stay (that second start
    once forgot them, and finish_rejoin deleted them)."""
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


def test_a_later_rejoin_keeps_rows_the_new_store_refused_at_the_reseed(tmp_path):
    """b keeps a1..a3 at its re-seed (the store refused them); they stay in
    b's synced state as if the store held them, so the next time b rejoins
    (away longer than --forget-after: a stale push), the store hands none
    of them out: they stay all the same (they were once deleted then)."""
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    assert names(b) >= {"a1", "a2", "a3"}
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


def test_records_kept_aside_that_the_new_store_refuses_stay(tmp_path):
    """Like test_rows_another_devices_key_made_stay_here_when_only_this_device_reseeds,
    for a table lap's cc lacks: 'old' (not revoked, just away) wrote the
    knowledge_index row; lap's re-seed of it is refused (old's key), and
    lap's only copy stays (the refused results of the aside pushes were
    once not read, and the rejoin deleted it)."""
    server, old, lap = aside_setup(tmp_path)
    assert aside(lap) == 1
    server.reset()                          # old is away

    result = lap.sync()

    assert result.reseeded > 0 and not lap.store.rejoining()
    assert aside(lap) == 1, "the record only lap kept aside is gone"


def test_a_reseed_whose_records_kept_aside_are_over_quota_is_not_adopted(tmp_path):
    """The aside push's quota answer stops the re-seed as the shadow's does:
    the store is not adopted, and the records kept aside stay (the answer
    was once ignored, the store adopted having taken none, and the rejoin
    dropped them).  'old' is revoked, so a copy would be taken."""
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


def test_a_setting_made_local_after_it_synced_survives_the_reseed_rejoin(tmp_path):
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


def test_records_kept_as_refused_here_survive_the_reseed_rejoin(tmp_path):
    """b kept one of a's records as refused (_ccsync_held kind 'refused', for
    a later ccsync; made here with Incoming._hold, as _apply_one does for any
    record that cannot apply here).  a is then gone and the store reset: b
    re-seeds its shadow (not that record), and keeps its only copy through
    the rejoin (a first version of the rejoin deleted it)."""
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


# -- 7. what a device noted of the old store, and how a kept entry leaves -------------


def kept(device) -> set[tuple[str, str]]:
    return {tuple(r) for r in device.store.conn.execute("SELECT tbl, sid FROM _ccsync_kept")}


def sid_of(device, name) -> str:
    return device.sql("SELECT sync_id FROM setting WHERE name = ?", name)[0][0]


def stale_rejoin(server, device, other):
    """``other`` deletes one of its rows; the server forgets ``device`` (and a)
    and collects; ``device`` then syncs with an edit to push: stale, rejoin."""
    other.sql("DELETE FROM setting WHERE name = 'c0'")
    sync_all(other)
    assert forget_and_collect(server, "a", device.name) > 0
    device.sql("INSERT INTO setting (name, value) VALUES (?, 'v')", f"{device.name}-late")
    device.sync()
    assert not device.store.rejoining()


def test_a_device_moved_to_another_server_pulls_every_record_of_it(tmp_path):
    """own_seqs (sequence numbers of this device's acknowledged pushes past
    its cursor) are the old store's: adopting another server forgets them.
    They were once kept, so pulls asked the new server to skip those
    numbers, and b never got a's records that landed on them there.  (A
    reset-store keeps numbering past the old store's; another server
    starts at 1.)"""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, *(f"s{i}" for i in range(40)))
    sync_all(a, b)
    for k in range(400):                            # a long history on the old server
        a.sql("UPDATE setting SET value = ? WHERE name = 's0'", f"x{k}")
        a.push()
    for i in range(1, 40):                          # b's last pushes, not pulled past
        b.sql("UPDATE setting SET value = ? WHERE name = ?", f"b{i}", f"s{i}")
    b.push()
    assert b.store.own_ranges() and b.store.own_ranges()[0][0] > 400
    new = ccsync.ServerStore.open(str(tmp_path / "new.db"))
    a.transport, b.transport = ccsync.LocalTransport(new, "a"), ccsync.LocalTransport(new, "b")
    a.sync()
    b.sync()
    settings(a, *(f"n{i}" for i in range(600)))
    sync_all(a, b)
    assert names(a) - names(b) == set(), f"{len(names(a) - names(b))} rows b never got"


def test_a_kept_row_edited_or_deleted_here_no_longer_counts_as_only_here(tmp_path):
    """b edits a1 and deletes a2 (both go out, accepted): the store now has
    both rows, and their entries go when the push is settled (a device's
    own records are spared from its pulls, so only the ack can tell)."""
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    assert b.store.kept_here() == 3
    b.sql("UPDATE setting SET value = 'edited' WHERE name = 'a1'")
    b.sql("DELETE FROM setting WHERE name = 'a2'")
    result = b.sync()
    assert result.accepted == 2
    sync_all(b)
    assert {"a1", "a2"} <= held(server)
    assert b.store.kept_here() == 1, kept(b)


def test_a_kept_row_edited_here_then_deleted_elsewhere_and_collected_goes_here_too(tmp_path):
    """b's edit of kept a1 reaches the store and c; c deletes a1; b is away
    longer than the server keeps deletes, so the delete is collected before
    b pulls it.  b's rejoin lets a1 go (its kept entry once stayed, and b
    kept a1 for good while c and the store had none)."""
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    b.sql("UPDATE setting SET value = 'edited' WHERE name = 'a1'")
    b.sync()
    c.sync()
    assert c.sql("SELECT value FROM setting WHERE name = 'a1'") == [("edited",)]
    c.sql("DELETE FROM setting WHERE name = 'a1'")
    sync_all(c)

    stale_rejoin(server, b, c)
    sync_all(b, c)

    assert "a1" not in names(c)
    assert "a1" not in names(b), "b keeps a row deleted everywhere else (its kept entry)"


def moved_with_a_large_setting(tmp_path):
    """Device a, end to end, with settings 'small' and 'large' synced, then
    moved to a new server whose --max-record is below 'large' alone: (a, new)."""
    old = ccsync.ServerStore.open(str(tmp_path / "old.db"))
    a = Device(tmp_path / "a.db", old, "a")
    a.transport.vault = E2E_VAULT
    a.sql("INSERT INTO setting (name, value) VALUES ('small', 'v')")
    a.sql("INSERT INTO setting (name, value) VALUES ('large', ?)", secrets.token_hex(5000))
    a.sync()
    new = ccsync.ServerStore.open(str(tmp_path / "new.db"), max_record=3000)
    a.transport = ccsync.LocalTransport(new, "a", vault=E2E_VAULT)
    return a, new


def test_e2e_a_reseed_batch_refused_as_a_whole_goes_again_in_halves(tmp_path):
    """An end-to-end store refuses a sealed batch larger than max_record a
    record on average, every record of it ('its batch is larger than ...',
    not held).  The re-seed tries such a batch again in halves: 'small'
    (fine alone) reaches the store; it once stayed on a only, for good."""
    a, new = moved_with_a_large_setting(tmp_path)

    result = a.sync()
    a.sync()

    assert result.reseeded == 2 and names(a) == {"small", "large"}
    late = Device(tmp_path / "late.db", new, "late")
    late.transport.vault = E2E_VAULT
    late.sync()
    assert "small" in names(late), f"only a holds 'small' (kept: {a.store.kept_here()})"


def test_a_stale_rejoin_keeps_a_setting_made_local_after_it_synced(tmp_path):
    """No reset-store involved.  a makes 'editor' local after it synced and
    sets its own value; b deletes 'editor'.  A normal pull leaves a's local
    setting alone (checked below), but when the delete is collected before a
    pulls it, a's rejoin must leave it too (finish_rejoin -> _vanish once
    deleted it, before this session's changes too)."""
    def world(sub):
        server = ccsync.ServerStore.open(str(sub / "server.db"))
        a, b = devices(sub, server, "a", "b")
        a.sql("INSERT INTO setting (name, value) VALUES ('editor', 'vim')")
        sync_all(a, b)
        a.sql("INSERT INTO setting (name, value) VALUES (?, 'editor')",
              ccsync.LOCAL_SETTINGS_SETTING)
        a.sql("UPDATE setting SET value = 'mine' WHERE name = 'editor'")
        sync_all(a, b)
        b.sql("DELETE FROM setting WHERE name = 'editor'")
        sync_all(b)
        return server, a

    (tmp_path / "pull").mkdir()
    server, a = world(tmp_path / "pull")
    a.sync()
    assert a.sql("SELECT value FROM setting WHERE name = 'editor'") == [("mine",)]

    (tmp_path / "rejoin").mkdir()
    server, a = world(tmp_path / "rejoin")
    assert forget_and_collect(server, "a") > 0
    a.sql("INSERT INTO setting (name, value) VALUES ('later', 'v')")
    a.sync()
    assert a.sql("SELECT value FROM setting WHERE name = 'editor'") == [("mine",)], \
        "the rejoin deleted a local setting"


def test_a_copy_on_another_machine_rejoins_keeping_the_kept_rows(tmp_path):
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    b.store.conn.close()
    shutil.copy(b.path, tmp_path / "copy.db")
    copy = Device(tmp_path / "copy.db", server, "copy")
    copy.transport, copy.key = keyed(server, "copy")
    copy.store.prepare()
    assert copy.store.rejoining()           # _check_device: another path, another machine
    copy.sync()
    assert names(copy) >= {"a1", "a2", "a3"} and copy.store.kept_here() == 3


def test_a_crash_inside_or_before_adopt_loses_nothing(tmp_path, monkeypatch):
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    real = ccsync.Store._rejoin_from_start

    def crash(self):
        raise RuntimeError("crash inside adopt_server")

    monkeypatch.setattr(ccsync.Store, "_rejoin_from_start", crash)
    with pytest.raises(RuntimeError):
        b.sync()
    monkeypatch.setattr(ccsync.Store, "_rejoin_from_start", real)
    assert b.store.kept_here() == 0 and b.store.meta("server_store") != server.store_id
    real_adopt = ccsync.Store.adopt_server
    monkeypatch.setattr(ccsync.Store, "adopt_server",
                        lambda self, *a: (_ for _ in ()).throw(RuntimeError("before adopt")))
    with pytest.raises(RuntimeError):
        b.sync()
    monkeypatch.setattr(ccsync.Store, "adopt_server", real_adopt)
    b.sync()
    assert names(b) >= {"a1", "a2", "a3"} and b.store.kept_here() == 3
    stale_rejoin(server, b, c)
    assert names(b) >= {"a1", "a2", "a3"}


def test_an_end_to_end_kept_row_another_device_hands_out_later_leaves_the_set(tmp_path):
    """The batch refusal above leaves 'large' kept here; another device then
    makes 'large' (the same key, the same id): the page's plaintext id
    matches the kept entry, which goes."""
    a, new = moved_with_a_large_setting(tmp_path)
    a.sync()
    assert kept(a) == {("setting", sid_of(a, "large"))}
    d = Device(tmp_path / "d.db", new, "d")
    d.transport.vault = E2E_VAULT
    d.sync()
    d.sql("INSERT INTO setting (name, value) VALUES ('large', 'd')")
    d.sync()
    a.sync()
    assert kept(a) == set()
    assert a.sql("SELECT value FROM setting WHERE name = 'large'") == [("d",)]


def test_another_device_recreating_a_kept_row_merges_it(tmp_path):
    server, a, b, c = setup_b_holds_only_copy(tmp_path)
    b.sync()
    (d,) = devices(tmp_path, server, "d")
    d.sync()
    d.sql("INSERT INTO setting (name, value) VALUES ('a3', 'from-d')")
    d.sync()
    b.sync()
    assert ("setting", sid_of(b, "a3")) not in kept(b)
    assert b.sql("SELECT value FROM setting WHERE name = 'a3'") == [("from-d",)]
    stale_rejoin(server, b, c)
    sync_all(b, d)
    assert b.sql("SELECT value FROM setting WHERE name = 'a3'") == [("from-d",)]


def test_status_works_on_a_database_of_bookkeeping_6(tmp_path, capsys, monkeypatch):
    """status opens a database without setting it up: one of the version
    before (no _ccsync_kept yet) failed with 'no such table'."""
    for name in list(ccsync.os.environ):
        if name.startswith(("CC_", "CCSYNC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    (a,) = devices(tmp_path, server, "a")
    settings(a, "s")
    a.sync()
    a.sql("DROP TABLE _ccsync_kept")
    a.sql("UPDATE _ccsync_meta SET value = '6' WHERE key = 'bookkeeping'")
    a.store.conn.close()
    assert ccsync.main(["status", "--db", str(a.path), "--json"]) == 0
    assert ccsync.json.loads(capsys.readouterr().out)["only_here"] == 0
    a.store = ccsync.open_store(str(a.path))
    a.sync()                                # the upgrade makes the table
    assert a.store.kept_here() == 0 and a.store.meta("bookkeeping") == ccsync.BOOKKEEPING_VERSION


def test_a_push_refused_for_its_batch_size_goes_again_in_smaller_batches(tmp_path):
    """End to end, a server with a small --max-record refuses a sealed batch
    too large as a whole, every record of it: the rows that fit alone go in
    smaller batches; only the one too large stays pending, refused."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), max_record=3000)
    a = Device(tmp_path / "a.db", server, "a")
    a.transport.vault = E2E_VAULT
    a.sql("INSERT INTO setting (name, value) VALUES ('small', 'v')")
    a.sql("INSERT INTO setting (name, value) VALUES ('large', ?)", secrets.token_urlsafe(12000))
    a.sql("INSERT INTO setting (name, value) VALUES ('other', 'v')")

    result = a.sync()

    assert result.accepted == 2 and sum(result.refused.values()) == 1
    assert [r["sync_id"] for r in a.store.refused()] == [sid_of(a, "large")]
    late = Device(tmp_path / "late.db", server, "late")
    late.transport.vault = E2E_VAULT
    late.sync()
    assert names(late) == {"small", "other"}


def test_a_setting_deleted_before_it_ever_synced_is_reseeded(tmp_path):
    """Its delete went out by id alone (the name may be a secret's), so its
    synced state has no name: the re-seed (and a rejoin) read that as a
    setting to leave out, and failed on the missing name (KeyError), every
    sync.  Found by the model hunt once it reset the server."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "kept")
    sync_all(a, b)
    a.sql("INSERT INTO setting (name, value) VALUES ('brief', 'v')")
    a.sql("DELETE FROM setting WHERE name = 'brief'")
    sync_all(a, b)
    assert a.store.conn.execute("SELECT 1 FROM _ccsync_shadow WHERE tbl = 'setting' "
                                "AND vals = '{}'").fetchone()
    server.reset()

    result = a.sync()
    sync_all(a, b)

    assert result.reseeded > 0 and names(a) == names(b) == {"kept"}


class BatchHostile:
    """A transport whose push refuses every batch of more than one record for
    its size (``"batch": true``), as a hostile (or e2e, max_record-bound) server may."""

    def __init__(self, inner, limit=60):
        self.inner, self.pushes, self.limit = inner, 0, limit
        self.author = getattr(inner, "author", None)

    def push(self, records, cursor=None):
        self.pushes += 1
        if self.pushes > self.limit:
            raise RuntimeError(f"push_changes looped: {self.pushes} pushes of "
                               f"{len(records)} records at one position")
        if len(records) > 1:
            return {"results": [{"status": "refused", "reason": "too large", "batch": True}
                                for _ in records]}
        return self.inner.push(records, cursor)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_batch_refused_whole_at_size_one_does_not_loop(tmp_path):
    """A batch the server refuses for its size goes again in halves of rows,
    down to one row; one outbox row (edits kept from a row a delete removed)
    is one record per own device id, so at one row the refusal stands (it
    once halved by records and sent the same two forever)."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'main')")
    sync_all(a, b)
    a.transport, _ = keyed(server, "a", server.register("a", rotate=True))
    a.sql("UPDATE project SET main_branch = 'dev' WHERE name = 'acme'")
    b.sql("DELETE FROM project WHERE name = 'acme'")
    b.sync()
    a.pull()                                  # the delete removes a's unsent edit: outbox
    assert len(a.store.conn.execute("SELECT * FROM _ccsync_outbox").fetchall()) == 1
    first = a.store.capture(None, 1)
    assert len([r for r in first.records if r is not None]) == 2   # one row, two records

    hostile = BatchHostile(a.transport)
    result = ccsync.SyncResult()
    ccsync.push_changes(a.store, hostile, result, batch_size=1)
    assert hostile.pushes < 10
