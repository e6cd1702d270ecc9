"""A newcomer's path (issue 12): honest exit codes, bounds and refusals.

Each test runs the real CLI (and, where it needs one, the real server) as a
subprocess, as a user would: the server refuses to start without its crypto
library, the daemon refuses an interval that would hammer the server,
`register` refuses to create a server store by accident, `ccsync` alone
shows the status, `push` with nothing to send still checks the server,
`status` fails when the server cannot be used, and Ctrl-C and SIGTERM end
the server and the daemon with the exit codes the README gives.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e_helpers import (COMMAND, Device, ServerProcess, assert_error, assert_ok, clean_env,
                         dead_port, hand_env, run_cli)


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    yield srv
    srv.stop()


def _hidden_crypto(tmp_path: Path) -> dict:
    """An environment in which `import Cryptodome` fails, as on a machine without it."""
    fake = tmp_path / "no_crypto" / "Cryptodome"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('pycryptodomex is not installed')\n")
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = f"{fake.parent}:{env['PYTHONPATH']}"
    return env


def test_the_server_refuses_to_start_without_the_crypto_library(tmp_path):
    proc = subprocess.run([*COMMAND, "server", "--host", "127.0.0.1", "--port", "0",
                           "--data", str(tmp_path / "s.db")], env=_hidden_crypto(tmp_path),
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert_error(proc, 1, "pycryptodomex", "ccsync enable")
    assert not (tmp_path / "s.db").exists()              # nothing made before it refused


@pytest.mark.parametrize("interval", ["0", "-5", "nan", "9.9", "86401", "soon"])
def test_the_daemon_refuses_an_interval_that_would_hammer_the_server(tmp_path, interval):
    assert_error(run_cli(tmp_path, "daemon", "--interval", interval), 2, "--interval",
                 "10 to 86400")


@pytest.mark.parametrize("given, used, said", [
    (0, 10.0, True), (-5, 10.0, True), (0.05, 10.0, True), (float("nan"), 300.0, True),
    ("soon", 300.0, True), (None, 300.0, True), (10 ** 9, 86400.0, True), (60, 60.0, False),
    ("120", 120.0, False)])
def test_an_embedded_loop_gets_an_interval_that_cannot_hammer_the_server(given, used, said,
                                                                          caplog):
    # cc's daemon builds AutoSync itself: a bad interval is bounded, said, never raised.
    import ccsync
    with caplog.at_level("WARNING", logger="ccsync"):
        auto = ccsync.AutoSync(db_path="/nonexistent/cc.db", interval=given, environ={})
    assert auto.interval == used
    assert ("is not 10 to 86400 s" in caplog.text) is said, caplog.text


def test_register_does_not_create_a_server_store_by_accident(tmp_path):
    home = tmp_path / "laptop"
    err = assert_error(run_cli(home, "register", "--name", "laptop"), 1, "no server store",
                       "--create")
    assert "ccsync server" in err
    assert not (home / ".cc-cli" / "ccsync_server.db").exists()
    made = json.loads(assert_ok(run_cli(home, "register", "--name", "pi", "--create",
                                        "--json")).stdout)
    assert made["api_key"] and (home / ".cc-cli" / "ccsync_server.db").exists()
    assert_ok(run_cli(home, "register", "--name", "desk"))      # the store exists now
    other = tmp_path / "elsewhere.db"
    assert_ok(run_cli(home, "register", "--name", "x", "--data", other))   # said where


def test_ccsync_alone_shows_the_status(tmp_path):
    dev = Device(tmp_path, "laptop")
    proc = subprocess.run(COMMAND, env=clean_env(dev.home), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "nothing pending" in proc.stdout or "pending" in proc.stdout
    assert "server: not configured" in proc.stdout
    dev.close()


def test_push_with_nothing_pending_still_checks_the_server(tmp_path, server):
    dev = Device(tmp_path, "laptop")
    key = server.register("laptop")
    dev.env_file.write_text(hand_env(server.url, key))
    assert_ok(dev.cli("push"))
    assert_ok(dev.cli("push"))                           # nothing pending: still fine
    dev.env_file.write_text(hand_env(f"http://127.0.0.1:{dead_port()}", key))
    assert_error(dev.cli("push"), 1, "unreachable")
    dev.env_file.write_text(hand_env(server.url, "ccs1_not_a_key_the_server_knows"))
    assert_error(dev.cli("push"), 1, "rejected")
    dev.close()


def test_status_fails_when_the_server_cannot_be_used(tmp_path, server):
    dev = Device(tmp_path, "laptop")
    key = server.register("laptop")
    dev.env_file.write_text(hand_env(server.url, key))
    assert_ok(dev.cli("status"))
    for env_text, state in ((hand_env(f"http://127.0.0.1:{dead_port()}", key), "unreachable"),
                            (hand_env(server.url, "ccs1_unknown"), "key rejected")):
        dev.env_file.write_text(env_text)
        proc = dev.cli("status", "--json")
        assert proc.returncode == 1, proc.stderr
        assert json.loads(proc.stdout)["server"]["state"] == state
    dev.close()


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 20) -> str:
    """stderr lines until one holds ``needle`` (bounded)."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen: {''.join(seen)}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_the_server_exits_130_on_ctrl_c_and_0_on_sigterm(tmp_path, sig, code):
    returncode, err = _stopped_by(sig, [*COMMAND, "server", "--host", "127.0.0.1", "--port",
                                        "0", "--data", str(tmp_path / "s.db")],
                                  clean_env(tmp_path), "listening")
    assert returncode == code, err
    assert "Traceback" not in err


def _stopped_by(sig: int, argv: list, env: dict, ready: str) -> tuple[int, str]:
    """Start ``argv``, wait for ``ready`` on its stderr, send ``sig``: (exit code, stderr)."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, ready)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    return proc.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_the_daemon_exits_130_on_ctrl_c_and_0_on_sigterm(tmp_path, server, sig, code):
    dev = Device(tmp_path, "laptop")
    dev.env_file.write_text(hand_env(server.url, server.register("laptop")))
    try:
        returncode, err = _stopped_by(sig, [*COMMAND, "daemon", "--interval", "10"],
                                      clean_env(dev.home), "auto-sync every")
    finally:
        dev.close()
    assert returncode == code, err
    assert "stopped" in err and "Traceback" not in err


def test_the_daemon_speaks_json_when_asked(tmp_path, server):
    dev = Device(tmp_path, "laptop")
    dev.env_file.write_text(hand_env(server.url, server.register("laptop")))
    try:
        first, last, code, err = _json_until(signal.SIGINT, [*COMMAND, "--json", "daemon",
                                                             "--interval", "10"],
                                             clean_env(dev.home))
    finally:
        dev.close()
    assert first == {"started": True, "interval": 10, "db": str(dev.db)}, err
    assert last == {"stopped": True, "exit_code": 130} and code == 130, err


def test_global_options_go_before_or_after_the_command(tmp_path):
    dev, other = Device(tmp_path, "laptop"), Device(tmp_path, "other")
    dev.sql("INSERT INTO project (name) VALUES ('here')")
    before = json.loads(assert_ok(run_cli(tmp_path, "--json", "--db", dev.db, "status")).stdout)
    after = json.loads(assert_ok(run_cli(tmp_path, "status", "--db", dev.db, "--json")).stdout)
    mixed = json.loads(assert_ok(run_cli(tmp_path, "--db", dev.db, "status", "--json")).stdout)
    assert before == after == mixed and before["pending"]["project"]["insert"] == 1
    # A value given after the command wins; one before it is not reset by the command.
    later = json.loads(assert_ok(run_cli(tmp_path, "--db", dev.db, "status", "--db", other.db,
                                         "--json")).stdout)
    assert later["pending"]["project"]["insert"] == 0
    text = assert_ok(run_cli(tmp_path, "--db", dev.db, "status")).stdout
    assert "pending:" in text and "project" in text
    dev.close()
    other.close()


def test_errors_come_as_json_under_json_and_debug_keeps_the_exit_code(tmp_path):
    missing = tmp_path / "nowhere" / "cc_cli.db"
    for argv in (("--json", "status", "--db", missing), ("status", "--db", missing, "--json")):
        proc = run_cli(tmp_path, *argv)
        assert_error(proc, 1, "no database at", quiet_stdout=False)
        failed = json.loads(proc.stdout)
        assert failed == {"error": f"no database at {missing}", "exit_code": 1,
                          "hint": "pass --db PATH or set $CC_DB"}
    usage = run_cli(tmp_path, "push", "--nope", "--json")
    assert_error(usage, 2, "--nope", quiet_stdout=False)
    assert json.loads(usage.stdout)["exit_code"] == 2
    for argv in (("--debug", "status", "--db", missing), ("status", "--debug", "--db", missing)):
        proc = run_cli(tmp_path, *argv)
        assert proc.returncode == 1 and "Traceback" in proc.stderr
        assert "ccsync: error: no database at" in proc.stderr


def _json_until(sig: int, argv: list, env: dict) -> tuple[dict, dict, int, str]:
    """Start a loop with --json, read its first object, send ``sig``: (that
    object, the last one, the exit code, stderr)."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    return first, json.loads(out), proc.returncode, err


def test_the_server_speaks_json_when_asked(tmp_path):
    first, last, code, err = _json_until(
        signal.SIGTERM, [*COMMAND, "server", "--host", "127.0.0.1", "--port", "0", "--data",
                         str(tmp_path / "s.db"), "--json"], clean_env(tmp_path))
    assert first["listening"].startswith("http://127.0.0.1:") and first["data"].endswith("s.db")
    assert last == {"stopped": True, "exit_code": 0} and code == 0, err


def test_a_read_only_database_is_named_with_a_hint(tmp_path, monkeypatch, capsys):
    # The sandbox runs as root, whom permissions do not stop: os.access answers as for a user.
    import ccsync
    dev = Device(tmp_path, "laptop")
    real = ccsync.os.access
    monkeypatch.setattr(ccsync.os, "access",
                        lambda p, mode: False if str(p) == str(dev.db) else real(p, mode))
    assert ccsync.main(["stamp", "--db", str(dev.db)]) == 1
    err = capsys.readouterr().err
    assert f"{dev.db} is read-only for this user" in err and "hint: run ccsync as the user" in err
    assert ccsync.main(["status", "--db", str(dev.db)]) == 0     # reading still works
    dev.close()


def test_a_server_url_without_its_scheme_gets_the_fix_as_a_hint(tmp_path):
    err = assert_error(run_cli(tmp_path, "setup", "--server", "127.0.0.1:9100", "--api-key",
                               "ccs1_x"), 1, "is not http(s)://host[:port]")
    assert "hint: write it with its scheme: http://127.0.0.1:9100" in err
    assert "run `ccsync setup`" not in err                # not while running it


def test_https_against_a_plain_server_says_so(tmp_path, server):
    url = server.url.replace("http://", "https://")
    err = assert_error(run_cli(tmp_path, "setup", "--server", url, "--api-key", "ccs1_x"), 1,
                       "TLS failure")
    assert "plain HTTP" in err and "http://" in err


def test_a_since_that_is_not_iso_8601_gets_an_example(tmp_path):
    dev = Device(tmp_path, "laptop")
    err = assert_error(dev.cli("pull", "--since", "yesterday"), 2, "--since")
    assert "hint: an ISO 8601 time, e.g. --since 2026-11-30T09:00" in err
    dev.close()


def test_a_first_sync_does_not_bring_a_devices_own_rows_back(tmp_path):
    import ccsync
    from conftest import content, key_author, make_cc_db
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    vault = ccsync.Vault.derive("echo passphrase", b"echo-salt-012345", n=2 ** 10)
    devs = {}
    for name in ("a", "b"):
        cc = make_cc_db(tmp_path / f"{name}.db")
        cc.executemany("INSERT INTO project (name) VALUES (?)",
                       [(f"{name}-{i}",) for i in range(300)])
        devs[name] = (cc, ccsync.open_store(str(tmp_path / f"{name}.db")))

    class Interleaved(ccsync.LocalTransport):
        """a's transport: after its first batch, b pushes everything (mixed in)."""
        pushes = 0

        def push(self, records, cursor=None):
            answer = super().push(records, cursor)
            Interleaved.pushes += 1
            if Interleaved.pushes == 1:
                ccsync.sync_once(devs["b"][1], ccsync.LocalTransport(
                    server, "b", author=key_author(server.register("b")), vault=vault),
                    pull=False)
            return answer

    key_a = server.register("a")
    result = ccsync.sync_once(devs["a"][1], Interleaved(server, "a", author=key_author(key_a),
                                                        vault=vault), batch_size=100)
    assert result.sent == 300 and result.pulled.received == 300     # b's rows only
    assert {n for (n,) in devs["a"][0].execute("SELECT name FROM project")} == \
        {f"{x}-{i}" for x in "ab" for i in range(300)}
    again = ccsync.sync_once(devs["a"][1], ccsync.LocalTransport(
        server, "a", author=key_author(key_a), vault=vault))
    assert again.pulled.received == 0
    # b pulls a's rows (and not its own), and both hold the same.
    result_b = ccsync.sync_once(devs["b"][1], ccsync.LocalTransport(
        server, "b", author=key_author(server.register("b", rotate=True)), vault=vault))
    assert result_b.pulled.received == 300
    assert content(devs["a"][0]) == content(devs["b"][0])
    for cc, store in devs.values():
        cc.close()
        store.conn.close()
    server.conn.close()


def test_beside_cc_4_own_sync(tmp_path, server):
    import urllib.error
    import urllib.request
    dev = Device(tmp_path, "laptop")
    key = server.register("laptop")
    # A .env from the days of cc's own sync, pointing at this server: setup replaces it.
    dev.env_file.write_text(f"CC_SERVER={server.url}\nCC_API_KEY={key}\nOTHER=kept\n")
    assert "CC_SERVER" in assert_ok(dev.cli("status")).stdout      # said while it is there
    assert_ok(dev.cli("setup", "--server", server.url, "--api-key", key))
    lines = dev.env_file.read_text().splitlines()
    assert f"CCSYNC_SERVER={server.url}" in lines and f"CCSYNC_API_KEY={key}" in lines
    assert "OTHER=kept" in lines and not any(line.startswith("CC_") for line in lines)
    status = dev.json("status")
    assert status["cc_sync"] is None and status["server"]["state"] == "connected"
    # cc's names still work where they are all there is (cc's docs write them).
    dev.env_file.write_text(hand_env(server.url, key))
    assert dev.json("status")["server"]["state"] == "connected"
    text = assert_ok(dev.cli("status")).stdout
    assert "CC_SERVER and CC_API_KEY are set" in text and "cc 4.0's own sync" in text
    # cc 4.0's own sync calling this server gets one clear refusal, not a 404 or a 500.
    request = urllib.request.Request(f"{server.url}/rpc", data=b'{"method": "push"}',
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(refused.value.read())
    assert refused.value.code == 421 and body["code"] == "not_cc_sync"
    assert "ccsync" in body["error"]
    dev.close()


def test_install_puts_a_ccsync_command_on_the_path_and_remove_takes_it_away(tmp_path):
    import sys
    from e2e_helpers import REPO
    pyz = tmp_path / "ccsync.pyz"
    assert_ok(subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "--output",
                              str(pyz)], capture_output=True, text=True, timeout=60))
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    env.pop("XDG_BIN_HOME", None)
    run = lambda *a: subprocess.run([sys.executable, str(pyz), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    out = json.loads(assert_ok(run("install", "--json")).stdout)
    launcher = home / ".local" / "bin" / "ccsync"
    assert out["installed"] == str(launcher) and out["runs"] == str(pyz)
    assert out["on_path"] is False
    assert "not on your PATH" in assert_ok(run("install")).stdout     # says where, twice fine
    version = subprocess.run([str(launcher), "--version"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("ccsync ")
    assert_ok(run("install", "--remove"))
    assert not launcher.exists()
    assert "no ccsync launcher" in assert_ok(run("install", "--remove")).stdout
    launcher.write_text("#!/bin/sh\necho someone else's\n")        # never overwritten
    assert_error(run("install"), 1, "not ccsync's launcher")
    assert_error(run("install", "--remove"), 1, "not ccsync's launcher")
    assert launcher.read_text() == "#!/bin/sh\necho someone else's\n"


def _on_a_terminal(argv: list, env: dict, timeout: float = 60) -> str:
    """Run ``argv`` with a pseudo-terminal as stdout and stderr; all it wrote."""
    import os
    import pty
    import select
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower)
    os.close(follower)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:             # the child closed its end
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(leader)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_a_long_sync_shows_one_progress_line_per_leg_on_a_terminal_only(tmp_path, server):
    lap, desk = Device(tmp_path, "lap"), Device(tmp_path, "desk")
    for dev in (lap, desk):
        dev.env_file.write_text(hand_env(server.url, server.register(dev.name)))
    lap.conn.executemany("INSERT INTO project (name) VALUES (?)",
                         [(f"p{i}",) for i in range(2000)])
    shown = _on_a_terminal([*COMMAND, "sync"], clean_env(lap.home))
    push = [part for part in shown.split("\r") if part.startswith("push: ") and "/s" in part]
    assert push and "of 2,000 records" in push[-1], shown
    assert "push: sent 2000" in shown                               # then the summary
    # Before the push, a first sync gives rows their ids and finds what to
    # send: seconds at 100,000 rows, so they show too, each its own line.
    parts = [p.strip() for p in shown.replace("\n", "\r").split("\r") if " records, " in p]
    legs = [p.split(":")[0] for p in parts]
    assert sorted(set(legs), key=legs.index) == ["stamp", "scan", "push"], shown
    assert any(p.startswith(f"{leg}: 2,000 of 2,000 records") for p in parts
               for leg in ("stamp", "scan")), shown
    quiet = subprocess.run([*COMMAND, "sync"], env=clean_env(desk.home), capture_output=True,
                           text=True, timeout=60)                  # not a terminal: silent
    assert quiet.returncode == 0 and " records, " not in quiet.stderr + quiet.stdout
    assert "pull: received 2000" in quiet.stdout
    desk.conn.execute("DELETE FROM project")
    desk.conn.executemany("INSERT INTO version (name, path) VALUES (?, ?)",
                          [(f"v{i}", f"/v{i}") for i in range(1500)])
    shown = _on_a_terminal([*COMMAND, "stamp"], clean_env(desk.home))   # stamp shows it too
    assert "stamp: 1,500 of 1,500 records" in shown and "stamped 1500 row(s)" in shown, shown
    shown = _on_a_terminal([*COMMAND, "sync", "--json"], clean_env(desk.home))
    assert " records, " not in shown and json.loads(shown)["sent"] >= 0   # --json: no line
    lap.close()
    desk.close()
