"""A server whose data is lost (or a switch to another server) loses nothing.

Devices notice the new change store by its id, send their synced state again
with its original clocks, and pull everything from the start.
"""

import ccsync
from conftest import Device


def _move_to(devices, server):
    for device in devices:
        device.transport = ccsync.LocalTransport(server, device.name)


def test_devices_reseed_a_rebuilt_server_and_a_new_device_gets_everything(tmp_path, devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/17')")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'main')")
    b.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    b.sql("INSERT INTO setting (name, value) VALUES ('github_pat', 'ghp_secret_x')")
    for device in (a, b, a):
        device.sync()
    a.sql("UPDATE project SET main_branch = 'dev' WHERE name = 'acme'")  # pending at the loss

    rebuilt = ccsync.ServerStore.open(str(tmp_path / "rebuilt.db"))
    _move_to([a, b], rebuilt)
    first = a.sync()
    b.sync()
    a.sync()

    assert first.reseeded > 0
    assert a.snapshot() == b.snapshot()
    assert b.sql("SELECT main_branch FROM project") == [("dev",)]
    c = Device(tmp_path / "c.db", rebuilt, "c")
    c.sync()
    assert c.snapshot() == a.snapshot()
    payloads = " ".join(p for (p,) in rebuilt.conn.execute("SELECT payload FROM change"))
    assert "ghp_secret_x" not in payloads
    c.store.conn.close()


def test_reseeding_keeps_the_later_edit(tmp_path, devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sync()
    b.sync()
    b.sql("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    b.sync()
    a.sync()                                   # a now holds b's later edit too

    rebuilt = ccsync.ServerStore.open(str(tmp_path / "rebuilt.db"))
    _move_to([a, b], rebuilt)
    a.sync()
    b.sync()
    a.sync()

    assert a.sql("SELECT value FROM setting") == [("light",)]
    assert b.sql("SELECT value FROM setting") == [("light",)]


def test_same_server_does_not_reseed(devices):
    a, = [devices("a")]
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sync()
    again = a.sync()
    assert again.reseeded == 0 and again.sent == 0 and again.pulled.received == 0
