"""End-to-end encryption and ``status --verify``, as users meet them.

The real server process and the real CLI: devices set up with a sync
passphrase, a store made by today's plaintext version migrated, a wrong
passphrase, a device without one, a new passphrase after a lost one, and
machines that agree or differ.  The server's file (and its -wal) is read
byte by byte for anything a device wrote.  In-process tests cover what the
server takes and hands out: keyed row ids, forged batches, proofs.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
from pathlib import Path

import pytest

import ccsync
from conftest import content, key_author, make_cc_db
from e2e_helpers import (TEST_PASSPHRASE, Device, ServerProcess, assert_error, assert_ok,
                         hand_env, vault_line)

# Values, names and settings no ciphertext or metadata may show.
MARKERS = ("PROJ-aurora-7731", "github.com/acme/SECRET-REPO", "NOTE-switched-for-QA-4412",
           "SETTING-NAME-flux", "SETTING-VALUE-quartz", "DBNAME-ledger-0099")


def _fill(dev: Device) -> None:
    dev.sql("INSERT INTO project (name) VALUES (?)", MARKERS[0])
    dev.sql("INSERT INTO repository (name, origin_url, path) VALUES ('r', ?, '/src/r')",
            MARKERS[1])
    dev.sql("INSERT INTO setting (name, value) VALUES (?, ?)", MARKERS[3], MARKERS[4])
    dev.sql("INSERT INTO database (name) VALUES (?)", MARKERS[5])
    pid = dev.value("SELECT id FROM project WHERE name = ?", MARKERS[0])
    dev.sql("INSERT INTO environment (project_id, name) VALUES (?, 'dev')", pid)
    eid = dev.value("SELECT id FROM environment")
    dev.sql("INSERT INTO switch_log (environment_id, switched_at, note) VALUES "
            "(?, '2026-11-30T10:00:00', ?)", eid, MARKERS[2])


def server_bytes(data: Path) -> bytes:
    """The server's file and its -wal, as a disk thief would copy them."""
    return b"".join(p.read_bytes() for p in (data, Path(f"{data}-wal")) if p.exists())


def plaintext_found(data: Path) -> list[str]:
    raw = server_bytes(data)
    return [m for m in MARKERS if m.encode() in raw]


@pytest.fixture
def world(tmp_path):
    """A running server and a device factory (each device registered)."""
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    made: list[Device] = []

    def device(name: str, *, setup: bool = True, env: dict | None = None) -> Device:
        """The first device runs `setup`; later ones copy its .env (with their own
        key), as the README says a user may: scrypt costs 0.4 s a setup."""
        dev = Device(tmp_path, name)
        dev.key = srv.register(name)
        first = next((d for d in made if d.env_file.exists()), None)
        if setup and first is None:
            assert_ok(dev.cli("setup", "--server", srv.url, "--api-key", dev.key, env=env))
        elif setup:
            dev.env_file.write_text(f"CCSYNC_SERVER={srv.url}\nCCSYNC_API_KEY={dev.key}\n"
                                    f"CCSYNC_E2E_KEY={vault_line(first)}\n")
        made.append(dev)
        return dev

    try:
        yield srv, device
    finally:
        for dev in made:
            dev.close()
        assert srv.stop() == 0, srv.log
        assert "Traceback" not in srv.log, srv.log


def test_after_a_sync_the_server_file_holds_no_value_name_or_setting(world):
    srv, device = world
    lap = device("lap", env={"CCSYNC_SCRYPT_N": ""})   # the default cost, as users have it
    desk = device("desk")
    _fill(lap)
    assert_ok(lap.cli("sync"))
    assert_ok(desk.cli("sync"))
    assert desk.content() == lap.content()             # the data arrived, and reads back
    assert desk.value("SELECT value FROM setting WHERE name = ?", MARKERS[3]) == MARKERS[4]
    assert plaintext_found(srv.data) == []              # the running server's file and -wal
    status = desk.json("status")["server"]
    assert status["e2e"] == "on", status
    srv.stop()
    assert plaintext_found(srv.data) == []
    with sqlite3.connect(srv.data) as conn:            # keyed row ids: no natural id shows
        sids = {sid for (sid,) in conn.execute("SELECT sid FROM change")}
        assert sids and all(s.startswith("e") and len(s) == 41 for s in sids)
        assert ccsync.natural_id("setting", [MARKERS[3]]) not in sids
        assert ccsync.natural_id("project", [MARKERS[0]]) not in sids
        params = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'e2e'").fetchone()[0])
    # What the server keeps lets a guess be tested only at scrypt's full cost.
    assert params["kdf"] == "scrypt" and params["n"] >= 2 ** 17 and params["r"] >= 8
    assert TEST_PASSPHRASE.encode() not in server_bytes(srv.data)


OLD_CHANGE_TABLE = """
CREATE TABLE change (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, sid TEXT NOT NULL,
    dev TEXT NOT NULL, clocks TEXT NOT NULL, payload TEXT NOT NULL,
    received_at TEXT NOT NULL, device TEXT);
"""


def _plaintext_store(path: Path, tmp: Path) -> tuple[str, str]:
    """A store as the plaintext version made it: its change table without
    the batch columns, secure_delete off (SQLite's default), and records
    pushed, superseded and deleted, so freed pages hold plaintext too.
    Returns the API keys of 'lap' and 'desk'."""
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_CHANGE_TABLE)
    server = ccsync.ServerStore.open(str(path))
    server.conn.execute("PRAGMA secure_delete = OFF")  # as the plaintext version wrote
    keys = {name: server.register(name) for name in ("lap", "desk")}
    cc = make_cc_db(tmp / "old_lap.db")
    store = ccsync.open_store(str(tmp / "old_lap.db"))
    transport = ccsync.LocalTransport(server, "lap", author=key_author(keys["lap"]))
    cc.execute("INSERT INTO project (name) VALUES (?)", (MARKERS[0],))
    cc.execute("INSERT INTO setting (name, value) VALUES (?, 'old-value')", (MARKERS[3],))
    cc.execute("INSERT INTO database (name) VALUES (?)", (MARKERS[5],))
    ccsync.sync_once(store, transport)
    cc.execute("UPDATE setting SET value = ? WHERE name = ?", (MARKERS[4], MARKERS[3]))
    cc.execute("DELETE FROM database")
    ccsync.sync_once(store, transport)
    store.conn.close()
    cc.close()
    server.conn.close()
    return keys["lap"], keys["desk"]


def test_a_store_made_in_plaintext_migrates_and_its_plaintext_is_gone(tmp_path):
    data = tmp_path / "server.db"
    key_lap, key_desk = _plaintext_store(data, tmp_path)
    assert set(plaintext_found(data)) >= {MARKERS[0], MARKERS[3], MARKERS[4]}   # it can fail
    srv = ServerProcess(data, tmp_path / "server_home")
    srv.start()
    try:
        desk = Device(tmp_path, "desk")              # a device of the plaintext days
        desk.env_file.write_text(f"CC_SERVER={srv.url}\nCC_API_KEY={key_desk}\n")
        assert_ok(desk.cli("sync"))
        assert desk.value("SELECT value FROM setting WHERE name = ?", MARKERS[3]) == MARKERS[4]
        desk.sql("UPDATE setting SET value = 'desk-edit-pending' WHERE name = ?", MARKERS[3])
        assert_ok(desk.cli("stamp"))                  # captured; pushed only after the migration

        lap = Device(tmp_path, "lap")                 # a new machine, set up with a passphrase
        out = assert_ok(lap.cli("setup", "--server", srv.url, "--api-key", key_lap)).stdout
        assert "plaintext" in out and "next sync" in out
        assert_ok(lap.cli("sync"))
        assert names(lap, "project") == {MARKERS[0]}
        assert plaintext_found(data) == [], "plaintext left in the server's file or WAL"

        # The plaintext device is told what to do, and loses nothing meanwhile.
        assert_error(desk.cli("sync"), 1, "no sync passphrase", "ccsync setup")
        assert "no sync passphrase" in desk.json("status")["server"]["e2e"]
        assert_ok(desk.cli("setup", "--server", srv.url, "--api-key", key_desk))
        assert_ok(desk.cli("sync"))
        assert_ok(lap.cli("sync"))
        assert lap.value("SELECT value FROM setting WHERE name = ?",
                         MARKERS[3]) == "desk-edit-pending"
        assert lap.content() == desk.content()
        assert plaintext_found(data) == []
        desk.close()
        lap.close()
    finally:
        assert srv.stop() == 0, srv.log
    assert plaintext_found(data) == []
    assert "Traceback" not in srv.log, srv.log


def names(dev: Device, table: str) -> set[str]:
    return {n for (n,) in dev.sql(f'SELECT name FROM "{table}"')}


def test_a_wrong_passphrase_is_caught_at_setup_before_anything_is_pushed(world):
    srv, device = world
    lap = device("lap")
    _fill(lap)
    assert_ok(lap.cli("sync"))
    desk = device("desk", setup=False)
    before = srv.devices()
    desk.sql("INSERT INTO project (name) VALUES ('desk-only')")
    err = assert_error(desk.cli("setup", "--server", srv.url, "--api-key", desk.key,
                                env={"CCSYNC_PASSPHRASE": "not the passphrase"}), 1,
                       "passphrase does not match", "first device")
    assert desk.key not in err
    assert not desk.env_file.exists()                  # nothing saved
    assert_error(desk.cli("sync"), 1, "not configured")
    after = srv.devices()
    assert after["desk"]["records"] == 0 == before["desk"]["records"]
    assert after["lap"]["records"] == before["lap"]["records"]
    # The right one works, from a file too.
    secret = desk.home / "passphrase.txt"
    secret.write_text(TEST_PASSPHRASE + "\n")
    assert_ok(desk.cli("setup", "--server", srv.url, "--api-key", desk.key,
                       "--passphrase-file", secret, env={"CCSYNC_PASSPHRASE": ""}))
    assert_ok(desk.cli("sync"))
    assert names(desk, "project") == {MARKERS[0], "desk-only"}


def test_setup_needs_a_passphrase_when_not_interactive(world):
    srv, device = world
    dev = device("lap", setup=False)
    assert_error(dev.cli("setup", "--server", srv.url, "--api-key", dev.key,
                         env={"CCSYNC_PASSPHRASE": ""}), 2, "passphrase", "--passphrase-file")
    assert_error(dev.cli("setup", "--server", srv.url, "--api-key", dev.key,
                         env={"CCSYNC_PASSPHRASE": "short"}), 2, "at least 8")
    assert not dev.env_file.exists()


def test_a_new_passphrase_costs_128_mib_of_scrypt_unless_the_user_asks_for_less(world):
    srv, device = world
    lap, desk = device("lap", setup=False), device("desk", setup=False)
    for bad in ("1000", "512", "lots", "\u00b2", "9" * 5000, "1048576"):  # 1 GiB: refused
        assert_error(lap.cli("setup", "--server", srv.url, "--api-key", lap.key,
                             env={"CCSYNC_SCRYPT_N": bad}), 2, "CCSYNC_SCRYPT_N", "power of two")
    assert not lap.env_file.exists()
    client = ccsync.Client(srv.url, lap.key)
    try:
        assert not client.hello().get("e2e")                 # nothing chosen yet
    finally:
        client.close()
    assert_ok(lap.cli("setup", "--server", srv.url, "--api-key", lap.key,
                      env={"CCSYNC_SCRYPT_N": ""}))
    vault = ccsync.Vault.parse(vault_line(lap))
    assert (vault.n, vault.r, vault.p) == (ccsync.SCRYPT_N, ccsync.SCRYPT_R, ccsync.SCRYPT_P)
    # A later device derives at the store's cost, whatever it would ask for.
    assert_ok(desk.cli("setup", "--server", srv.url, "--api-key", desk.key))
    assert ccsync.Vault.parse(vault_line(desk)) == vault


def test_a_lost_passphrase_is_replaced_from_a_device_that_has_the_data(world):
    srv, device = world
    lap, desk = device("lap"), device("desk")
    _fill(lap)
    assert_ok(lap.cli("sync"))
    assert_ok(desk.cli("sync"))
    desk.sql("INSERT INTO project (name) VALUES ('desk-edit-before-rekey')")
    new = {"CCSYNC_PASSPHRASE": "a brand new passphrase"}
    out = assert_ok(lap.cli("setup", "--server", srv.url, "--api-key", lap.key,
                            "--new-passphrase", env=new)).stdout
    assert "new sync passphrase" in out
    err = assert_error(desk.cli("sync"), 1, "passphrase is not the one", "ccsync setup")
    assert "Traceback" not in err
    assert_error(desk.cli("setup", "--server", srv.url, "--api-key", desk.key), 1,
                 "does not match")                        # the old passphrase opens nothing now
    assert_ok(desk.cli("setup", "--server", srv.url, "--api-key", desk.key, env=new))
    assert_ok(desk.cli("sync"))
    assert_ok(lap.cli("sync"))
    assert "desk-edit-before-rekey" in names(lap, "project")
    assert lap.content() == desk.content()
    assert plaintext_found(srv.data) == []


def test_status_verify_says_which_machines_agree_and_which_differ(world):
    srv, device = world
    lap, desk = device("lap"), device("desk")
    device("pi")                                         # registered, never synced
    _fill(lap)
    assert_ok(lap.cli("sync"))
    assert_ok(desk.cli("sync"))
    assert_ok(lap.cli("sync"))                           # both at the same cursor now
    report = lap.json("status", "--verify")["verify"]
    states = {d["device"]: d["state"] for d in report["devices"]}
    assert states == {"desk": "agrees", "pi": "has not reported"}, report
    text = assert_ok(lap.cli("status", "--verify")).stdout
    assert "desk" in text and "agrees" in text and "pi: has not reported" in text

    # A change that never made it out (a lost capture, as a bug would lose it):
    desk.sql("UPDATE project SET name = 'renamed-on-desk-only'")
    desk.sql("DELETE FROM _ccsync_dirty")
    proc = desk.cli("status", "--verify")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "lap" in proc.stdout and "differs" in proc.stdout
    data = json.loads(desk.cli("status", "--verify", "--json").stdout)
    assert {d["device"]: d["state"] for d in data["verify"]["devices"]}["lap"] == "differs"

    # An edit still pending is said, not compared.
    lap.sql("INSERT INTO project (name) VALUES ('pending-on-lap')")
    assert_ok(lap.cli("stamp"))
    text = assert_ok(lap.cli("status", "--verify")).stdout
    assert "not on the server yet" in text


def test_status_verify_tells_machines_at_other_cursors_apart(world):
    srv, device = world
    lap, desk = device("lap"), device("desk")
    _fill(lap)
    assert_ok(lap.cli("sync"))
    assert_ok(desk.cli("sync"))
    desk.sql("INSERT INTO project (name) VALUES ('newer-on-desk')")
    assert_ok(desk.cli("sync"))                          # desk is ahead of lap's report
    data = desk.json("status", "--verify")["verify"]
    lap_state = {d["device"]: d for d in data["devices"]}["lap"]
    assert lap_state["state"] == "not comparable" and lap_state["cursor"] < data["this"]["cursor"]
    assert_ok(lap.cli("sync"))
    data = lap.json("status", "--verify")["verify"]
    assert {d["device"]: d["state"] for d in data["devices"]} == {"desk": "agrees"}


##### in process: what the server takes and hands out ##########################

@pytest.fixture
def vault():
    return ccsync.Vault.derive("in-process passphrase", b"0123456789abcdef", n=2 ** 10)


def _device(tmp_path, server, name, vault):
    cc = make_cc_db(tmp_path / f"{name}.db")
    store = ccsync.open_store(str(tmp_path / f"{name}.db"))
    key = server.register(name)
    return cc, store, ccsync.LocalTransport(server, name, author=key_author(key), vault=vault)


def test_a_batch_without_the_passphrase_is_refused_whole(tmp_path, server, vault):
    cc, store, transport = _device(tmp_path, server, "lap", vault)
    cc.execute("INSERT INTO project (name) VALUES ('p')")
    ccsync.sync_once(store, transport)
    stored = server.stats()["records"]
    meta = [["project", "e" + "0" * 40, store.device_id, {"name": 10 ** 15}]]
    answer = server.push(meta, device="lap", sealed=(b"x" * 64, "0" * 64))
    assert answer["results"] == [] and answer["e2e"]["check"] == vault.check
    assert "proof" not in answer["e2e"]                  # the proof key never leaves
    assert server.stats()["records"] == stored
    plain = server.push([{"t": "project", "id": "p1", "dev": "x.y", "c": {"name": 1},
                          "p": {"v": {"name": "leak"}}}], device="lap")
    assert plain["results"] == [] and "e2e" in plain    # a plaintext push to it too
    assert server.stats()["records"] == stored
    assert b"leak" not in server_bytes(Path(tmp_path / "server.db"))


def test_a_forged_batch_is_refused_by_devices_and_stops_nothing(tmp_path, server, vault):
    lap = _device(tmp_path, server, "lap", vault)
    desk = _device(tmp_path, server, "desk", vault)
    lap[0].execute("INSERT INTO project (name) VALUES ('real')")
    ccsync.sync_once(lap[1], lap[2])
    # Whoever holds the server's proof key (its operator) forges a batch: it
    # is stored, but no device can open it.
    other = ccsync.Vault.derive("someone else", vault.salt, n=2 ** 10)
    meta, blob, _proof = other.seal_records([{"t": "project", "id": "forged", "dev": "a.b",
                                              "c": {"name": 1}, "p": {"v": {"name": "x"}}}])
    proof = ccsync.batch_proof(vault.proof, blob)
    assert server.push(ccsync.unpack_sealed(meta), device="lap",
                       sealed=(blob, proof))["results"][0]["status"] == "accepted"
    lap[0].execute("INSERT INTO project (name) VALUES ('after')")
    ccsync.sync_once(lap[1], lap[2])
    result = ccsync.sync_once(desk[1], desk[2])
    assert {n for (n,) in desk[0].execute("SELECT name FROM project")} == {"real", "after"}
    assert sum(result.pulled.refused.values()) == 1
    assert "failed authentication" in next(iter(result.pulled.refused))
    assert desk[1].held()["refused"] == {}               # not kept for a later try
    assert content(desk[0]) == content(lap[0])


def test_supersession_and_collection_free_batches(tmp_path, server, vault):
    cc, store, transport = _device(tmp_path, server, "lap", vault)
    cc.execute("INSERT INTO setting (name, value) VALUES ('a', '1')")
    ccsync.sync_once(store, transport)
    def batches() -> tuple[set, set]:
        return ({b for (b,) in server.conn.execute("SELECT id FROM batch")},
                {b for (b,) in server.conn.execute("SELECT batch FROM change")})

    for value in ("2", "3"):
        cc.execute("UPDATE setting SET value = ? WHERE name = 'a'", (value,))
        ccsync.sync_once(store, transport)
    kept, used = batches()
    assert kept == used and len(kept) == 2         # the first (name) and the last (value)
    cc.execute("DELETE FROM setting WHERE name = 'a'")
    ccsync.sync_once(store, transport)
    ccsync.sync_once(store, transport)                   # reports that it merged the delete
    assert server.collect() == 1
    assert server.conn.execute("SELECT count(*) FROM batch WHERE id NOT IN "
                               "(SELECT batch FROM change)").fetchone()[0] == 0
    usage = server.usage("lap")["stored"]
    assert usage == (server.stats()["records"], usage[1]) and usage[1] >= 0


def test_a_page_sends_each_batch_once_and_whole(tmp_path, server, vault):
    cc, store, transport = _device(tmp_path, server, "lap", vault)
    cc.executemany("INSERT INTO project (name) VALUES (?)", [(f"p{i}",) for i in range(250)])
    ccsync.sync_once(store, transport, batch_size=100)   # three batches
    page = server.pull(0, limit=150, check=vault.check)
    assert len(page["blobs"]) == 2 and len(page["refs"]) == 200 and page["more"]
    rest = server.pull(page["cursor"], limit=150, check=vault.check)
    assert len(rest["blobs"]) == 1 and len(rest["refs"]) == 50 and not rest["more"]
    assert server.pull(0, check="0" * 32)["e2e"]["check"] == vault.check
    assert "plaintext" not in server.pull(0, check=vault.check)


def test_the_vault_line_reads_back_and_a_broken_one_is_a_clean_error(vault):
    assert ccsync.Vault.parse(vault.text()) == vault
    with pytest.raises(ccsync.ConfigError, match="CCSYNC_E2E_KEY"):
        ccsync.Vault.parse("e2e1:garbage")
    with pytest.raises(ccsync.WrongPassphrase):
        ccsync.Vault.opening("wrong passphrase", vault.params(), "the server")
    assert ccsync.Vault.opening("in-process passphrase", vault.params(), "s") == vault
    with pytest.raises(ccsync.WireError, match="cost"):  # a server cannot ask for 1 TiB
        ccsync.Vault.opening("x" * 8, {**vault.params(), "n": 2 ** 30}, "s")


def test_a_batch_larger_than_its_records_may_be_is_refused(tmp_path, vault):
    server = ccsync.ServerStore.open(str(tmp_path / "small.db"), max_record=1000)
    cc, store, transport = _device(tmp_path, server, "lap", vault)
    cc.execute("INSERT INTO project (name) VALUES ('p')")
    ccsync.sync_once(store, transport)                   # sets the store's parameters
    meta, blob, proof = vault.seal_records([{"t": "project", "id": "big", "dev": "a.b",
                                            "c": {"name": 1},
                                            "p": {"v": {"name": base64.b64encode(
                                                secrets.token_bytes(3000)).decode()}}}])
    answer = server.push(ccsync.unpack_sealed(meta), device="lap", sealed=(blob, proof))
    assert answer["results"][0]["status"] == "refused"
    assert "larger than 1000 bytes" in answer["results"][0]["reason"]
    server.conn.close()


def test_reset_store_empties_the_store_keeps_the_devices_and_erases_the_data(tmp_path):
    from e2e_helpers import run_cli
    data = tmp_path / "server.db"
    _plaintext_store(data, tmp_path)
    assert plaintext_found(data)
    out = assert_ok(run_cli(tmp_path, "reset-store", "--data", data)).stdout
    assert "empty" in out and "--new-passphrase" in out
    assert plaintext_found(data) == []
    with sqlite3.connect(data) as conn:
        assert conn.execute("SELECT count(*) FROM change").fetchone()[0] == 0
        assert {n for (n,) in conn.execute("SELECT name FROM device")} == {"lap", "desk"}
    assert_error(run_cli(tmp_path, "reset-store", "--data", tmp_path / "none.db"), 1,
                 "no server data")
