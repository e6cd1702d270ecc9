"""Malformed requests get a 4xx JSON answer with a status line (written by a reviewer
attacking the bounded server; each case failed on its first version)."""

from __future__ import annotations

import json

import pytest

import ccsync
from server_attacks import exchange
from test_transport import start_server  # noqa: F401  (fixture)


@pytest.mark.parametrize("digit", [b"\xb2", b"\xb3", b"\xb9"])      # ², ³, ¹ in latin-1
def test_a_superscript_digit_content_length_gets_a_4xx(start_server, digit):
    """_Handler._length: '²'.isdigit() is True but int('²') raises ValueError, which
    escapes _serve: the connection closes with no answer at all."""
    srv = start_server()
    for request in (b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: " + digit
                    + b"\r\n\r\n", b"GET /health HTTP/1.1\r\nContent-Length: " + digit
                    + b"\r\n\r\n"):
        answer = exchange(srv.server_address[:2], request)
        assert answer.startswith(b"HTTP/1.1 4"), (request, answer, srv.lines[-1:])
    assert not any("connection error" in line for line in srv.lines), srv.lines


def test_dispatch_never_raises_on_a_superscript_content_length(srv):
    """dispatch() says "Never raises": the same isdigit()/int() mismatch."""
    status, _h, _b = ccsync.dispatch(srv, "POST", "/v1/hello",
                                     {"Content-Length": "²"}, b"")
    assert 400 <= status < 500


@pytest.fixture
def srv(start_server):
    return start_server()


@pytest.mark.parametrize("request_line", [b"GET / HTTP/2.0", b"GET /health HTTX/1.1",  # not 0.9-style
                                          b"GET / HTTP/1.x"])
def test_a_bad_request_version_gets_an_http_status_line(srv, request_line):
    """_Handler.send_error -> _respond -> send_response: parse_request has left
    request_version at 'HTTP/0.9', so no status line and no headers are written,
    only the bare JSON body -- not a 4xx any HTTP client can read."""
    answer = exchange(srv.server_address[:2], request_line + b"\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT"])
def test_405_on_health_advertises_the_method_that_works_there(srv, method):
    """error_answer: every 405 with code 'method' says Allow: POST, but POST /health
    is itself a 405 (Allow: GET). A HEAD answer also carries a body."""
    answer = exchange(srv.server_address[:2],
                      f"{method} /health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    allow = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"allow:")]
    assert allow == [b"Allow: GET"], allow
    if method == "HEAD":
        assert body == b"", body


def test_expect_100_continue_is_not_granted_before_the_head_is_checked(srv):
    """parse_request -> handle_expect_100 sends '100 Continue' before admit() runs,
    inviting an unsigned client to send its body (then drained for up to 2 s)."""
    answer = exchange(srv.server_address[:2], (
        f"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: {ccsync.WIRE_TYPE}\r\n"
        "Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n").encode())
    assert not answer.startswith(b"HTTP/1.1 100"), answer[:120]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "unauthenticated"
