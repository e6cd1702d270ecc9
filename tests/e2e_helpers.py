"""Helpers for the end-to-end tests: the real server and the real CLI as subprocesses.

Every process runs ``sys.executable`` (the interpreter running pytest, which has
pycryptodomex) on the repository's ccsync.py.  Each device is its own HOME
folder holding ``.cc-cli/cc_cli.db`` (cc's real schema) and ``.cc-cli/.env``.
Nothing here listens anywhere but 127.0.0.1, and every wait has a deadline.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import content, make_cc_db

REPO = Path(__file__).resolve().parent.parent
CCSYNC = REPO / "ccsync.py"
# ``python -m ccsync`` runs that file from its bytecode cache; ``python ccsync.py``
# would compile all of it again for every command the tests run.
COMMAND = [sys.executable, "-m", "ccsync"]

# Variables that would point a subprocess at the developer's real setup.
_SCRUBBED = ("CC_SERVER", "CC_API_KEY", "CC_DB", "CC_CA_FILE", "CCSYNC_LOCAL_SETTINGS",
             "CCSYNC_E2E_KEY", "CCSYNC_PASSPHRASE", "CCSYNC_SCRYPT_N")
# Every device of the tests' user enters this sync passphrase at setup (as
# CCSYNC_PASSPHRASE, the scripted way); a test may give another.
TEST_PASSPHRASE = "tests' sync passphrase"
TEST_SCRYPT_N = "1024"
_LISTENING = re.compile(r"server listening on (http://127\.0\.0\.1:\d+) \(data: ")

SERVER_START_TIMEOUT = 10.0
SERVER_STOP_TIMEOUT = 5.0
CLI_TIMEOUT = 60


def clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with HOME replaced and ccsync's own variables removed (but the
    tests' sync passphrase), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["HOME"] = str(home)
    env["CCSYNC_PASSPHRASE"] = TEST_PASSPHRASE
    # A new passphrase at scrypt's least cost: each setup at the real one takes
    # 0.5 s of CPU (test_e2e_encryption.py has a setup at the default cost).
    env["CCSYNC_SCRYPT_N"] = TEST_SCRYPT_N
    env.pop("PYTHONSTARTUP", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    env.update(extra or {})
    return env


def run_cli(home: Path, *args: object, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``ccsync.py ARGS`` with HOME=home; stdin is /dev/null unless ``input`` is given."""
    kwargs = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([*COMMAND, *map(str, args)],
                          env=clean_env(home, env), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, **kwargs)


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.args[2:], proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def assert_error(proc: subprocess.CompletedProcess, code: int, *needles: str,
                 quiet_stdout: bool = True) -> str:
    """A clean failure: exit ``code``, stderr starts with ``ccsync: error:``, no traceback,
    every needle in stderr (case-insensitive).  Returns stderr."""
    where = (proc.args[2:], proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == code, where
    assert proc.stderr.startswith("ccsync: error:"), where
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, where
    if quiet_stdout:
        assert proc.stdout == "", where
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), (needle, where)
    return proc.stderr


def utc_now_iso(timespec: str = "microseconds") -> str:
    """The current time as ISO 8601 UTC with a Z suffix."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_utc(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def dead_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``ccsync.py server`` on 127.0.0.1 and an ephemeral port, stderr drained on a thread."""

    def __init__(self, data: Path, home: Path):
        self.data, self.home = data, home
        self.home.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def start(self, *extra: str) -> str:
        self.proc = subprocess.Popen(
            [*COMMAND, "server", "--host", "127.0.0.1", "--port", "0",
             "--data", str(self.data), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=clean_env(self.home))
        self._reader = threading.Thread(target=self._drain, name="server-stderr", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:                       # stderr closed: the server died
                break
            match = _LISTENING.search(line)
            if match:
                self.url = match.group(1)
                return self.url
        self.kill()
        raise RuntimeError(f"server did not announce its URL in time:\n{self.log}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, then wait (bounded); returns the exit code.  Idempotent."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"server ignored SIGTERM for {SERVER_STOP_TIMEOUT} s:\n"
                                     f"{self.log}") from None
        if self._reader is not None:
            self._reader.join(SERVER_STOP_TIMEOUT)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(SERVER_STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(SERVER_STOP_TIMEOUT)

    # -- registry commands, run "on the server" (against its data file) --

    def admin(self, *args: object) -> subprocess.CompletedProcess:
        return run_cli(self.home, *args, "--data", self.data)

    def register(self, name: str, *, rotate: bool = False) -> str:
        proc = assert_ok(self.admin("register", "--name", name, "--json",
                                    *(["--rotate"] if rotate else [])))
        answer = json.loads(proc.stdout)
        assert answer["name"] == name and answer["api_key"], answer
        return answer["api_key"]

    def devices(self) -> dict[str, dict]:
        proc = assert_ok(self.admin("devices", "--json"))
        return {d["name"]: d for d in json.loads(proc.stdout)["devices"]}


class Device:
    """One machine: its HOME, cc's database (cc's own autocommit connection), its .env."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.home = root / f"home_{name}"
        self.cc_dir = self.home / ".cc-cli"
        self.cc_dir.mkdir(parents=True)
        self.db = self.cc_dir / "cc_cli.db"
        self.env_file = self.cc_dir / ".env"
        self.conn = make_cc_db(self.db)

    def cli(self, *args: object, **kw) -> subprocess.CompletedProcess:
        return run_cli(self.home, *args, **kw)

    def ok(self, *args: object, **kw) -> subprocess.CompletedProcess:
        return assert_ok(self.cli(*args, **kw))

    def json(self, *args: object, **kw) -> dict:
        """Run a command with --json; its stdout must be exactly one JSON object."""
        out = json.loads(self.ok(*args, "--json", **kw).stdout)
        assert isinstance(out, dict), out
        return out

    def setup(self, url: str, key: str) -> dict:
        return self.json("setup", "--server", url, "--api-key", key)

    def sql(self, query: str, *args):
        """SQL as cc runs it: its own connection, autocommit."""
        return self.conn.execute(query, args).fetchall()

    def value(self, query: str, *args):
        rows = self.sql(query, *args)
        assert len(rows) == 1, rows
        return rows[0][0]

    def content(self) -> dict:
        return content(self.conn)

    def close(self) -> None:
        self.conn.close()


@functools.lru_cache(maxsize=None)
def shared_vault_text() -> str:
    """The vault TEST_PASSPHRASE gives under a fixed salt (derived once, at
    the real cost): devices configured by hand share it with those that ran
    ``setup`` on a store it made end to end."""
    import ccsync
    return ccsync.Vault.derive(TEST_PASSPHRASE, b"ccsync-tests-salt").text()


def hand_env(url: str, key: str) -> str:
    """A device's .env as a user writes it by hand (what setup would save)."""
    return f"CC_SERVER={url}\nCC_API_KEY={key}\nCCSYNC_E2E_KEY={shared_vault_text()}\n"


def vault_line(device: "Device") -> str:
    """The CCSYNC_E2E_KEY value a device's .env holds."""
    for line in device.env_file.read_text().splitlines():
        if line.startswith("CCSYNC_E2E_KEY="):
            return line.split("=", 1)[1]
    raise AssertionError(f"no CCSYNC_E2E_KEY in {device.env_file}")


def wait_for_clock_tick(seconds: float = 0.02) -> None:
    """Let the wall clock (ms resolution, used by the capture triggers) move on."""
    time.sleep(seconds)


__all__ = ["REPO", "CCSYNC", "TEST_PASSPHRASE", "ServerProcess", "Device", "run_cli", "clean_env", "assert_ok",
           "assert_error", "hand_env", "vault_line", "shared_vault_text", "utc_now_iso", "parse_utc", "dead_port", "wait_for_clock_tick"]
