"""A device that re-seeds a new server store (after `reset-store`, the move
to end-to-end encryption, or a switch of server) ends up holding what the
store holds.

Its re-seed may reach the new store before another device's delete of a
row is collected there, and its pull after it.  The device then held the
row for good: it pulled from the start, said so (a report of cursor 0
means "I hold nothing collected"), and no page brought the delete, which
had gone.  Adopting the new store starts a rejoin, which lets such a row
go here too; rows the new store refused at the re-seed stay.
"""

from __future__ import annotations

import pytest

import ccsync
from conftest import Device
from model_sim import E2E_VAULT
from test_collect import devices, names, settings, sync_all

VAULTS = pytest.mark.parametrize("vault", [None, E2E_VAULT], ids=["plaintext", "e2e"])


def two(tmp_path, server, vault):
    a, b = devices(tmp_path, server, "a", "b")
    a.transport.vault = b.transport.vault = vault
    return a, b


def collect_between_reseed_and_pull(device, server) -> list[int]:
    """Have ``server`` collect once, forgetting ``device``'s report, when the
    device's first pull from cursor 0 starts (its re-seed is done by then)."""
    pull, swept = device.transport.pull, []

    def collecting_first(cursor, *args, **kw):
        if cursor == 0 and not swept:
            server.conn.execute("DELETE FROM reader WHERE device = ?", (device.name,))
            server.conn.commit()
            swept.append(server.collect())
        return pull(cursor, *args, **kw)

    device.transport.pull = collecting_first
    return swept


@VAULTS
@pytest.mark.parametrize("page", [ccsync.PULL_PAGE, 7])
def test_a_device_reseeding_a_reset_store_lets_rows_collected_there_go(tmp_path, page, vault):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = two(tmp_path, server, vault)
    settings(a, *(f"s{i}" for i in range(30)))
    sync_all(a, b)
    server.reset()                              # the operator's reset-store
    a.sync()                                    # a re-seeds the new store first
    a.sql("DELETE FROM setting WHERE name IN ('s0', 's1', 's2')")
    sync_all(a)
    swept = collect_between_reseed_and_pull(b, server)

    result = b.sync(page_size=page)

    assert result.reseeded > 0 and swept == [3]
    assert not b.store.rejoining()
    assert names(b) == names(a) and len(names(b)) == 27
    sync_all(a, b)
    assert a.snapshot() == b.snapshot()


@VAULTS
def test_a_device_edit_made_before_the_reseed_survives_the_rejoin(tmp_path, vault):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = two(tmp_path, server, vault)
    settings(a, "keep", "gone")
    sync_all(a, b)
    server.reset()
    a.sync()
    a.sql("DELETE FROM setting WHERE name = 'gone'")
    sync_all(a)
    b.sql("UPDATE setting SET value = 'mine' WHERE name = 'keep'")
    b.sql("INSERT INTO setting (name, value) VALUES ('new', 'b')")
    collect_between_reseed_and_pull(b, server)

    b.sync()
    sync_all(a, b)

    assert names(b) == names(a) == {"keep", "new"}
    assert a.sql("SELECT value FROM setting WHERE name = 'keep'") == [("mine",)]


def test_rows_a_new_server_refuses_at_the_reseed_stay_here(tmp_path):
    """A server with a smaller value limit than the old one: what it will
    not take is not lost by the rejoin that follows the re-seed."""
    old = ccsync.ServerStore.open(str(tmp_path / "old.db"))
    a = Device(tmp_path / "a.db", old, "a")
    a.sql("INSERT INTO setting (name, value) VALUES ('small', 'v')")
    a.sql("INSERT INTO setting (name, value) VALUES ('large', ?)", "x" * 400)
    a.sync()
    new = ccsync.ServerStore.open(str(tmp_path / "new.db"), max_value=200)
    a.transport = ccsync.LocalTransport(new, "a")

    result = a.sync()

    assert result.reseeded > 0 and not a.store.rejoining()
    assert names(a) == {"small", "large"}
    late = Device(tmp_path / "late.db", new, "late")
    late.sync()
    assert names(late) == {"small"}
    late.store.conn.close()


def test_a_device_with_nothing_synced_adopts_a_new_store_without_a_rejoin(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    (a,) = devices(tmp_path, server, "a")
    a.sync()
    server.reset()
    a.sync()
    assert not a.store.rejoining() and a.store.meta("server_store") == server.store_id


def test_rows_another_devices_key_made_stay_here_when_only_this_device_reseeds(tmp_path):
    """In plaintext a device may not send another key's edits: its re-seed
    of rows device a made is refused, and while a stays away the new store
    holds none of them.  The rejoin after the re-seed must not take them
    from the one device left holding them."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, "a1", "a2")
    settings(b, "b1")
    sync_all(a, b)
    server.reset()                              # and device a is away (or lost)

    result = b.sync()

    assert result.reseeded > 0 and not b.store.rejoining()
    assert names(b) == {"a1", "a2", "b1"}
    a.sync()                                    # a comes back: its rows reach the store
    sync_all(a, b)
    (late,) = devices(tmp_path, server, "late")
    late.sync()
    assert names(late) == names(a) == names(b) == {"a1", "a2", "b1"}
