"""Holding connection slots: a device still gets in (written by a reviewer attacking
the bounded server; each case failed on its first version)."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import pytest

import ccsync
from server_attacks import HEALTH, T, exchange, hello_status
from test_transport import register, start_server  # noqa: F401  (fixture)

def test_kept_alive_health_polls_hold_every_slot_past_the_idle_timeout(start_server):
    """Sockets that each send a tiny GET /health just inside every idle timeout
    must not keep every slot for good: /health (and any answer while every slot is
    taken) closes its connection.  Here 4 slots, idle 1 s, held for 2.5 s."""
    srv = start_server(max_connections=4, idle_timeout=1.0)
    key = register(srv, "a")
    holders = [socket.create_connection(srv.server_address[:2], timeout=T) for _ in range(4)]
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(0.5):
            for sock in holders:
                with __import__("contextlib").suppress(OSError):
                    sock.sendall(HEALTH)
                    sock.recv(65536)

    for sock in holders:
        sock.sendall(HEALTH)
        sock.recv(65536)
    feeder = threading.Thread(target=keep, daemon=True)
    feeder.start()
    statuses = []
    try:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            statuses.append(hello_status(srv, key))
            time.sleep(0.25)
    finally:
        stop.set()
        feeder.join(5)
        for sock in holders:
            sock.close()
    assert 200 in statuses, statuses          # a device got in


def test_a_thread_that_fails_to_start_does_not_leak_its_slot(start_server, monkeypatch):
    """Fault injection (the process at its thread / pid limit): SyncServer.process_request
    acquires a slot, Thread.start() raises, socketserver's handle_error swallows it and
    the slot is never released.  With max_connections=1, one failure = 503 forever."""
    srv = start_server(max_connections=1)
    key = register(srv, "a")
    real_start, failed = threading.Thread.start, []

    def start_once_failing(self):
        if self.name == "ccsync-conn" and not failed:
            failed.append(1)
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    exchange(srv.server_address[:2], HEALTH)          # this one hits the failure
    monkeypatch.setattr(threading.Thread, "start", real_start)
    time.sleep(0.3)
    assert failed
    statuses = [hello_status(srv, key) for _ in range(3)]
    assert statuses == [200, 200, 200], statuses       # got: [503, 503, 503]




def test_a_big_push_to_a_busy_server_is_retried_as_busy_not_cut(start_server, monkeypatch):
    """The door answers 503 and then reads and drops the body while it keeps coming,
    so a big push (12 MB, more than the client's send buffer) reads the 503 and is
    retried as busy, instead of failing as a cut connection."""
    srv = start_server(max_connections=1, idle_timeout=30)
    key = register(srv, "a")
    holder = socket.create_connection(srv.server_address[:2], timeout=T)
    holder.sendall(b"GET /health HTTP/1.1\r\nHo")                # the one slot, held
    monkeypatch.setattr(ccsync.time, "sleep", lambda s: None)     # backoff not waited
    try:
        time.sleep(0.2)
        with pytest.raises(ccsync.RemoteError) as small:
            ccsync.Client(srv.url, key, timeout=T).push([{"x": "y"}])
        with pytest.raises(ccsync.RemoteError) as big:
            ccsync.Client(srv.url, key, timeout=T).push(
                [{"x": secrets.token_hex(3_000_000)} for _ in range(2)])
    finally:
        holder.close()
    assert small.value.kind == "busy"
    assert big.value.kind == "busy", (big.value.kind, str(big.value))
