"""A server on the internet: every attack gets a bounded answer, and /health answers.

Against the real SyncServer on 127.0.0.1 (and, for memory, the real ``server``
process): slow request heads (slowloris), floods of half-sent requests that
fill every connection, unauthenticated bodies of any size, odd methods and odd
signature headers.  Each test asserts what a user relies on: the attack is cut
off or answered, nothing times out, ``/health`` keeps answering, and a device's
sync still goes through.  The long forms (more connections, longer runs) are
in ``make stress``; the figures (p99 of /health) are reported there.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import threading
import time

import pytest

import ccsync
from conftest import make_cc_db
from server_attacks import ServerProcess
from test_transport import (RAW_TIMEOUT, assert_healthy, error_json, host_port,  # noqa: F401
                            parse_raw_response, raw, raw_socket, register, signed,
                            start_server)


def open_slow(srv, data: bytes) -> socket.socket:
    """A connection that has sent ``data`` (part of a request) and then waits."""
    sock = socket.create_connection(host_port(srv), timeout=RAW_TIMEOUT)
    sock.sendall(data)
    return sock


def answer_or_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (RAW_TIMEOUT bounds the wait:
    a server that neither answers nor closes fails the test with a timeout)."""
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return b"".join(chunks)


def test_slow_request_heads_are_cut_off_and_health_answers_meanwhile(start_server):
    srv = start_server(idle_timeout=1.0)
    stop = threading.Event()
    socks = [open_slow(srv, b"POST /v1/push HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]

    def dribble():          # one more header byte a connection every 0.2 s: never whole
        while not stop.wait(0.2):
            for sock in socks:
                try:
                    sock.send(b"X")
                except OSError:
                    pass

    feeder = threading.Thread(target=dribble, daemon=True)
    feeder.start()
    try:
        for _ in range(5):
            assert_healthy(srv)
            time.sleep(0.1)
        ended = [answer_or_close(sock) for sock in socks]    # bounded by RAW_TIMEOUT
    finally:
        stop.set()
        feeder.join(5)
    for data in ended:      # an answer (a 4xx for the half head) or a plain close
        if data:
            status, body = parse_raw_response(data)
            assert 400 <= status < 500, data[:200]
    assert_healthy(srv)


def test_a_flood_of_half_sent_requests_gets_503s_health_answers_and_sync_resumes(
        tmp_path, start_server):
    srv = start_server(max_connections=4, idle_timeout=1.0)
    key = register(srv, "a")
    flood = [open_slow(srv, b"POST /v1/pull HTTP/1.1\r\nHost: x\r\nContent-Le")
             for _ in range(40)]
    try:
        time.sleep(0.2)
        # Every connection is taken: /health from another machine still answers (at
        # the door, which holds only 32 of the flood's own address) ...
        for _ in range(5):
            status, _h, body = raw(srv, "GET", "/health", source="127.0.0.2")
            assert status == 200 and json.loads(body)["status"] == "ok"
        # ... a device's request gets a fast 503 with Retry-After, not a hang ...
        headers, body = signed(key, "/v1/hello", {})
        status, answer_headers, answer = raw(srv, "POST", "/v1/hello", headers, body,
                                             source="127.0.0.3")
        assert status == 503 and answer_headers.get("retry-after") == "1"
        error_json(answer, "busy")
        # ... and the Client, backing off, gets through once the flood is cut off.
        cc = make_cc_db(tmp_path / "a.db")
        store = ccsync.open_store(str(tmp_path / "a.db"))
        cc.execute("INSERT INTO project (name) VALUES ('acme')")
        result = ccsync.sync_once(store, ccsync.Client(srv.url, key, timeout=RAW_TIMEOUT))
        assert result.accepted == 1
        # Every half-sent request was cut off, and none got further than a 4xx/503.
        for data in (answer_or_close(sock) for sock in flood):   # bounded by RAW_TIMEOUT
            if data:
                assert parse_raw_response(data)[0] in (400, 408, 413, 503), data[:100]
    finally:
        for sock in flood:
            sock.close()


@pytest.mark.parametrize("cut", [b"Content-Le", b"Content-Type: text/plain\r\n",
                                 b"X-Ccsync-Key: a"])
def test_a_head_cut_off_mid_way_is_never_served_as_a_request(start_server, cut):
    # What the deadline leaves of a half-sent head (its input shut) is not a
    # request: one 408, never an answer to whatever its first lines said.
    srv = start_server()
    sock = open_slow(srv, b"POST /v1/pull HTTP/1.1\r\nHost: x\r\n" + cut)
    try:
        sock.shutdown(socket.SHUT_WR)
        status, body = parse_raw_response(answer_or_close(sock))
        assert status == 408, body
        error_json(body, "bad_request")
    finally:
        sock.close()
    assert_healthy(srv)


def test_the_client_gives_up_on_a_server_that_stays_busy(start_server, monkeypatch):
    srv = start_server(max_connections=1, idle_timeout=30)
    key = register(srv, "a")
    holder = open_slow(srv, b"GET /health HTTP/1.1\r\nHo")    # the one slot, held
    waits: list[float] = []
    try:
        time.sleep(0.2)
        monkeypatch.setattr(ccsync.time, "sleep", waits.append)   # the backoff, not waited
        with pytest.raises(ccsync.RemoteError) as err:
            ccsync.Client(srv.url, key, timeout=RAW_TIMEOUT).hello()
    finally:
        holder.close()
    assert err.value.kind == "busy" and "busy" in str(err.value) and err.value.hint
    assert len(waits) == ccsync.Client.BUSY_RETRIES            # backing off, bounded
    assert all(0 < w <= 12 for w in waits) and sum(waits) >= 2, waits


def test_an_unauthenticated_body_is_refused_at_once_and_never_kept(start_server):
    srv = start_server()
    register(srv, "a")
    stranger = ccsync.DeviceKeys.from_api_key(ccsync.new_api_key())
    body = secrets.token_bytes(1024)
    for key_id in (stranger.key_id, "0" * 32):
        headers = {"Content-Type": ccsync.WIRE_TYPE,
                   **ccsync.signed_headers(stranger, "POST", "/v1/push", body,
                                           str(int(time.time())), secrets.token_hex(16))}
        headers[ccsync.H_KEY] = key_id
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        # It says 60 MiB and sends 1 KiB: the refusal comes at once, not after a timeout.
        sock = open_slow(srv, (f"POST /v1/push HTTP/1.1\r\nHost: x\r\n{head}"
                               f"Content-Length: {60 * 1024 * 1024}\r\n\r\n").encode() + body)
        status, answer = parse_raw_response(answer_or_close(sock))
        assert status == 401
        error_json(answer, "key_rejected")
    assert_healthy(srv)


def test_odd_signature_headers_and_methods_get_4xx_never_500(start_server):
    srv = start_server()
    key = register(srv, "a")
    headers, body = signed(key, "/v1/hello", {})
    for header in (ccsync.H_SIG, ccsync.H_HEAD):
        for odd in ("é" * 64, "\u00ff" * 10, "", "0" * 64, " " * 64):
            bad = dict(headers, **{header: odd})
            head = "".join(f"{k}: {v}\r\n" for k, v in bad.items())
            data = (f"POST /v1/hello HTTP/1.1\r\nHost: x\r\n{head}"
                    f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
            status, answer = parse_raw_response(raw_socket(srv, data))
            assert 400 <= status < 500, (header, odd, status)
            error_json(answer)
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "FOO", "BREW"):
        for path in ("/health", "/v1/push", "/nope"):
            status, answer_headers, answer = raw(srv, method, path, {"Content-Length": "0"})
            assert status == 405, (method, path)
            error_json(answer, "method")
            assert answer_headers.get("allow")
    status, _h, answer = raw(srv, "POST", "/health", {"Content-Length": "0"})
    assert status == 405
    assert "Traceback" not in "\n".join(srv.lines) and " 500 " not in "\n".join(srv.lines)


def test_a_request_from_an_older_device_is_told_to_upgrade(start_server):
    srv = start_server()
    key = register(srv, "a")
    headers, body = signed(key, "/v1/hello", {})
    del headers[ccsync.H_HEAD]                 # as protocol 2 signed its requests
    status, _h, answer = raw(srv, "POST", "/v1/hello", headers, body)
    assert status == 426
    assert "upgrade ccsync" in error_json(answer, "protocol")["error"]


def test_big_bodies_from_nobody_do_not_grow_the_server(tmp_path):
    """20 connections at once, each streaming a body it says is 60 MiB, without a
    key the server knows: the server answers each, and its memory stays put."""
    server = ServerProcess(tmp_path)
    port = server.port
    try:
        before = server.rss_kb()
        stranger = ccsync.DeviceKeys.from_api_key(ccsync.new_api_key())
        chunk = secrets.token_bytes(1 << 16)
        statuses: list[int] = []

        def attack() -> None:
            headers = {"Content-Type": ccsync.WIRE_TYPE, **ccsync.signed_headers(
                stranger, "POST", "/v1/push", b"", str(int(time.time())),
                secrets.token_hex(16))}
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            sock = socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT)
            try:
                sock.sendall((f"POST /v1/push HTTP/1.1\r\nHost: x\r\n{head}Content-Length: "
                              f"{60 * 1024 * 1024}\r\n\r\n").encode())
                with_answer = b""
                sock.settimeout(RAW_TIMEOUT)
                for _ in range(960):                    # up to 60 MiB, until cut off
                    try:
                        sock.sendall(chunk)
                    except OSError:
                        break
                with_answer = answer_or_close(sock)
                if with_answer.startswith(b"HTTP/1."):
                    statuses.append(parse_raw_response(with_answer)[0])
            finally:
                sock.close()

        threads = [threading.Thread(target=attack) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        after = server.rss_kb()
        assert len(statuses) >= 10 and all(s == 401 for s in statuses), statuses
        assert after - before < 40 * 1024, (before, after)     # not 20 x 60 MiB
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
