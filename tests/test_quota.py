"""Per-device quotas: records and bytes stored, and pushed in an hour.

A push that would take a device past a limit is refused whole (nothing of
it is stored), its rows stay pending, the device says why in `sync` and
`status`, and they go once the limit allows.  Stored usage counts what the
server still holds: superseded versions stop counting.
"""

from __future__ import annotations

import ccsync
from conftest import Device
from e2e_helpers import Device as CliDevice, ServerProcess, assert_error


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def store_with(tmp_path, clock=None, **limits) -> ccsync.ServerStore:
    return ccsync.ServerStore.open(str(tmp_path / "server.db"), quota=ccsync.Quota(**limits),
                                   **({"clock": clock} if clock else {}))


def projects(device: Device, *names: str) -> None:
    for name in names:
        device.sql("INSERT INTO project (name) VALUES (?)", name)


def counted(server: ccsync.ServerStore) -> dict:
    """What the usage table should say: the change table counted afresh."""
    return {device: (n, size) for device, n, size in server.conn.execute(
        "SELECT coalesce(device, ''), count(*), sum(length(payload) + length(clocks)) "
        "FROM change GROUP BY 1")}


def usage_table(server: ccsync.ServerStore) -> dict:
    return {d: (n, b) for d, n, b in server.conn.execute(
        "SELECT device, records, bytes FROM usage WHERE records != 0 OR bytes != 0")}


def test_a_push_past_the_stored_records_quota_is_refused_whole_and_goes_later(tmp_path):
    server = store_with(tmp_path, records=5)
    a = Device(tmp_path / "a.db", server, "a")
    projects(a, "p1", "p2", "p3")
    assert a.push().accepted == 3

    projects(a, "p4", "p5", "p6")
    refused = a.push()

    assert refused.quota and "'a' would store 6 records" in refused.quota
    assert "--quota-records" in refused.quota
    assert server.stats()["records"] == 3
    assert a.store.pending()["project"]["insert"] == 3
    assert "would store 6 records" in a.store.meta("push_refused")

    raised = ccsync.ServerStore(server.conn, quota=ccsync.Quota(records=10))
    a.transport = ccsync.LocalTransport(raised, "a")
    assert a.push().accepted == 3 and a.store.meta("push_refused") is None
    assert usage_table(raised) == counted(raised)


def test_editing_the_same_rows_again_does_not_use_up_the_quota(tmp_path):
    server = store_with(tmp_path, records=2)       # the row as made, and its latest edit
    a = Device(tmp_path / "a.db", server, "a")
    projects(a, "acme")
    a.push()
    for branch in range(10):
        a.sql("UPDATE project SET main_branch = ? WHERE name = 'acme'", f"b{branch}")
        result = a.push()
        assert result.quota is None and result.accepted == 1
    assert usage_table(server) == counted(server)
    assert usage_table(server)["a"][0] == 2


def test_the_hourly_limit_refuses_until_the_hour_has_passed(tmp_path):
    clock = Clock()
    server = store_with(tmp_path, clock=clock, hour_records=4)
    a = Device(tmp_path / "a.db", server, "a")
    projects(a, "p1", "p2", "p3")
    assert a.push().accepted == 3
    projects(a, "p4", "p5")

    a.store.prepare()
    answer = a.transport.push([r for r in a.store.capture(None, 100).records if r])
    assert "would have pushed 5 records in the last hour" in answer["quota"]
    assert 3500 <= answer["retry_after"] <= 3700
    assert a.push().quota is not None

    clock.now += 61 * 60
    assert a.push().accepted == 2


def test_usage_follows_supersession_across_devices(tmp_path):
    server = store_with(tmp_path)
    a = Device(tmp_path / "a.db", server, "a")
    b = Device(tmp_path / "b.db", server, "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    projects(a, "acme", "shop")
    a.sync()
    b.sync()
    b.sql("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    b.sql("DELETE FROM project WHERE name = 'shop'")
    b.sync()
    assert usage_table(server)["b"][0] == 2
    a.sync()
    a.sql("UPDATE setting SET value = 'blue' WHERE name = 'theme'")   # b's edit is superseded
    a.sync()

    assert usage_table(server) == counted(server)
    assert usage_table(server)["b"][0] == 1 and usage_table(server)["a"][0] == 4


def test_a_store_made_before_quotas_counts_its_usage_on_open(tmp_path):
    server = store_with(tmp_path)
    a = Device(tmp_path / "a.db", server, "a")
    projects(a, "p1", "p2")
    a.push()
    server.conn.executescript("DROP TABLE usage; DROP TABLE recent; "
                              "DELETE FROM meta WHERE key = 'usage';")
    server.conn.close()

    reopened = store_with(tmp_path)
    assert usage_table(reopened) == counted(reopened) == {"a": counted(reopened)["a"]}
    reopened.conn.close()


def test_sync_and_status_say_why_the_server_took_no_more(tmp_path):
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start("--quota-records", "2")
    try:
        dev = CliDevice(tmp_path, "laptop")
        dev.setup(srv.url, srv.register("laptop"))
        for name in ("p1", "p2"):
            dev.sql("INSERT INTO project (name) VALUES (?)", name)
        assert dev.json("sync")["accepted"] == 2
        assert srv.devices()["laptop"]["records"] == 2
        dev.sql("INSERT INTO project (name) VALUES ('p3')")

        assert_error(dev.cli("sync"), 1, "took no more of this push", "--quota-records",
                     quiet_stdout=False)

        status = dev.json("status")
        assert "would store 3 records" in status["push_refused"]
        assert status["pending"]["project"]["insert"] == 1
        assert status["server"]["usage"]["limits"]["records"] == 2
        text = dev.ok("status").stdout
        assert "push refused by the server since" in text
        assert "quota: stores 2 records of 2" in text
        assert "stores 2 records" in srv.admin("devices").stdout
        dev.close()
    finally:
        srv.stop()
    assert "Traceback" not in srv.log
