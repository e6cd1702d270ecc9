"""Shared helpers for the server attack tests (test_server_*.py, stress_server_*.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T = 10.0                                    # every socket gives up after this


def read_all(sock: socket.socket, limit: float = T) -> bytes:
    """Everything until the server closes (bounded by ``limit``)."""
    sock.settimeout(limit)
    chunks, deadline = [], time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (ConnectionResetError, socket.timeout):
        pass
    return b"".join(chunks)


def exchange(address, data: bytes, *, shut_write: bool = False) -> bytes:
    with socket.create_connection(address, timeout=T) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def hello_status(srv, key: str) -> int:
    """The status a signed ``/v1/hello`` gets on a connection of its own (-1: none)."""
    from test_transport import signed       # (test_transport imports nothing from here)
    headers, body = signed(key, "/v1/hello", {})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    answer = exchange(srv.server_address[:2], (
        f"POST /v1/hello HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body)
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else -1


class ServerProcess:
    """The real ``ccsync.py server`` on 127.0.0.1, port 0; stderr to a log file."""

    def __init__(self, tmp_path: Path, *args: str):
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        self.log = tmp_path / "server.log"
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "ccsync.py"), "server", "--host", "127.0.0.1",
             "--port", "0", "--data", str(tmp_path / "server.db"), *args],
            env={"HOME": str(home), "PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"},
            stderr=self._err, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.port = None
        for _ in range(200):
            text = self.log.read_text()
            if "listening on" in text:
                self.port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
                break
            time.sleep(0.05)
        if self.port is None:
            self.stop()
            raise AssertionError(self.log.read_text())

    def rss_kb(self) -> int:
        """The server process's resident memory now (KiB)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def rss_mb(self) -> int:
        return self.rss_kb() // 1024

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._err.close()
