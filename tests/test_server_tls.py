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
