"""A device catching up from the start (a newcomer, a rejoin, `pull --since`)
on a store the server has collected in, over more than one page.

Collection marks how far it may have removed deleted rows; a device that
merged less than that may hold a row whose delete went, so it rejoins: it
pulls everything from the start.  That pull itself sits below the mark
between its pages, and once was taken as stale again at every page: on a
store larger than a page, no device could join or rejoin once the server
had collected (every sync failed with "the server kept saying this device
is stale").  A pull from the start is stale only if rows were removed after
it began.
"""

from __future__ import annotations

import pytest

import ccsync
from test_collect import devices, settings, sync_all

PAGE = 40                      # records a page: the store spans many pages


def collected_store(tmp_path, rows: int = 300, deleted: int = 20):
    """A server whose collection has run past many pages of records, and
    the device a that made them (settings, a table nothing references)."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    (a,) = devices(tmp_path, server, "a")
    settings(a, *(f"s{i}" for i in range(rows)))
    sync_all(a)
    a.sql(f"DELETE FROM setting WHERE name IN ({','.join('?' * deleted)})",
          *(f"s{i}" for i in range(deleted)))
    sync_all(a)
    assert server.collect() == deleted
    assert server.collected_through() > 3 * PAGE
    return server, a


def names(device) -> list[str]:
    return sorted(n for (n,) in device.sql("SELECT name FROM setting"))


def test_a_newcomer_joins_a_store_collected_past_its_first_page(tmp_path):
    server, a = collected_store(tmp_path)
    (late,) = devices(tmp_path, server, "late")
    result = late.sync(page_size=PAGE)
    assert result.pulled.received == 280
    assert names(late) == names(a) and len(names(late)) == 280


def test_a_device_behind_the_mark_rejoins_over_many_pages(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, *(f"s{i}" for i in range(300)))
    sync_all(a, b)
    b.store.conn.execute("UPDATE _ccsync_meta SET value = '5' WHERE key = 'cursor'")
    a.sql("DELETE FROM setting WHERE name IN ('s1', 's2', 's3')")
    a.sync()
    server.conn.execute("DELETE FROM reader WHERE device = 'b'")   # b away for weeks
    server.conn.commit()
    assert server.collect() == 3
    assert server.stale(b.store.cursor)
    b.sync(page_size=PAGE)                          # rejoins: everything from the start
    assert not b.store.rejoining()
    assert names(b) == names(a) and len(names(b)) == 297


def test_a_pull_since_a_time_pages_through_a_collected_store(tmp_path):
    server, a = collected_store(tmp_path)
    result = a.sync(push=False, since="2000-01-01T00:00:00+00:00", page_size=PAGE)
    assert result.pulled.received == 280


@pytest.mark.parametrize("when", [1, 3])
def test_rows_collected_while_a_newcomer_pages_make_it_start_again(tmp_path, when):
    """The one case a pull from the start must be stale: a row it received
    went (with its delete) while it paged, so it would keep it for good.
    (Its report at cursor 0 holds collection back; a round that had worked
    out its horizon before the report still sweeps: that is simulated by
    forgetting the report.)"""
    server, a = collected_store(tmp_path, rows=300, deleted=0)
    a.sql("DELETE FROM setting WHERE name IN ('s0', 's299')")
    sync_all(a)
    (late,) = devices(tmp_path, server, "late")
    pull, pages, swept = late.transport.pull, [], []

    def collecting_meanwhile(*args, **kw):
        pages.append(args)
        if len(pages) == when + 1:      # between two of the newcomer's pages
            server.conn.execute("DELETE FROM reader WHERE device = 'late'")
            server.conn.commit()
            swept.append(server.collect())
        return pull(*args, **kw)

    late.transport.pull = collecting_meanwhile
    late.sync(page_size=PAGE)
    assert swept == [2]
    assert names(late) == names(a) and len(names(late)) == 298
