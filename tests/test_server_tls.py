"""Over TLS, the reaper's shutdown must not turn the rest of the connection into plaintext."""

from __future__ import annotations

import os
import socket
import ssl
import time

import ccsync
from server_attacks import T, read_all
from test_transport import start_server, tls_files  # noqa: F401  (fixtures)


def test_an_answer_after_a_late_read_is_not_sent_in_plaintext(start_server, tls_files):
    """The reaper cuts a late read short with the plain socket's shutdown: an
    SSLSocket's own shutdown() drops the TLS layer (_sslobj = None), and the 4xx for
    the cut-short request went out in clear text inside the TLS connection."""
    cert, key_file = tls_files
    srv = start_server(tls=ccsync.tls_context(cert, key_file), idle_timeout=1.0)
    context = ssl.create_default_context(cafile=cert)
    raw = socket.create_connection(srv.server_address[:2], timeout=T)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /v1/push HTTP/1.1\r\nHost: x\r\n")
        for _ in range(8):          # a byte every 0.3 s: the socket timeout never fires,
            time.sleep(0.3)         # the reaper's 1 s head deadline does
            try:
                tls.sendall(b"X")
            except (OSError, ssl.SSLError):
                break
        # What is on the wire, bypassing our TLS layer:
        wire = socket.socket(fileno=os.dup(tls.fileno()))
        try:
            data = read_all(wire, 3.0)
        finally:
            wire.close()
    assert b"HTTP/1.1 " not in data, data[data.find(b"HTTP/1.1"):][:120]   # nothing in clear


def _tls_request(srv, cert: str, method: str, path: str, headers=None, body=b""):
    """(status, headers, body) of one request over TLS (a new connection)."""
    import http.client
    context = ssl.create_default_context(cafile=cert)
    host, port = srv.server_address[:2]
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=T)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def test_over_tls_a_full_server_answers_health_and_503_at_the_door(start_server, tls_files,
                                                                  tmp_path):
    """Every connection taken (by TLS connections that never finish a request):
    /health still answers over TLS, a device gets a fast 503 with Retry-After, and
    the Client, backing off, gets through once a slot is free."""
    import json
    from conftest import make_cc_db
    from test_transport import error_json, register, signed
    cert, key_file = tls_files
    srv = start_server(tls=ccsync.tls_context(cert, key_file), max_connections=2,
                       idle_timeout=30)
    key = register(srv, "a")
    context = ssl.create_default_context(cafile=cert)
    holders = []
    try:
        for _ in range(2):          # the two slots, each held by a half-sent head
            raw = socket.create_connection(srv.server_address[:2], timeout=T)
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"POST /v1/pull HTTP/1.1\r\nHo")
            holders.append(tls)
        time.sleep(0.2)
        started = time.monotonic()
        status, _h, body = _tls_request(srv, cert, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        headers, body = signed(key, "/v1/hello", {})
        status, answer_headers, answer = _tls_request(srv, cert, "POST", "/v1/hello",
                                                      headers, body)
        assert status == 503 and answer_headers.get("retry-after") == "1", answer
        error_json(answer, "busy")
        assert time.monotonic() - started < T       # answered, not left hanging
        holders.pop().close()                       # a slot comes free
        cc = make_cc_db(tmp_path / "a.db")
        store = ccsync.open_store(str(tmp_path / "a.db"))
        cc.execute("INSERT INTO project (name) VALUES ('acme')")
        result = ccsync.sync_once(store, ccsync.Client(srv.url, key, ca_file=cert, timeout=T))
        assert result.accepted == 1
        store.conn.close()
    finally:
        for tls in holders:
            tls.close()
