"""A record's author is the device that holds the key its id was made under.

Every device id starts with its key's prefix; the server takes new edits
under an id only from that key, refuses records under another registered
device's ids, and takes copies of edits under ids no current key owns (a
re-seed hands them back with their original authors).
"""

from __future__ import annotations

import ccsync
from conftest import Device, key_author, keyed
from test_transport import register, srv, start_server  # noqa: F401  (fixtures)


def pair(tmp_path, server):
    a = Device(tmp_path / "a.db", server, "a")
    b = Device(tmp_path / "b.db", server, "b")
    (a.transport, _), (b.transport, _) = keyed(server, "a"), keyed(server, "b")
    return a, b


def test_device_ids_carry_their_key_prefix_and_the_server_keeps_them(tmp_path, server):
    a, b = pair(tmp_path, server)
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sync()
    assert ccsync.author_of(a.store.device_id) == a.transport.author
    assert {dev for (dev,) in server.conn.execute("SELECT dev FROM change")} == \
        {a.store.device_id}
    b.sync()
    assert b.snapshot() == a.snapshot()


def test_a_record_under_another_devices_id_is_refused(tmp_path, server):
    a, b = pair(tmp_path, server)
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sync()
    b.sync()
    record = server.pull(0)["records"][0]
    forged = {**record, "c": {c: h + 10 ** 9 for c, h in record["c"].items()},
              "p": {**record["p"], "v": {**record["p"]["v"], "value": "evil"}}}

    answer = b.transport.push([forged])

    assert answer["results"][0]["status"] == "refused"
    assert "'a'" in answer["results"][0]["reason"]
    assert server.pull(0)["records"] == [record]
    b.sync()
    assert b.sql("SELECT value FROM setting WHERE name = 'theme'") == [("dark",)]


def test_a_new_key_gives_a_new_device_id_and_edits_kept_under_the_old_one_still_go(
        tmp_path, server):
    a, b = pair(tmp_path, server)
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'main')")
    a.sync()
    b.sync()
    old = a.store.device_id
    a.transport, _ = keyed(server, "a", server.register("a", rotate=True))
    a.sql("UPDATE project SET main_branch = 'dev' WHERE name = 'acme'")

    a.sync()
    b.sync()

    assert a.store.device_id != old and old in a.store.own_ids()
    assert ccsync.author_of(a.store.device_id) == a.transport.author
    assert b.sql("SELECT main_branch FROM project") == [("dev",)]


def test_a_reseed_keeps_the_original_authors_and_nobody_edits_under_them(tmp_path, server):
    a, b = pair(tmp_path, server)
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'main')")
    b.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    for device in (a, b, a):
        device.sync()
    authors = {a.store.device_id, b.store.device_id}

    rebuilt = ccsync.ServerStore.open(str(tmp_path / "rebuilt.db"))
    (a.transport, _), (b.transport, _) = keyed(rebuilt, "a"), keyed(rebuilt, "b")
    a.sync()                            # hands back b's edit too, under b's old id
    b.sync()
    a.sync()

    kept = {dev for (dev,) in rebuilt.conn.execute("SELECT dev FROM change")}
    assert authors <= kept
    assert a.snapshot() == b.snapshot()
    assert ccsync.author_of(b.store.device_id) == b.transport.author
    b.sql("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    b.sync()
    a.sync()
    assert a.sql("SELECT value FROM setting WHERE name = 'theme'") == [("light",)]
    new_edit = rebuilt.conn.execute("SELECT dev FROM change WHERE clocks LIKE '%value%' "
                                    "ORDER BY seq DESC LIMIT 1").fetchone()[0]
    assert new_edit == b.store.device_id
    rebuilt.conn.close()


def test_a_revoked_devices_edits_can_be_handed_back_by_others(tmp_path, server):
    a, b = pair(tmp_path, server)
    b.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    b.sync()
    a.sync()
    record = server.pull(0)["records"][0]
    assert a.transport.push([record])["results"][0]["status"] == "refused"
    server.revoke("b")
    assert a.transport.push([record])["results"][0]["status"] == "superseded"


def test_over_http_the_authenticated_key_decides(srv, tmp_path):
    key_a, key_b = register(srv, "a"), register(srv, "b")
    a = Device(tmp_path / "a.db", None, "a")
    a.transport = ccsync.Client(srv.url, key_a)
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sync()
    client_b = ccsync.Client(srv.url, key_b)
    record = client_b.pull(0)["records"][0]

    answer = client_b.push([{**record, "c": {"value": record["c"]["value"] + 1}}])

    assert answer["results"][0]["status"] == "refused"
    assert record["dev"] == a.store.device_id
    assert ccsync.author_of(record["dev"]) == key_author(key_a)
    client_b.close()
