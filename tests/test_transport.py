"""The network transport: a real SyncServer on a thread, real Clients, raw sockets.

Each test states one thing a user relies on when ccsync talks over a
network: only registered, unrevoked devices get in; a captured request
cannot be replayed or altered; answers are authenticated; bodies are
bounded; nothing readable crosses the wire; the server survives bad input
and concurrent clients; TLS works with a private CA.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import pytest

import ccsync
from conftest import content, make_cc_db

pytestmark = pytest.mark.skipif(not ccsync.crypto_available(),
                                reason="the transport needs pycryptodomex")

RAW_TIMEOUT = 10.0          # every raw socket in this file gives up after this


##### helpers ##################################################################

@pytest.fixture
def start_server(tmp_path):
    """A factory: start_server(**SyncServer kwargs) -> a started server (stopped at teardown)."""
    made = []

    def start(data: str = "server.db", **kw) -> ccsync.SyncServer:
        lines: list[str] = []
        srv = ccsync.SyncServer(("127.0.0.1", 0), str(tmp_path / data), log=lines.append,
                                **kw).start()
        srv.lines = lines
        made.append(srv)
        return srv

    yield start
    for srv in made:
        srv.stop()


@pytest.fixture
def srv(start_server):
    return start_server()


def register(srv: ccsync.SyncServer, name: str, *, rotate: bool = False) -> str:
    store = ccsync.ServerStore.open(srv.data_path)
    try:
        return store.register(name, rotate=rotate)
    finally:
        store.conn.close()


def server_sql(srv: ccsync.SyncServer, query: str, *args):
    store = ccsync.ServerStore.open(srv.data_path)
    try:
        return store.conn.execute(query, args).fetchall()
    finally:
        store.conn.close()


def change_rows(srv: ccsync.SyncServer) -> list[tuple]:
    return [tuple(r) for r in server_sql(srv, "SELECT * FROM change ORDER BY seq")]


def host_port(srv) -> tuple[str, int]:
    return srv.server_address[0], srv.server_address[1]


def raw(srv, method: str, path: str, headers: dict | None = None,
        body: bytes | None = None, *, source: str | None = None) -> tuple[int, dict, bytes]:
    """One request over a fresh http.client connection: (status, lower-cased headers, body).

    ``source``: from that loopback address (another machine than 127.0.0.1)."""
    conn = http.client.HTTPConnection(*host_port(srv), timeout=RAW_TIMEOUT,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_socket(srv, data: bytes, *, shut_write: bool = False) -> bytes:
    """Send raw bytes, read the whole answer until the server closes (bounded)."""
    with socket.create_connection(host_port(srv), timeout=RAW_TIMEOUT) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + RAW_TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def parse_raw_response(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), data[:200]
    return int(head.split(b" ", 2)[1]), body


def error_json(body: bytes, code: str | None = None) -> dict:
    """An error answer is JSON with an "error" message (and never a traceback)."""
    assert b"Traceback" not in body
    assert b'File "' not in body
    info = json.loads(body)
    assert isinstance(info, dict) and isinstance(info.get("error"), str) and info["error"]
    if code is not None:
        assert info.get("code") == code, info
    return info


def assert_healthy(srv) -> None:
    status, _headers, body = raw(srv, "GET", "/health")
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def signed(api_key: str, path: str, payload=None, *, body: bytes | None = None,
           stamp: str | None = None, nonce: str | None = None, seal_path: str | None = None,
           method: str = "POST") -> tuple[dict, bytes]:
    """Headers and body of a request built the way Client._request builds one.

    ``body`` replaces the sealed payload (still correctly signed); ``seal_path``
    seals the payload for another endpoint than the one signed for.
    """
    keys = ccsync.DeviceKeys.from_api_key(api_key)
    stamp = str(int(time.time())) if stamp is None else stamp
    nonce = nonce or secrets.token_hex(16)
    context = ccsync.request_context(method, path, stamp, nonce, keys.key_id)
    if body is None:
        seal_ctx = context if seal_path is None else ccsync.request_context(
            method, seal_path, stamp, nonce, keys.key_id)
        payload = {} if payload is None else payload
        if isinstance(payload, dict) and "protocol" not in payload:
            payload = {**payload, "protocol": ccsync.PROTOCOL}   # as Client._request does
        body = ccsync.seal(keys.enc, payload, seal_ctx)
    headers = {"Content-Type": ccsync.WIRE_TYPE,
               **ccsync.signed_headers(keys, method, path, body, stamp, nonce)}
    return headers, body


class RecordingClient(ccsync.Client):
    """A Client that keeps every request it sent and every answer it got."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent: list[tuple[str, dict, bytes]] = []
        self.answers: list[tuple[int, dict, bytes]] = []

    def _send(self, request):
        self.sent.append((request.path, dict(request.headers), request.body))
        answer = super()._send(request)
        self.answers.append(answer)
        return answer


class CannedClient(ccsync.Client):
    """A Client whose transport always returns one canned (status, headers, body)."""

    def __init__(self, canned, *args, **kw):
        super().__init__(*args, **kw)
        self.canned = canned

    def _send(self, request):
        return self.canned


def new_device(path: Path, url: str, api_key: str, **client_kw):
    """(cc's own connection, ccsync Store, Client) for a fresh cc database."""
    cc = make_cc_db(path)
    return cc, ccsync.open_store(str(path)), ccsync.Client(url, api_key, **client_kw)


##### 1. endpoints and the refusal of anything unsigned #########################

def test_health_is_public_and_everything_else_needs_a_signed_sealed_post(srv):
    status, headers, body = raw(srv, "GET", "/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    info = json.loads(body)
    assert info == {"status": "ok", "version": ccsync.__version__}

    status, _h, body = raw(srv, "GET", "/nope")
    assert status == 404
    error_json(body, "not_found")
    status, _h, body = raw(srv, "POST", "/v1/nope", {"Content-Type": ccsync.WIRE_TYPE}, b"x")
    assert status == 404
    error_json(body, "not_found")

    for path in ("/v1/push", "/v1/pull", "/v1/hello"):
        status, _h, body = raw(srv, "GET", path)
        assert status == 405, path
        error_json(body, "method")

    status, _h, body = raw(srv, "POST", "/v1/push", {"Content-Type": "application/json"},
                           b'{"records": [], "cursor": 0}')
    assert status == 415
    assert error_json(body, "plaintext")["error"] == "plaintext requests are refused"

    status, _h, body = raw(srv, "POST", "/v1/push", {"Content-Type": ccsync.WIRE_TYPE},
                           b"\x00" * 64)
    assert status == 401
    error_json(body, "unauthenticated")
    assert change_rows(srv) == []


##### 2. keys: unknown, revoked, rotated #######################################

def test_unknown_revoked_and_rotated_keys(srv):
    key_a = register(srv, "a")
    assert ccsync.Client(srv.url, key_a).hello()["device"] == "a"

    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url, ccsync.new_api_key()).hello()
    assert err.value.kind == "key_rejected"
    assert "rejected" in str(err.value) and "register" in err.value.hint

    old_b = register(srv, "b")
    assert ccsync.Client(srv.url, old_b).hello()["device"] == "b"
    new_b = register(srv, "b", rotate=True)
    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url, old_b).hello()
    assert err.value.kind == "key_rejected"
    assert ccsync.Client(srv.url, new_b).hello()["device"] == "b"

    store = ccsync.ServerStore.open(srv.data_path)
    store.revoke("a")
    store.conn.close()
    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url, key_a).push([], 0)
    assert err.value.kind == "revoked"
    assert "revoked" in str(err.value) and "--rotate" in err.value.hint
    headers, body = signed(key_a, "/v1/hello", {})
    status, _h, answer = raw(srv, "POST", "/v1/hello", headers, body)
    assert status == 403
    error_json(answer, "revoked")

    # Rotating a revoked device brings it back with the new key only.
    new_a = register(srv, "a", rotate=True)
    assert ccsync.Client(srv.url, new_a).hello()["device"] == "a"
    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url, key_a).hello()
    assert err.value.kind == "key_rejected"


##### 3. replay ################################################################

def test_a_captured_request_cannot_be_replayed(tmp_path, start_server):
    srv = start_server()
    key = register(srv, "a")
    cc, store, _ = new_device(tmp_path / "a.db", srv.url, key)
    cc.execute("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    client = RecordingClient(srv.url, key)
    result = ccsync.sync_once(store, client)
    assert result.accepted == 1
    pushes = [s for s in client.sent if s[0] == "/v1/push"]
    pulls = [s for s in client.sent if s[0] == "/v1/pull"]
    assert pushes and pulls
    before = change_rows(srv)
    assert len(before) == 1

    for path, headers, body in (pushes[0], pulls[0]):
        status, _h, answer = raw(srv, "POST", path, headers, body)
        assert status == 401, path
        assert "replay" in error_json(answer, "replay")["error"]
    assert change_rows(srv) == before

    # The nonce store is on disk: a restarted server still refuses the replay.
    srv.stop()
    srv2 = start_server()
    path, headers, body = pushes[0]
    status, _h, answer = raw(srv2, "POST", path, headers, body)
    assert status == 401
    error_json(answer, "replay")
    assert change_rows(srv2) == before
    store.conn.close()
    cc.close()


def test_replay_after_nonce_expiry_is_still_refused(start_server):
    """Old nonces are forgotten only once their timestamp is out of the skew window."""
    now = [1_700_000_000.0]
    srv = start_server(clock=lambda: now[0])
    key = register(srv, "a")
    # The device's clock is as far ahead as the server accepts.
    h1, b1 = signed(key, "/v1/hello", {}, stamp=str(int(now[0]) + ccsync.MAX_SKEW_S - 1))
    assert ccsync.dispatch(srv, "POST", "/v1/hello", h1, b1)[0] == 200
    now[0] += 2 * ccsync.MAX_SKEW_S + 50           # the first nonce is pruned now...
    h2, b2 = signed(key, "/v1/hello", {}, stamp=str(int(now[0])))
    assert ccsync.dispatch(srv, "POST", "/v1/hello", h2, b2)[0] == 200
    status, _h, answer = ccsync.dispatch(srv, "POST", "/v1/hello", h1, b1)
    assert status == 401                           # ...but its timestamp is stale
    error_json(answer)


##### 4. tampering and clock skew ##############################################

def test_tampered_or_forged_bodies_are_refused(srv):
    key = register(srv, "a")
    keys = ccsync.DeviceKeys.from_api_key(key)

    headers, body = signed(key, "/v1/push", {"records": [], "cursor": None})
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    status, _h, answer = raw(srv, "POST", "/v1/push", headers, bytes(flipped))
    assert status == 401
    error_json(answer, "bad_signature")
    # The refused copy did not burn the genuine request's nonce.
    status, _h, _a = raw(srv, "POST", "/v1/push", headers, body)
    assert status == 200

    # Changed ciphertext, signature recomputed: the encryption layer refuses it.
    headers, body = signed(key, "/v1/push", {"records": [], "cursor": None})
    flipped = bytearray(body)
    flipped[20] ^= 0x80
    headers, body = signed(key, "/v1/push", body=bytes(flipped))
    status, _h, answer = raw(srv, "POST", "/v1/push", headers, body)
    assert status == 400
    error_json(answer, "bad_body")

    # A body sealed for another endpoint (right key, wrong context).
    headers, body = signed(key, "/v1/push", {"records": [], "cursor": None},
                           seal_path="/v1/hello")
    status, _h, answer = raw(srv, "POST", "/v1/push", headers, body)
    assert status == 400
    error_json(answer, "bad_body")

    # Signed garbage of every short and long shape.
    for garbage in (b"", b"x", b"\x00" * 27, secrets.token_bytes(28), secrets.token_bytes(5000)):
        stamp, nonce = str(int(time.time())), secrets.token_hex(16)
        context = ccsync.request_context("POST", "/v1/pull", stamp, nonce, keys.key_id)
        headers = {"Content-Type": ccsync.WIRE_TYPE,
                   **ccsync.signed_headers(keys, "POST", "/v1/pull", garbage, stamp, nonce)}
        status, _h, answer = raw(srv, "POST", "/v1/pull", headers, garbage)
        assert status == 400, garbage[:10]
        error_json(answer, "bad_body")
        assert_healthy(srv)
    assert change_rows(srv) == []
    assert ccsync.Client(srv.url, key).hello()["device"] == "a"


@pytest.mark.parametrize("offset", [3600, -3600])
def test_clock_skew_is_reported_as_such(srv, offset):
    key = register(srv, "a")
    client = ccsync.Client(srv.url, key, clock=lambda: time.time() + offset)
    with pytest.raises(ccsync.RemoteError) as err:
        client.hello()
    assert err.value.kind == "clock_skew"
    assert "clock skew" in str(err.value)
    assert "clock" in err.value.hint
    # A few seconds off is fine.
    assert ccsync.Client(srv.url, key, clock=lambda: time.time() + 30).hello()["device"] == "a"


##### 5. the client authenticates answers ######################################

class _FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):   # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, body = self.server.canned
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    """An impostor HTTP server on 127.0.0.1 answering whatever ``.canned`` holds."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    httpd.daemon_threads = True
    httpd.canned = (200, {}, b"")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = "http://127.0.0.1:%d" % httpd.server_address[1]
    yield httpd
    httpd.shutdown()
    thread.join(5)
    httpd.server_close()


def test_unauthenticated_answers_are_refused(srv, fake_server):
    key = register(srv, "a")
    recorder = RecordingClient(srv.url, key)
    genuine = recorder.pull(0)
    assert genuine["records"] == []
    status, headers, body = recorder.answers[-1]
    assert status == 200

    cases = [
        (200, {"Content-Type": "application/json"}, b'{"records": [], "cursor": 0}'),
        (200, {"Content-Type": ccsync.WIRE_TYPE}, body),                     # no signature
        (200, {"Content-Type": ccsync.WIRE_TYPE, ccsync.H_SIG: "0" * 64}, body),
        # A genuine, correctly signed answer, but to an earlier request.
        (200, {"Content-Type": ccsync.WIRE_TYPE, ccsync.H_SIG: headers[ccsync.H_SIG.lower()]},
         body),
    ]
    for canned in cases:
        fake_server.canned = canned
        with pytest.raises(ccsync.RemoteError) as err:
            ccsync.Client(fake_server.url, key).pull(0)
        assert err.value.kind == "bad_response", canned
        assert "authentication" in str(err.value)

    # The same replayed answer, handed straight to the client.
    with pytest.raises(ccsync.RemoteError) as err:
        CannedClient((status, headers, body), srv.url, key).pull(0)
    assert err.value.kind == "bad_response"

    # A real server that holds a different key for this key id cannot exist;
    # one that does not know the key at all says so (it does not answer 200).
    other = ccsync.new_api_key()
    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url, other).pull(0)
    assert err.value.kind == "key_rejected"


##### 6. body limits ###########################################################

@pytest.mark.parametrize("payload_bytes", [4_000, 200_000, 16_000_000])
def test_a_push_past_max_body_is_refused_as_too_large(start_server, payload_bytes):
    """Whatever the size, the user is told "too large" (and how to fix it), not "unreachable"."""
    srv = start_server(max_body=1000, request_timeout=2)
    key = register(srv, "a")
    client = ccsync.Client(srv.url, key, timeout=RAW_TIMEOUT)
    records = [{"t": "setting", "id": "s1", "dev": "d", "c": {"value": 1},
                "p": {"name": "theme", "value": secrets.token_hex(payload_bytes // 2)}}]
    with pytest.raises(ccsync.RemoteError) as err:
        client.push(records, None)
    assert err.value.kind == "too_large", str(err.value)
    assert "too large" in str(err.value)
    assert "--max-body" in err.value.hint
    assert change_rows(srv) == []
    assert_healthy(srv)
    assert client.hello()["device"] == "a"


def test_missing_negative_or_lying_content_length_is_refused(start_server):
    srv = start_server(max_body=1000, request_timeout=2)
    key = register(srv, "a")
    headers, body = signed(key, "/v1/hello", {})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    def request(length_header: str) -> bytes:
        return (f"POST /v1/hello HTTP/1.1\r\nHost: x\r\n{head}{length_header}\r\n").encode()

    for length in (None, "-5", "abc", "+5", "1e3", "99999999999999999999"):
        line = "" if length is None else f"Content-Length: {length}\r\n"
        status, answer = parse_raw_response(raw_socket(srv, request(line)))
        assert status == 413, length
        error_json(answer, "too_large")
        assert_healthy(srv)

    # A length other than the one signed is refused before any body is read.
    status, answer = parse_raw_response(raw_socket(srv, request("Content-Length: 100\r\n")
                                                   + body[:10], shut_write=True))
    assert status == 401
    error_json(answer, "bad_signature")

    # Signed for 100 (a body cut on the way), sends 10 and closes its side.
    keys = ccsync.DeviceKeys.from_api_key(key)
    context = ccsync.request_context("POST", "/v1/hello", headers[ccsync.H_TIME],
                                     headers[ccsync.H_NONCE], keys.key_id)
    headers[ccsync.H_HEAD] = ccsync.sign(keys.mac, ccsync.head_context(context, 100), b"")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    started = time.monotonic()
    data = raw_socket(srv, request("Content-Length: 100\r\n") + body[:10], shut_write=True)
    status, answer = parse_raw_response(data)
    assert status == 400
    error_json(answer, "bad_body")
    assert time.monotonic() - started < 5

    # Signed for 100, sends 10 and waits: the server gives up after its request timeout.
    started = time.monotonic()
    data = raw_socket(srv, request("Content-Length: 100\r\n") + body[:10])
    status, answer = parse_raw_response(data)
    assert status == 400
    error_json(answer, "bad_body")
    assert time.monotonic() - started < RAW_TIMEOUT - 1
    assert_healthy(srv)
    assert server_sql(srv, "SELECT count(*) FROM nonce")[0][0] == 0


def test_a_decompression_bomb_is_refused(start_server):
    srv = start_server(max_body=1_000_000)
    key = register(srv, "a")
    payload = {"records": [], "cursor": None, "pad": "0" * 5_000_000}
    headers, body = signed(key, "/v1/push", payload)
    assert len(body) < 100_000                     # small on the wire...
    status, _h, answer = raw(srv, "POST", "/v1/push", headers, body)
    assert status == 413                           # ...huge once inflated
    error_json(answer, "too_large")
    assert_healthy(srv)
    assert ccsync.Client(srv.url, key).hello()["device"] == "a"


##### 7. nothing readable on the wire ##########################################

class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that forwards both ways and keeps every byte (bounded)."""

    LIMIT = 64 * 1024 * 1024

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.up: list[bytes] = []
        self.down: list[bytes] = []
        self.size = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.listener.getsockname()[1]

    def _accept(self):
        while not self.stopped.is_set():
            try:
                client, _addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            client.settimeout(30)
            upstream = socket.create_connection(self.target, timeout=30)
            for src, dst, sink in ((client, upstream, self.up), (upstream, client, self.down)):
                threading.Thread(target=self._pump, args=(src, dst, sink), daemon=True).start()

    def _pump(self, src, dst, sink):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    if self.size < self.LIMIT:
                        sink.append(data)
                        self.size += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass

    def stop(self):
        self.stopped.set()
        self.listener.close()
        self.thread.join(5)

    def recorded(self) -> tuple[bytes, bytes]:
        with self.lock:
            return b"".join(self.up), b"".join(self.down)


def secret_forms(text: str) -> list[bytes]:
    raw_bytes = text.encode()
    return [raw_bytes, raw_bytes.hex().encode(), base64.b64encode(raw_bytes),
            base64.urlsafe_b64encode(raw_bytes).rstrip(b"=")]


def test_an_eavesdropper_sees_neither_the_key_nor_the_data(tmp_path, srv):
    key_a, key_b = register(srv, "a"), register(srv, "b")
    proxy = RecordingProxy(host_port(srv))
    try:
        cc_a, store_a, client_a = new_device(tmp_path / "a.db", proxy.url, key_a)
        cc_b, store_b, client_b = new_device(tmp_path / "b.db", proxy.url, key_b)
        cc_a.execute("INSERT INTO project (name, main_branch, home_repo) VALUES "
                     "('zebra-omega-4711', 'master', 'git@example.com:zebra.git')")
        cc_a.execute("INSERT INTO setting (name, value) VALUES ('editor.theme', 'canary-9c1f')")
        assert ccsync.sync_once(store_a, client_a).accepted == 2
        result = ccsync.sync_once(store_b, client_b)
        assert result.pulled.applied >= 2
        # Back the other way too, so both directions carry data both ways.
        cc_b.execute("UPDATE setting SET value = 'canary-b2b2' WHERE name = 'editor.theme'")
        ccsync.sync_once(store_b, client_b)
        ccsync.sync_once(store_a, client_a)
    finally:
        proxy.stop()

    assert cc_b.execute("SELECT main_branch FROM project WHERE name = 'zebra-omega-4711'"
                        ).fetchall() == [("master",)]
    assert cc_a.execute("SELECT value FROM setting WHERE name = 'editor.theme'"
                        ).fetchall() == [("canary-b2b2",)]
    assert content(cc_a) == content(cc_b)

    up, down = proxy.recorded()
    assert proxy.connections >= 4
    assert b"POST /v1/push" in up and b"POST /v1/pull" in up     # it did go through us
    assert ccsync.WIRE_TYPE.encode() in up
    secrets_seen = []
    for key in (key_a, key_b):
        secrets_seen += secret_forms(key)
        secret = key[len(ccsync.API_KEY_PREFIX):]
        secrets_seen += secret_forms(secret)
        raw_key = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        secrets_seen += [raw_key, raw_key.hex().encode(), base64.b64encode(raw_key)]
        keys = ccsync.DeviceKeys.from_api_key(key)
        secrets_seen += [keys.mac, keys.mac.hex().encode(), keys.enc, keys.enc.hex().encode()]
    for value in ("zebra-omega-4711", "zebra", "canary-9c1f", "canary-b2b2", "editor.theme",
                  "git@example.com"):
        secrets_seen += secret_forms(value)
    for wire in (up, down):
        for needle in secrets_seen:
            assert needle not in wire, needle
    for conn in (store_a.conn, store_b.conn, cc_a, cc_b):
        conn.close()


##### 8. concurrency ###########################################################

# Several push batches and pull pages; CCSYNC_BIG_ROWS=100000 for a longer run.
BIG_ROWS = int(os.environ.get("CCSYNC_BIG_ROWS", "8000"))


def test_a_big_first_sync_and_a_small_one_at_the_same_time(tmp_path, srv):
    key_a, key_b = register(srv, "big"), register(srv, "small")
    cc_a, store_a, client_a = new_device(tmp_path / "big.db", srv.url, key_a)
    cc_b, store_b, client_b = new_device(tmp_path / "small.db", srv.url, key_b)
    cc_a.execute("INSERT INTO repository (name, path, origin_url) VALUES "
                 "('odoo', '/src/odoo', 'git@github.com:odoo/odoo.git')")
    repo = cc_a.execute("SELECT id FROM repository").fetchone()[0]
    cc_a.execute("BEGIN")
    cc_a.executemany(
        "INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, commit_count, "
        "loc_authored, top_files) VALUES (?, ?, 'function', ?, ?, ?)",
        [(repo, f"sym_{i}", i % 17, i % 101, f'["addons/m{i % 50}/models.py"]')
         for i in range(BIG_ROWS)])
    cc_a.execute("COMMIT")
    cc_b.execute("INSERT INTO project (name, main_branch) VALUES ('small', 'main')")
    cc_b.execute("INSERT INTO setting (name, value) VALUES ('editor.font', 'mono')")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        big = pool.submit(ccsync.sync_once, store_a, client_a)
        small = pool.submit(ccsync.sync_once, store_b, client_b)
        big_result, small_result = big.result(timeout=120), small.result(timeout=120)
    assert big_result.accepted == BIG_ROWS + 1 and not big_result.refused
    assert small_result.accepted == 2 and not small_result.refused

    for store, client in ((store_a, client_a), (store_b, client_b), (store_a, client_a)):
        ccsync.sync_once(store, client)
    assert cc_b.execute("SELECT count(*) FROM knowledge_index").fetchone()[0] == BIG_ROWS
    assert content(cc_a) == content(cc_b)
    for store in (store_a, store_b):
        assert all(n == 0 for counts in store.pending().values() for n in counts.values())
    for conn in (store_a.conn, store_b.conn, cc_a, cc_b):
        conn.close()


def test_concurrent_hellos_all_succeed(srv):
    keys = [register(srv, f"d{i}") for i in range(4)]
    clients = [ccsync.Client(srv.url, keys[i % 4], timeout=RAW_TIMEOUT) for i in range(8)]
    barrier = threading.Barrier(8)

    def hello(client):
        barrier.wait(RAW_TIMEOUT)
        return client.hello()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(hello, clients, timeout=60))
    assert sorted(a["device"] for a in answers) == sorted(f"d{i % 4}" for i in range(8))
    assert server_sql(srv, "SELECT count(*) FROM nonce")[0][0] == 8


##### 9. errors are JSON, never a traceback ####################################

def test_every_error_answer_is_json_without_a_traceback(start_server, capfd):
    srv = start_server(max_body=100_000, request_timeout=2)
    key = register(srv, "a")
    revoked = register(srv, "r")
    store = ccsync.ServerStore.open(srv.data_path)
    store.revoke("r")
    store.conn.close()
    wire = {"Content-Type": ccsync.WIRE_TYPE}

    def forged(path, garbage):
        return signed(key, path, body=garbage)

    cases = [
        ("GET", "/nope", {}, None, 404),
        ("GET", "/v1/push", {}, None, 405),
        ("POST", "/health", wire, b"x", 405),
        ("PUT", "/v1/push", wire, b"x", 405),
        ("DELETE", "/v1/pull", {}, b"", 405),
        ("POST", "/v1/push", {"Content-Type": "application/json"}, b"{}", 415),
        ("POST", "/v1/push", {}, b"{}", 415),
        ("POST", "/v1/push", wire, b"x", 401),
        ("POST", "/v1/hello", {**signed(key, "/v1/hello", {})[0], ccsync.H_NONCE: "zz"},
         b"x", 401),
        ("POST", "/v1/hello", {**signed(key, "/v1/hello", {})[0], ccsync.H_TIME: "soon"},
         b"x", 401),
        ("POST", "/v1/hello", *signed(ccsync.new_api_key(), "/v1/hello", {}), 401),
        ("POST", "/v1/hello", *signed(revoked, "/v1/hello", {}), 403),
        ("POST", "/v1/hello", *signed(key, "/v1/hello", {}, stamp="0"), 401),
        ("POST", "/v1/pull", *forged("/v1/pull", secrets.token_bytes(64)), 400),
        ("POST", "/v1/push", *signed(key, "/v1/push", {"records": "nope"}), 400),
        ("POST", "/v1/push", *signed(key, "/v1/push", {"records": [], "cursor": "x"}), 400),
        ("POST", "/v1/pull", *signed(key, "/v1/pull", {"cursor": "x"}), 400),
        ("POST", "/v1/pull", *signed(key, "/v1/pull", {"cursor": 0, "limit": 0}), 400),
        ("POST", "/v1/push", *signed(key, "/v1/push", {"records": [{}] * 5001}), 413),
        ("POST", "/v1/push", *signed(key, "/v1/push", {"pad": "0" * 2_000_000}), 413),
        ("POST", "/v1/push", wire, b"x" * 200_001, 413),
    ]
    for method, path, headers, body, expected in cases:
        status, _h, answer = raw(srv, method, path, headers, body)
        assert status == expected, (method, path, answer)
        error_json(answer)
        if path != "/health" and method == "POST":
            d_status, _dh, d_answer = ccsync.dispatch(srv, method, path, headers, body or b"")
            if expected != 413:          # the handler, not dispatch, enforces Content-Length
                assert d_status in (expected, 401), (path, d_answer)   # 401: nonce now used
            error_json(d_answer)
    assert_healthy(srv)
    assert change_rows(srv) == []
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not any("Traceback" in line for line in srv.lines)


def test_odd_requests_from_an_authenticated_device_get_an_answer(srv, capfd):
    """dispatch() "never raises": odd but validly signed payloads get a JSON error."""
    key = register(srv, "a")
    deep = "[" * 100_000 + "]" * 100_000
    keys = ccsync.DeviceKeys.from_api_key(key)
    cases = [
        ("/v1/push", {"records": [{"t": ["setting"], "id": "x", "dev": "d", "c": {"v": 1},
                                   "p": {}}]}),
        ("/v1/push", {"records": [{"t": {"a": 1}}]}),
        ("/v1/pull", {"cursor": 2 ** 64, "limit": 10}),
        ("/v1/pull", {"cursor": -(2 ** 70), "limit": 10}),
        ("/v1/pull", {"cursor": 0, "limit": 10, "since": "\x00" * 10}),
    ]
    raised = []
    for path, payload in cases:
        headers, body = signed(key, path, payload)
        try:
            status, _h, answer = ccsync.dispatch(srv, "POST", path, headers, body)
        except Exception as exc:        # noqa: BLE001 - the point of the test
            raised.append(f"{type(exc).__name__}: {exc} for {payload!r}"[:200])
            continue
        assert status in (200, 400, 413), (payload, answer)
        if status != 200:
            error_json(answer)
        # Over the network the device gets an answer, not a dropped connection.
        headers, body = signed(key, path, payload)
        try:
            status, _h, answer = raw(srv, "POST", path, headers, body)
        except (http.client.HTTPException, OSError) as exc:
            raised.append(f"network: {type(exc).__name__} for {payload!r}"[:200])
            continue
        if status != 200:
            error_json(answer)

    # JSON nested too deeply for the parser, sealed with the right key.
    stamp, nonce = str(int(time.time())), secrets.token_hex(16)
    context = ccsync.request_context("POST", "/v1/pull", stamp, nonce, keys.key_id)
    aes = ccsync._aes()
    cipher = aes.new(keys.enc, aes.MODE_GCM, nonce=b"\x01" * 12)
    cipher.update(context)
    sealed, tag = cipher.encrypt_and_digest(zlib.compress(deep.encode()))
    body = b"\x01" * 12 + sealed + tag
    headers = {"Content-Type": ccsync.WIRE_TYPE,
               **ccsync.signed_headers(keys, "POST", "/v1/pull", body, stamp, nonce)}
    try:
        status, _h, answer = ccsync.dispatch(srv, "POST", "/v1/pull", headers, body)
        assert status in (400, 413)
        error_json(answer)
    except Exception as exc:            # noqa: BLE001 - the point of the test
        raised.append(f"{type(exc).__name__} for JSON nested 100000 deep"[:200])
    assert_healthy(srv)
    assert not raised, "dispatch() raised instead of answering:\n" + "\n".join(raised)
    assert "Traceback" not in "".join(capfd.readouterr())


def test_malformed_http_does_not_take_the_server_down(srv):
    key = register(srv, "a")
    for data in (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,   # TLS hello
                 b"GARBAGE\r\n\r\n",
                 b"FOO /v1/push HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"POST /v1/push HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
                 b"POST /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"):
        answer = raw_socket(srv, data, shut_write=True)
        assert b"Traceback" not in answer
        if answer.startswith(b"HTTP/"):      # (an HTTP/0.9-style request gets a bare body)
            assert parse_raw_response(answer)[0] >= 400
        assert_healthy(srv)
    assert ccsync.Client(srv.url, key).hello()["device"] == "a"


##### 10. HTTPS ################################################################

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "c.pem", where / "k.pem"
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {proc.stderr.strip()[:200]}")
    return str(cert), str(key)


def test_https_with_a_private_ca(tmp_path, start_server, tls_files):
    cert, key_file = tls_files
    srv = start_server(tls=ccsync.tls_context(cert, key_file), request_timeout=5)
    assert srv.url.startswith("https://127.0.0.1:")
    key = register(srv, "a")

    assert ccsync.Client(srv.url, key, ca_file=cert).hello()["device"] == "a"

    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url, key, timeout=RAW_TIMEOUT).hello()
    assert err.value.kind == "unreachable"
    assert "TLS" in str(err.value)
    assert "CC_CA_FILE" in err.value.hint

    # Plain HTTP to the TLS port fails cleanly, and the server carries on.
    with pytest.raises(ccsync.RemoteError) as err:
        ccsync.Client(srv.url.replace("https", "http"), key, timeout=RAW_TIMEOUT).hello()
    assert err.value.kind in ("unreachable", "cut", "http", "bad_response")

    # A client that connects and never says anything does not block the others.
    with socket.create_connection(host_port(srv), timeout=RAW_TIMEOUT):
        started = time.monotonic()
        cc, store, client = new_device(tmp_path / "a.db", srv.url, key, ca_file=cert)
        cc.execute("INSERT INTO project (name) VALUES ('tls-project')")
        assert ccsync.sync_once(store, client).accepted == 1
        assert time.monotonic() - started < 4
    store.conn.close()
    cc.close()
