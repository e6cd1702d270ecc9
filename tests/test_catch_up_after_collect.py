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


def behind_the_mark(tmp_path, rows: int, deleted: int):
    """Devices a and b with ``rows`` settings; b's cursor set back, then a
    deletes ``deleted`` of them and the server collects them while b is
    away (not counted): b is stale."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(a, *(f"s{i}" for i in range(rows)))
    sync_all(a, b)
    b.store.conn.execute("UPDATE _ccsync_meta SET value = '5' WHERE key = 'cursor'")
    a.sql(f"DELETE FROM setting WHERE name IN ({','.join('?' * deleted)})",
          *(f"s{i}" for i in range(1, deleted + 1)))
    a.sync()
    server.conn.execute("DELETE FROM reader WHERE device = 'b'")   # b away for weeks
    server.conn.commit()
    assert server.collect() == deleted
    assert server.stale(b.store.cursor)
    return server, a, b


def test_a_device_behind_the_mark_rejoins_over_many_pages(tmp_path):
    server, a, b = behind_the_mark(tmp_path, 300, 3)
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


def legs(calls: list[tuple]) -> list[list[tuple]]:
    """Progress calls, one list per leg in the order the legs ran."""
    out: list[list[tuple]] = []
    for leg, done, total in calls:
        if not out or out[-1][0][0] != leg:
            out.append([])
        out[-1].append((leg, done, total))
    return out


def test_a_pull_counts_its_own_records_and_only_the_others_left(tmp_path):
    """The pull leg's total leaves out the records this device pushed (the
    server does not send them back), and a sync's second pull (after a
    rejoin and the push) counts from 0 again: its rate and time left hold."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    settings(b, *(f"b{i}" for i in range(120)))
    b.push()
    settings(a, *(f"a{i}" for i in range(200)))
    calls: list[tuple] = []
    a.sync(page_size=PAGE, progress=lambda *call: calls.append(call))
    (pull,) = [leg for leg in legs(calls) if leg[0][0] == "pull"]
    assert pull[-1][1:] == (120, 120), pull
    assert all(total is None or total <= 120 for _leg, _done, total in pull), pull


def test_a_second_pull_in_one_sync_counts_from_zero(tmp_path):
    server, a, b = behind_the_mark(tmp_path, 200, 2)
    settings(b, "new on b")                 # so that the push leg shows between
    calls: list[tuple] = []
    b.sync(page_size=PAGE, progress=lambda *call: calls.append(call))
    pulls = [leg for leg in legs(calls) if leg[0][0] == "pull"]
    # The push finds b stale: it rejoins (a pull of everything), pushes, pulls.
    assert [leg[0][0] for leg in legs(calls)] == ["stamp", "push", "pull", "push", "pull"], calls
    assert pulls[0][-1][1] >= 198                       # the rejoin: everything
    assert all(done <= 1 for _leg, done, _total in pulls[1]), pulls[1]


def test_what_a_pull_has_left_leaves_out_the_spared_ranges():
    assert ccsync._left(100, 200, []) == 100
    assert ccsync._left(100, 200, [[90, 120], [150, 160], [190, 250]]) == 100 - 20 - 11 - 11
    assert ccsync._left(100, 200, [[1, 100]]) == 100
    assert ccsync._left(100, 200, [[101, 200]]) == 0
