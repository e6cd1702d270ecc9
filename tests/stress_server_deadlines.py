"""Long form: deadlines that must fire, and a genuine big push that must still go
through with a tiny idle timeout (make stress)."""

from __future__ import annotations

import secrets
import socket
import time

import ccsync
from conftest import make_cc_db
from test_transport import register, signed, start_server  # noqa: F401  (fixture)

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_client_that_reads_its_answers_1_byte_at_a_time_is_cut(start_server):
    """Pipelined /health requests, answers read at ~10 B/s through a 4 KiB window:
    the write deadline (request_timeout 1 s) closes it and the only slot frees."""
    srv = start_server(max_connections=1, request_timeout=1.0, idle_timeout=5.0)
    key = register(srv, "a")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(srv.server_address[:2])
    sock.settimeout(0.1)
    started, cut = time.monotonic(), None
    try:
        while time.monotonic() - started < 15:
            try:
                sock.send(HEALTH * 50)
            except socket.timeout:
                pass
            except OSError:
                cut = time.monotonic() - started
                break
            try:
                if sock.recv(1) == b"":
                    cut = time.monotonic() - started
                    break
            except socket.timeout:
                pass
            except OSError:
                cut = time.monotonic() - started
                break
    finally:
        sock.close()
    assert cut is not None and cut < 8, cut
    assert ccsync.Client(srv.url, key, timeout=5).hello()["device"] == "a"


def test_a_big_push_goes_through_with_a_tiny_idle_timeout(tmp_path, start_server):
    """--idle-timeout 0.05 s: 24 MB of pushes and a 3000-row sync (12 MB) still go through."""
    srv = start_server(idle_timeout=0.05)
    key = register(srv, "a")
    client = ccsync.Client(srv.url, key, timeout=30)
    answer = client.push([{"junk": secrets.token_hex(500_000)} for _ in range(24)])
    assert len(answer["results"]) == 24
    cc = make_cc_db(tmp_path / "a.db")
    store = ccsync.open_store(str(tmp_path / "a.db"))
    for _ in range(3000):
        cc.execute("INSERT INTO project (name) VALUES (?)", (secrets.token_hex(2000),))
    assert ccsync.sync_once(store, client).accepted == 3000
    client.close()
    store.conn.close()
    cc.close()


def test_a_refused_body_that_keeps_coming_is_cut_after_2_s(start_server):
    """Unsigned POST, Content-Length 1 GiB, streamed as fast as loopback goes: the 413
    comes once the 2 s drain (or 128 MiB) is over, and nothing is kept."""
    srv = start_server()
    sock = socket.create_connection(srv.server_address[:2], timeout=10)
    sock.sendall(f"POST /v1/push HTTP/1.1\r\nContent-Type: {ccsync.WIRE_TYPE}\r\n"
                 f"Content-Length: {1 << 30}\r\n\r\n".encode())
    chunk, started = b"\0" * (1 << 16), time.monotonic()
    try:
        while time.monotonic() - started < 10:
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        sock.close()
    assert time.monotonic() - started < 4
    assert any(" 413 " in line for line in srv.lines), srv.lines     # too_large, first
