"""Long form: 300 mixed junk connections leave no thread or slot behind (make stress)."""

from __future__ import annotations

import socket
import threading
import time

from server_attacks import T, hello_status
from test_transport import register, start_server  # noqa: F401  (fixture)


def test_no_thread_or_slot_leak_after_mixed_junk(start_server):
    """Holds: after 300 junk connections of many kinds, threads return to the
    baseline and every slot is free again."""
    srv = start_server(max_connections=8, idle_timeout=0.5)
    key = register(srv, "a")
    before = threading.active_count()
    junk = [b"", b"GET /health HTTP/1.1\r\n", b"\x16\x03\x01\x00\xa5\x01\x00",
            b"POST /v1/push HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc",
            b"GET /health HTTP/1.1\r\n\r\n" * 50, b"A" * 20000, b"GET /" + b"a" * 70000,
            b"POST /v1/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]
    socks = []
    for i in range(300):
        sock = socket.create_connection(srv.server_address[:2], timeout=T)
        with __import__("contextlib").suppress(OSError):
            sock.sendall(junk[i % len(junk)])
            if i % 3 == 0:
                sock.shutdown(socket.SHUT_WR)
        socks.append(sock)
    time.sleep(0.2)
    for sock in socks[::2]:
        sock.close()
    time.sleep(3.0)                                  # > idle 0.5 + drain 2 s
    for sock in socks[1::2]:
        sock.close()
    time.sleep(0.5)
    assert threading.active_count() <= before, (before, threading.active_count())
    assert [hello_status(srv, key) for _ in range(8)] == [200] * 8
    assert not any("Traceback" in line or " 500 " in line for line in srv.lines)
