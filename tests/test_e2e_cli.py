"""End to end: the real ``ccsync.py server`` and the real CLI, as subprocesses.

Each test gets its own server process (127.0.0.1, ephemeral port, its own data
file) and devices that are separate HOME folders, each with a cc database built
from cc's real schema.  cc's own edits are made with plain sqlite3 connections.
The server must stop on SIGTERM with exit code 0 and say "stopped".
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import stat
import time
import urllib.request

import pytest

from e2e_helpers import (TEST_PASSPHRASE, Device, ServerProcess, assert_error, assert_ok,
                         dead_port, hand_env, parse_utc, run_cli, utc_now_iso, vault_line,
                         wait_for_clock_tick)

SYNC_KEYS = {"sent", "accepted", "superseded", "refused", "received", "applied"}
ZERO = {"insert": 0, "update": 0, "delete": 0}


##### fixtures #################################################################

@pytest.fixture
def server(tmp_path):
    """A running server; torn down with SIGTERM, which must exit 0 and log "stopped"."""
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "stopped" in srv.log, srv.log
    assert "Traceback" not in srv.log, srv.log


@pytest.fixture
def device(tmp_path):
    """A factory for unconfigured devices: device('laptop') -> Device."""
    made: list[Device] = []

    def make(name: str) -> Device:
        made.append(Device(tmp_path, name))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


@pytest.fixture
def connected(server, device):
    """A factory: register each name on the server, configure a new device for it.

    The first device of a test runs `setup`; the others get the .env by hand,
    as the README says a user may (setup's scrypt costs 0.4 s a device)."""
    configured: list[Device] = []

    def make(*names: str):
        out = []
        for name in names:
            dev = device(name)
            dev.key = server.register(name)
            if configured:
                dev.env_file.write_text(f"CC_SERVER={server.url}\nCC_API_KEY={dev.key}\n"
                                        f"CCSYNC_E2E_KEY={vault_line(configured[0])}\n")
            else:
                assert dev.setup(server.url, dev.key)["device"] == name
            configured.append(dev)
            out.append(dev)
        return out if len(out) > 1 else out[0]

    return make


##### helpers ##################################################################

def sync_all(*devs: Device, command: str = "sync") -> list[dict]:
    results = []
    for dev in devs:
        result = dev.json(command)
        assert SYNC_KEYS <= set(result), result
        assert result["refused"] == {} and result.get("rejected", {}) == {}, result
        results.append(result)
    return results


def names(dev: Device, table: str) -> set[str]:
    return {n for (n,) in dev.sql(f'SELECT name FROM "{table}"')}


def assert_converged(*devs: Device) -> dict:
    first = devs[0].content()
    for other in devs[1:]:
        assert other.content() == first, (devs[0].name, other.name)
    return first


def unhealthy_status(dev: Device, **kw) -> dict:
    """``status --json`` where the server cannot be used: exit 1, the report on stdout."""
    proc = dev.cli("status", "--json", **kw)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def nothing_pending(dev: Device) -> bool:
    return all(counts == ZERO for counts in dev.json("status")["pending"].values())


def file_state(path) -> tuple | None:
    if not path.exists():
        return None
    info = path.stat()
    return path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_mtime_ns


##### server lifecycle and the device registry #################################

def test_server_serves_health_and_stops_on_sigterm(server):
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read())["status"] == "ok"
    assert server.stop() == 0
    assert "stopping (SIGTERM)" in server.log and "stopped" in server.log
    assert not server.running


def test_second_server_on_a_busy_port_fails_cleanly(server, tmp_path):
    proc = run_cli(tmp_path, "server", "--host", "127.0.0.1", "--port", server.port,
                   "--data", tmp_path / "other.db")
    assert_error(proc, 1, "cannot listen", str(server.port))


def test_server_port_out_of_range_is_a_clean_error(tmp_path):
    # argparse accepts any int; bind() raises OverflowError (not OSError) for it.
    for port in ("70000", "-1"):
        proc = run_cli(tmp_path, "server", "--host", "127.0.0.1", "--port", port,
                       "--data", tmp_path / "s.db")
        assert proc.returncode in (1, 2), proc.stderr
        assert_error(proc, proc.returncode, "port")


def test_server_tls_option_errors(tmp_path):
    base = ("server", "--host", "127.0.0.1", "--port", "0", "--data", tmp_path / "s.db")
    assert_error(run_cli(tmp_path, *base, "--tls-cert", tmp_path / "c.pem"), 2, "go together")
    assert_error(run_cli(tmp_path, *base, "--tls-cert", tmp_path / "c.pem",
                         "--tls-key", tmp_path / "k.pem"), 1, "TLS")


def test_register_twice_needs_rotate_and_rotate_retires_the_old_key(server, device):
    key1 = server.register("laptop")
    assert key1.startswith("ccs1_")
    again = server.admin("register", "--name", "laptop", "--json")
    assert_error(again, 1, "already registered", "--rotate", quiet_stdout=False)
    assert "already registered" in json.loads(again.stdout)["error"]

    dev = device("laptop")
    dev.setup(server.url, key1)
    dev.sql("INSERT INTO version (name, path) VALUES ('17.0', '/odoo/17')")
    assert dev.json("push")["accepted"] == 1

    key2 = server.register("laptop", rotate=True)
    assert key2 != key1
    dev.sql("UPDATE version SET port = '8069' WHERE name = '17.0'")
    # The .env still holds the old key: rejected, and the change stays pending.
    assert_error(dev.cli("push"), 1, "rejected", "API key")
    failed = json.loads(dev.cli("push", "--json").stdout)     # the error, as JSON
    assert "rejected" in failed["error"] and failed["exit_code"] == 1 and failed["hint"]
    status = unhealthy_status(dev)
    assert status["server"]["state"] == "key rejected"
    assert status["pending"]["version"] == {"insert": 0, "update": 1, "delete": 0}
    # setup with the old key is refused as well, and keeps the file as it was
    before = file_state(dev.env_file)
    assert_error(dev.cli("setup", "--server", server.url, "--api-key", key1), 1, "register")
    assert file_state(dev.env_file) == before

    dev.setup(server.url, key2)
    result = dev.json("push")
    assert (result["sent"], result["accepted"]) == (1, 1)
    assert nothing_pending(dev)


def test_devices_last_seen_and_revoke(server, device):
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    key_desk, key_lap = server.register("desk"), server.register("lap")
    listed = server.devices()
    assert set(listed) == {"desk", "lap"}
    for info in listed.values():
        assert info["last_seen_at"] is None and info["revoked_at"] is None
        assert parse_utc(info["created_at"]) >= started

    desk = device("desk")      # configured by hand: no contact with the server yet
    desk.env_file.write_text(hand_env(server.url, key_desk))
    assert server.devices()["desk"]["last_seen_at"] is None
    desk.sql("INSERT INTO project (name) VALUES ('acme')")
    desk.ok("sync")
    listed = server.devices()
    assert parse_utc(listed["desk"]["last_seen_at"]) >= started
    assert listed["lap"]["last_seen_at"] is None
    assert "never" in assert_ok(server.admin("devices")).stdout

    lap = device("lap")
    lap.setup(server.url, key_lap)
    assert lap.json("sync")["received"] == 1
    assert_ok(server.admin("revoke", "--name", "lap"))
    listed = server.devices()
    assert listed["lap"]["revoked_at"] is not None and listed["desk"]["revoked_at"] is None
    assert "REVOKED" in assert_ok(server.admin("devices")).stdout

    lap.sql("INSERT INTO project (name) VALUES ('shop')")
    for command in ("push", "pull", "sync"):
        assert_error(lap.cli(command), 1, "revoked")
    assert unhealthy_status(lap)["server"]["state"] == "key revoked"
    assert_error(lap.cli("setup", "--server", server.url, "--api-key", key_lap), 1,
                 "revoked", "register")
    desk.ok("sync")                                    # other devices are unaffected
    assert names(desk, "project") == {"acme"}

    key_lap2 = server.register("lap", rotate=True)     # a new key lifts the revocation
    lap.setup(server.url, key_lap2)
    assert lap.json("push")["accepted"] == 1
    assert server.devices()["lap"]["revoked_at"] is None


def test_registry_error_paths(server, tmp_path):
    assert_error(server.admin("register", "--name", "bad name!"), 2, "invalid device name")
    assert_error(server.admin("register"), 2, "--name")
    assert_error(server.admin("revoke", "--name", "ghost"), 1, "no device named")
    for command in (("register", "--name", "x"), ("devices",)):     # a folder, not a file
        assert_error(run_cli(tmp_path, *command, "--data", tmp_path), 1, "cannot open")
    missing = tmp_path / "nowhere.db"
    for command in (("devices",), ("revoke", "--name", "x")):
        proc = run_cli(tmp_path, *command, "--data", missing)
        assert_error(proc, 1, "no server data")
    assert not missing.exists()


def test_cli_usage_errors(tmp_path):
    assert_error(run_cli(tmp_path, "bogus"), 2, "invalid choice")
    assert_error(run_cli(tmp_path, "push", "--nope"), 2, "--nope")
    # Alone it shows the status, as `cc sync` does: here, with no cc database, one error.
    assert_error(run_cli(tmp_path), 1, "no database at")


##### setup and configuration ###################################################

def test_setup_writes_env_mode_600_and_keeps_other_lines(server, device):
    key = server.register("laptop")
    dev = device("laptop")
    dev.env_file.write_text("# mine\nFOO=bar\nexport CC_SERVER=http://old.example:1\n")
    os.chmod(dev.env_file, 0o644)

    answer = dev.setup(server.url, key)
    assert answer == {"server": server.url, "device": "laptop", "saved": str(dev.env_file),
                      "e2e": True}
    lines = dev.env_file.read_text().splitlines()
    assert "# mine" in lines and "FOO=bar" in lines
    # ccsync's own names, so that cc 4.0's sync (which reads CC_SERVER) stays unconfigured;
    # the user's own CC_SERVER line (another server) is kept.
    assert f"CCSYNC_SERVER={server.url}" in lines and f"CCSYNC_API_KEY={key}" in lines
    assert sum(line.startswith("CCSYNC_SERVER=") for line in lines) == 1
    assert sum(line.startswith("CCSYNC_API_KEY=") for line in lines) == 1
    assert "export CC_SERVER=http://old.example:1" in lines
    assert not any(line.startswith("CC_API_KEY") for line in lines)
    assert sum(line.startswith("CCSYNC_E2E_KEY=e2e1:") for line in lines) == 1
    assert not any(TEST_PASSPHRASE in line for line in lines)     # only the derived key
    assert stat.S_IMODE(dev.env_file.stat().st_mode) == 0o600
    assert not [p for p in dev.cc_dir.iterdir() if p.name.startswith(".env.")]

    text = dev.env_file.read_text()
    out = dev.ok("setup", "--server", server.url, "--api-key", key).stdout
    assert "laptop" in out and str(dev.env_file) in out
    assert key not in out                              # the key is never echoed
    assert vault_line(dev).split(":")[-1] not in out   # nor the end-to-end key
    assert dev.env_file.read_text() == text            # setup twice changes nothing


def test_setup_reads_the_key_from_stdin(server, device):
    key = server.register("laptop")
    dev = device("laptop")
    proc = dev.ok("setup", "--server", server.url, "--api-key", "-", "--json", input=key + "\n")
    assert json.loads(proc.stdout)["device"] == "laptop"
    assert key not in proc.stdout
    assert f"CCSYNC_API_KEY={key}" in dev.env_file.read_text().splitlines()
    assert stat.S_IMODE(dev.env_file.stat().st_mode) == 0o600
    dev.ok("sync")


def test_setup_with_a_wrong_key_saves_nothing(server, device, tmp_path):
    server.register("laptop")
    other = ServerProcess(tmp_path / "other.db", tmp_path / "other_home")
    foreign = other.register("laptop")                 # a key from another server's registry
    dev = device("laptop")
    for bad in ("ccs1_" + "x" * 43, foreign):
        err = assert_error(dev.cli("setup", "--server", server.url, "--api-key", bad), 1,
                           "register")
        assert "rejected" in err
        assert not dev.env_file.exists()

    dev.env_file.write_text("FOO=bar\nCC_SERVER=http://keep.example:9\n")
    os.chmod(dev.env_file, 0o640)
    before = file_state(dev.env_file)
    assert_error(dev.cli("setup", "--server", server.url, "--api-key", foreign), 1, "register")
    assert_error(dev.cli("setup", "--server", server.url, "--api-key", "-", input=foreign),
                 1, "register")
    assert file_state(dev.env_file) == before


def test_setup_against_a_dead_port_saves_nothing(device):
    dev = device("laptop")
    url = f"http://127.0.0.1:{dead_port()}"
    assert_error(dev.cli("setup", "--server", url, "--api-key", "ccs1_abc"), 1, "unreachable")
    assert not dev.env_file.exists()
    dev.env_file.write_text("FOO=bar\n")
    before = file_state(dev.env_file)
    proc = dev.cli("setup", "--server", url, "--api-key", "ccs1_abc", "--json")
    assert_error(proc, 1, "unreachable", quiet_stdout=False)
    assert "unreachable" in json.loads(proc.stdout)["error"]
    assert file_state(dev.env_file) == before


def test_setup_usage_errors_save_nothing(device):
    dev = device("laptop")
    url = f"http://127.0.0.1:{dead_port()}"
    assert_error(dev.cli("setup"), 2, "--server")                       # not a terminal
    assert_error(dev.cli("setup", "--server", url), 2, "--api-key")
    assert_error(dev.cli("setup", "--server", url, "--api-key", "-", input=""), 2, "needed")
    assert_error(dev.cli("setup", "--server", "ftp://example", "--api-key", "k"), 1,
                 "http")
    assert not dev.env_file.exists()


def test_environment_wins_over_the_env_file(server, connected, device):
    dev = connected("laptop")
    dev.sql("INSERT INTO version (name, path) VALUES ('17.0', '/odoo/17')")
    bad_key = {"CCSYNC_API_KEY": "ccs1_not_registered_anywhere"}
    assert_error(dev.cli("push", env=bad_key), 1, "rejected")
    assert unhealthy_status(dev, env=bad_key)["server"]["state"] == "key rejected"
    dead = {"CCSYNC_SERVER": f"http://127.0.0.1:{dead_port()}"}
    assert_error(dev.cli("push", env=dead), 1, "unreachable")
    assert unhealthy_status(dev, env=dead)["server"]["state"] == "unreachable"
    # cc's names (cc's environment passes them on) never outrank ccsync's in the file.
    ccs = {"CC_SERVER": f"http://127.0.0.1:{dead_port()}", "CC_API_KEY": "ccs1_cc_own"}
    assert dev.json("push", env=ccs)["accepted"] == 1  # the file itself is fine

    fresh = device("desktop")                          # environment only, no .env at all
    key = server.register("desktop")
    result = fresh.json("sync", env={"CC_SERVER": server.url, "CC_API_KEY": key,
                                     "CCSYNC_E2E_KEY": vault_line(dev)})
    assert result["received"] == 1 and names(fresh, "version") == {"17.0"}
    assert not fresh.env_file.exists()

    out = dev.ok("setup", "--server", server.url, "--api-key", dev.key,
                 env={"CCSYNC_API_KEY": "ccs1_shadow"}).stdout
    assert "CCSYNC_API_KEY set in the environment take precedence" in out
    out = dev.ok("setup", "--server", server.url, "--api-key", dev.key,
                 env={"CC_API_KEY": "ccs1_cc_own"}).stdout
    assert "precedence" not in out                     # cc's name shadows nothing setup wrote


def test_sync_without_configuration_or_database(device, tmp_path):
    dev = device("laptop")
    for command in ("push", "pull", "sync"):
        assert_error(dev.cli(command), 1, "not configured", "setup")
    nodb = tmp_path / "home_empty"
    nodb.mkdir()
    env = {"CC_SERVER": f"http://127.0.0.1:{dead_port()}", "CC_API_KEY": "ccs1_x"}
    assert_error(run_cli(nodb, "push", env=env), 1, "no database")
    assert_error(run_cli(nodb, "status", env=env), 1, "no database")
    (nodb / ".cc-cli").mkdir()
    (nodb / ".cc-cli" / "cc_cli.db").write_bytes(b"not a database " * 20)
    for command in ("push", "status"):
        assert_error(run_cli(nodb, command, env=env), 1, "not a database", "hint: ", "--db")


##### convergence ################################################################

def test_two_devices_converge_inserts_updates_deletes(server, connected):
    a, b = connected("laptop", "desktop")
    a.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/home/a/odoo/17', '8069')")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sql("INSERT INTO setting (name, value) VALUES ('github_pat', 'ghp_secret')")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    a.sql("INSERT INTO database (name) VALUES ('acme_dev')")
    a.sql("INSERT INTO environment (name, project_id, version_id, database_id, notes) "
          "VALUES ('dev', 1, 1, 1, 'first')")
    a.sql("INSERT INTO switch_log (environment_id, switched_at) VALUES (1, '2026-01-05T09:00:00')")
    b.sql("INSERT INTO version (name, path) VALUES ('18.0', '/srv/odoo/18')")
    b.sql("INSERT INTO project (name) VALUES ('shop')")

    pushed = a.json("push")
    assert SYNC_KEYS <= set(pushed)
    assert (pushed["sent"], pushed["accepted"], pushed["superseded"], pushed["refused"]) \
        == (6, 6, 0, {})
    assert (pushed["received"], pushed["applied"]) == (0, 0)
    synced = b.json("sync")
    assert (synced["sent"], synced["accepted"]) == (2, 2)
    assert synced["received"] >= 6 and synced["applied"] >= 6
    pulled = a.json("pull")
    assert pulled["sent"] == 0 and pulled["received"] >= 2 and pulled["applied"] >= 2
    snap = assert_converged(a, b)
    assert len(snap["version"]) == 2 and len(snap["environment"]) == 1
    assert names(b, "version") == {"17.0", "18.0"} and names(b, "project") == {"acme", "shop"}
    assert b.sql("SELECT value FROM setting WHERE name = 'github_pat'") == []
    assert b.value("SELECT notes FROM environment WHERE name = 'dev'") == "first"
    assert b.value("SELECT count(*) FROM switch_log") == 1

    # updates on both sides, different rows and different columns of one row
    a.sql("UPDATE project SET main_branch = 'main' WHERE name = 'acme'")
    a.sql("UPDATE environment SET branch_name = 'feat-x' WHERE name = 'dev'")
    b.sql("UPDATE environment SET notes = 'second' WHERE name = 'dev'")
    b.sql("UPDATE version SET port = '8070' WHERE name = '18.0'")
    sync_all(a, b, a)
    assert_converged(a, b)
    for dev in (a, b):
        assert dev.value("SELECT main_branch FROM project WHERE name = 'acme'") == "main"
        assert dev.sql("SELECT branch_name, notes FROM environment WHERE name = 'dev'") \
            == [("feat-x", "second")]
        assert dev.value("SELECT port FROM version WHERE name = '18.0'") == "8070"

    # the same cell edited on both: the later edit wins even when pushed first
    a.sql("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    wait_for_clock_tick(0.05)
    b.sql("UPDATE setting SET value = 'solarized' WHERE name = 'theme'")
    assert b.json("push")["accepted"] == 1
    late = a.json("sync")
    assert late["sent"] == 1 and late["superseded"] == 1
    sync_all(b)
    assert_converged(a, b)
    assert {d.value("SELECT value FROM setting WHERE name = 'theme'") for d in (a, b)} \
        == {"solarized"}

    # deletes on both sides
    a.sql("DELETE FROM setting WHERE name = 'theme'")
    a.sql("DELETE FROM switch_log")
    b.sql("DELETE FROM project WHERE name = 'shop'")
    sync_all(a, b, a)
    assert_converged(a, b)
    for dev in (a, b):
        assert names(dev, "project") == {"acme"}
        assert dev.sql("SELECT * FROM setting WHERE name = 'theme'") == []
        assert dev.value("SELECT count(*) FROM switch_log") == 0
        assert nothing_pending(dev)
    assert a.sql("SELECT value FROM setting WHERE name = 'github_pat'") == [("ghp_secret",)]

    # the server logs one line per request, naming the device, and never a key
    assert " laptop POST /v1/push 200 " in server.log
    assert " desktop POST /v1/pull 200 " in server.log
    assert a.key not in server.log and b.key not in server.log

    # human output and --quiet
    a.sql("INSERT INTO version (name, path) VALUES ('19.0', '/odoo/19')")
    out = a.ok("push").stdout
    assert "push: sent 1, accepted 1" in out and "pull:" not in out
    assert b.ok("sync", "--quiet").stdout == ""
    assert names(b, "version") == {"17.0", "18.0", "19.0"}
    out = a.ok("pull").stdout
    assert out.startswith("pull: received") and "push:" not in out


def test_three_devices_converge(connected):
    a, b, c = connected("alpha", "bravo", "charlie")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('p-alpha', 'master')")
    a.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/a/17', '8069')")
    b.sql("INSERT INTO project (name) VALUES ('p-bravo')")
    b.sql("INSERT INTO setting (name, value) VALUES ('editor', 'vim')")
    c.sql("INSERT INTO project (name) VALUES ('p-charlie')")
    c.sql("INSERT INTO environment (name, project_id, notes) VALUES "
          "('staging', (SELECT id FROM project WHERE name = 'p-charlie'), 'c')")
    c.sql("INSERT INTO version (name, path, branch) VALUES ('17.0', '/c/17', '17.0-c')")
    # The same natural key on two devices is one row everywhere.  These rows predate
    # ccsync's capture (no edit time is known), so one device's row wins as a whole,
    # the same one on every device.
    sync_all(a, b, c, a, b)
    snap = assert_converged(a, b, c)
    assert len(snap["version"]) == 1 and len(snap["project"]) == 3
    for dev in (a, b, c):
        assert names(dev, "project") == {"p-alpha", "p-bravo", "p-charlie"}
        assert dev.sql("SELECT port, branch FROM version") in ([("8069", None)],
                                                                [(None, "17.0-c")])
        assert dev.value("SELECT p.name FROM environment e JOIN project p "
                         "ON p.id = e.project_id WHERE e.name = 'staging'") == "p-charlie"

    # Twins created once capture is installed: the later insert carries a clock for
    # every column, so it wins every column.
    a.sql("INSERT INTO database (name, size_bytes) VALUES ('shared_db', 100)")
    wait_for_clock_tick(0.05)
    c.sql("INSERT INTO database (name, is_odoo) VALUES ('shared_db', 1)")
    sync_all(a, c, b, a)
    assert_converged(a, b, c)
    for dev in (a, b, c):
        assert dev.sql("SELECT size_bytes, is_odoo FROM database WHERE name = 'shared_db'") \
            == [(None, 1)]

    a.sql("UPDATE project SET main_branch = 'develop' WHERE name = 'p-bravo'")
    b.sql("DELETE FROM project WHERE name = 'p-alpha'")
    c.sql("INSERT INTO repository (name, path, origin_url) VALUES "
          "('addons', '/c/addons', 'git@example.com:addons.git')")
    c.sql("INSERT INTO skill_tag (repository_id, commit_sha, tag, weight) VALUES "
          "((SELECT id FROM repository), 'abc123', 'orm', 3)")
    a.sql("UPDATE setting SET value = 'emacs' WHERE name = 'editor'")
    wait_for_clock_tick(0.05)
    c.sql("UPDATE setting SET value = 'nano' WHERE name = 'editor'")
    sync_all(c, b, a, c, b)
    assert_converged(a, b, c)
    for dev in (a, b, c):
        assert names(dev, "project") == {"p-bravo", "p-charlie"}
        assert dev.value("SELECT main_branch FROM project WHERE name = 'p-bravo'") == "develop"
        assert dev.value("SELECT value FROM setting WHERE name = 'editor'") == "nano"
        assert dev.value("SELECT t.tag FROM skill_tag t JOIN repository r "
                         "ON r.id = t.repository_id WHERE r.origin_url LIKE '%addons.git'") \
            == "orm"
        assert nothing_pending(dev)


##### pull --since ###############################################################

def test_pull_since_receives_only_later_changes(connected):
    a, b = connected("laptop", "desktop")
    a.sql("INSERT INTO version (name, path) VALUES ('16.0', '/odoo/16')")
    assert a.json("push")["accepted"] == 1
    assert b.json("pull")["received"] == 1

    a.sql("INSERT INTO project (name) VALUES ('x-project')")
    assert a.json("push")["accepted"] == 1
    since = utc_now_iso()                                       # after X reached the server
    since_s = _dt.datetime.fromtimestamp(math.ceil(time.time()), _dt.timezone.utc) \
        .isoformat().replace("+00:00", "Z")                     # same, whole seconds
    time.sleep(1.1)
    a.sql("INSERT INTO project (name) VALUES ('y-project')")
    assert a.json("push")["accepted"] == 1

    result = b.json("pull", "--since", since)
    assert SYNC_KEYS <= set(result)
    assert (result["sent"], result["received"], result["applied"]) == (0, 1, 1)
    assert names(b, "project") == {"y-project"}
    assert b.json("pull", "--since", since_s)["received"] == 1
    offset = parse_utc(since).astimezone(_dt.timezone(_dt.timedelta(hours=2))).isoformat()
    assert b.json("pull", "--since", offset)["received"] == 1
    assert b.json("pull", "--since", "2999-01-01T00:00:00Z")["received"] == 0

    # --since filters; it does not move the cursor: a plain pull still brings X
    assert b.json("pull")["received"] == 2
    assert names(b, "project") == {"x-project", "y-project"}
    assert_converged(a, b)

    for bad in ("yesterday", "2026-13-45"):
        err = assert_error(b.cli("pull", "--since", bad), 2, "--since")
        lines = err.strip().splitlines()            # the error, and a hint with an example
        assert len(lines) == 2 and lines[1].startswith("hint: an ISO 8601 time, e.g."), err


##### status #####################################################################

def test_status_not_configured(device):
    dev = device("solo")
    dev.sql("INSERT INTO version (name, path) VALUES ('17.0', '/odoo/17')")
    dev.sql("INSERT INTO version (name, path) VALUES ('18.0', '/odoo/18')")
    dev.sql("INSERT INTO project (name) VALUES ('acme')")
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    dev.sql("INSERT INTO setting (name, value) VALUES ('github_pat', 'ghp_secret')")
    status = dev.json("status")
    assert status["server"]["state"] == "not configured"
    assert status["installed"] is False
    assert status["last_sync"] is None and status["last_error"] is None
    assert status["pending"]["version"] == {"insert": 2, "update": 0, "delete": 0}
    assert status["pending"]["project"] == {"insert": 1, "update": 0, "delete": 0}
    assert status["pending"]["setting"] == {"insert": 1, "update": 0, "delete": 0}
    assert all(c == ZERO for t, c in status["pending"].items()
               if t not in ("version", "project", "setting"))
    out = dev.ok("status").stdout
    assert "server: not configured" in out and "last sync: never" in out


def test_status_pending_last_sync_and_server_states(server, connected):
    dev = connected("laptop")
    dev.sql("INSERT INTO version (name, path) VALUES ('17.0', '/odoo/17')")
    dev.sql("INSERT INTO version (name, path) VALUES ('18.0', '/odoo/18')")
    dev.sql("INSERT INTO project (name) VALUES ('acme')")
    status = dev.json("status")
    assert status["server"]["state"] == "connected"
    assert status["server"]["device"] == "laptop" and status["server"]["url"] == server.url
    assert status["pending"]["version"] == {"insert": 2, "update": 0, "delete": 0}
    assert status["pending"]["project"] == {"insert": 1, "update": 0, "delete": 0}
    assert status["last_sync"] is None

    assert dev.json("push")["accepted"] == 3
    status = dev.json("status")
    assert all(c == ZERO for c in status["pending"].values()), status["pending"]
    first_sync = status["last_sync"]
    assert first_sync and status["last_error"] is None
    assert abs(parse_utc(first_sync) - _dt.datetime.now(_dt.timezone.utc)) \
        < _dt.timedelta(minutes=1)

    dev.sql("UPDATE version SET port = '8069' WHERE name = '17.0'")
    dev.sql("INSERT INTO version (name, path) VALUES ('19.0', '/odoo/19')")
    dev.sql("DELETE FROM project WHERE name = 'acme'")
    status = dev.json("status")
    assert status["pending"]["version"] == {"insert": 1, "update": 1, "delete": 0}
    assert status["pending"]["project"] == {"insert": 0, "update": 0, "delete": 1}

    # a failed sync is noted, a later successful one clears it
    bad_key = {"CCSYNC_API_KEY": "ccs1_wrong"}
    assert_error(dev.cli("sync", env=bad_key), 1, "rejected")
    status = dev.json("status")
    assert "rejected" in status["last_error"] and status["last_sync"] == first_sync
    assert status["pending"]["version"] == {"insert": 1, "update": 1, "delete": 0}
    assert unhealthy_status(dev, env=bad_key)["server"]["state"] == "key rejected"
    time.sleep(1.0)                                   # last_sync has whole seconds
    result = dev.json("sync")
    assert (result["sent"], result["accepted"]) == (3, 3)
    status = dev.json("status")
    assert status["last_error"] is None and status["last_sync"] > first_sync
    assert all(c == ZERO for c in status["pending"].values()), status["pending"]
    out = dev.ok("status").stdout
    assert "nothing pending" in out and f"last sync: {status['last_sync']}" in out
    assert "server: connected as 'laptop'" in out and "last error" not in out

    dead = {"CCSYNC_SERVER": f"http://127.0.0.1:{dead_port()}"}
    assert unhealthy_status(dev, env=dead)["server"]["state"] == "unreachable"

    # the server goes away
    assert server.stop() == 0
    dev.sql("INSERT INTO project (name) VALUES ('offline')")
    for command in ("push", "pull", "sync"):
        assert_error(dev.cli(command), 1, "unreachable")
    status = unhealthy_status(dev)
    assert status["server"]["state"] == "unreachable" and status["server"]["url"] == server.url
    assert "unreachable" in status["last_error"]
    assert status["pending"]["project"] == {"insert": 1, "update": 0, "delete": 0}
    proc = dev.cli("status")
    out = proc.stdout
    assert proc.returncode == 1 and "last error:" in out and "server: unreachable" in out
