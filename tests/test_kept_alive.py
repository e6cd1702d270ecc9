"""The kept-alive Client connection: one per sync, opened again (and the request
signed anew) when the server closed it, shared safely by threads.  Written by a
reviewer trying to break it; each case failed on the first version."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

import ccsync
from conftest import content
from test_transport import (start_server, register, new_device, server_sql, tls_files,  # noqa
                            RAW_TIMEOUT)


def _slow(monkeypatch, store, name, delay):
    orig = getattr(store, name)

    def slow(*a, **kw):
        time.sleep(delay)
        return orig(*a, **kw)
    monkeypatch.setattr(store, name, slow)


@pytest.mark.parametrize("tls", [False, True])
def test_idle_closed_connection_is_reopened_without_double_apply(tmp_path, start_server,
                                                                 monkeypatch, tls, request):
    """The server's idle timeout (`server --idle-timeout`) closes the kept-alive
    connection while the device acks a batch: the request goes again on a new
    connection and nothing is stored twice.  Over HTTPS the send on the dead
    connection raises ssl.SSLEOFError, which must count as a stale connection,
    not as a TLS failure (whose hint points at CC_CA_FILE)."""
    kw = {}
    if tls:
        cert, key_file = request.getfixturevalue("tls_files")
        kw["tls"] = ccsync.tls_context(cert, key_file)
    srv = start_server(idle_timeout=0.2, **kw)
    ka, kb = register(srv, "a"), register(srv, "b")
    ckw = {"ca_file": cert} if tls else {}
    cc_a, st_a, cl_a = new_device(tmp_path / "a.db", srv.url, ka, timeout=RAW_TIMEOUT, **ckw)
    cc_b, st_b, cl_b = new_device(tmp_path / "b.db", srv.url, kb, timeout=RAW_TIMEOUT, **ckw)
    for i in range(3):
        cc_a.execute("INSERT INTO project (name, main_branch) VALUES (?, 'm')", (f"p{i}",))
    # Idle gaps longer than the server's idle timeout (plus its reaper's 0.2 s tick).
    _slow(monkeypatch, st_a, "ack", 0.5)
    r = ccsync.sync_once(st_a, cl_a, batch_size=2, page_size=2)
    assert r.accepted == 3 and not r.refused
    assert server_sql(srv, "SELECT count(*) FROM change")[0][0] == 3
    orig_pull = cl_b.pull

    def pull_late(*a, **k):
        time.sleep(0.5)
        return orig_pull(*a, **k)
    monkeypatch.setattr(cl_b, "pull", pull_late)
    r = ccsync.sync_once(st_b, cl_b, batch_size=2, page_size=2)
    assert r.pulled.applied == 3
    assert content(cc_a) == content(cc_b)
    for c in (cc_a, cc_b, st_a.conn, st_b.conn):
        c.close()


class CuttingProxy:
    """Forwards requests; on the connection's ``cut_at``-th request it lets the
    server answer, then resets the client connection instead of relaying."""

    def __init__(self, target, cut_at=2):
        self.target, self.cut_at = target, cut_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.forwarded = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.first = True

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.listener.getsockname()[1]

    def _accept(self):
        while not self.stopped.is_set():
            try:
                c, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, self.first), daemon=True).start()
            self.first = False

    @staticmethod
    def _read_message(sock):
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = sock.recv(65536)
            if not d:
                return None
            buf += d
        head, _, body = buf.partition(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        while len(body) < n:
            d = sock.recv(65536)
            if not d:
                break
            body += d
        return head + b"\r\n\r\n" + body

    def _serve(self, c, cutting):
        c.settimeout(10)
        up = socket.create_connection(self.target, timeout=10)
        k = 0
        try:
            while True:
                req = self._read_message(c)
                if req is None:
                    return
                k += 1
                up.sendall(req)
                resp = self._read_message(up)
                self.forwarded += 1
                if cutting and k == self.cut_at:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                c.sendall(resp)
        except OSError:
            pass
        finally:
            c.close()
            up.close()

    def stop(self):
        self.stopped.set()
        self.listener.close()
        self.thread.join(5)


def test_cut_after_the_server_applied_a_push(tmp_path, start_server):
    """The server took push #2, the answer never came (connection reset).  The
    request goes again on a new connection, signed anew (a replay would be
    refused): the sync succeeds and nothing is stored twice."""
    srv = start_server()
    ka = register(srv, "a")
    proxy = CuttingProxy(srv.server_address[:2], cut_at=2)
    try:
        cc, st, cl = new_device(tmp_path / "a.db", proxy.url, ka, timeout=RAW_TIMEOUT)
        for i in range(4):
            cc.execute("INSERT INTO project (name) VALUES (?)", (f"p{i}",))
        result = ccsync.sync_once(st, cl, batch_size=2)
        assert result.accepted + result.superseded == 4 and not result.refused
        assert server_sql(srv, "SELECT count(*) FROM change")[0][0] == 4   # applied once
        assert st.pending()["project"] == {"insert": 0, "update": 0, "delete": 0}
    finally:
        proxy.stop()


def test_one_client_shared_by_two_threads(start_server):
    """Client is public API: threads sharing one take turns on its connection."""
    import concurrent.futures
    srv = start_server()
    cl = ccsync.Client(srv.url, register(srv, "a"), timeout=RAW_TIMEOUT)
    errors = []

    def many(_):
        for _i in range(30):
            try:
                cl.hello()
            except Exception as exc:   # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}"[:120])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(many, range(3)))
    cl.close()
    assert not errors, errors[:5]


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nX-Ccsync-Signature: ab",
                                    b"HTTP/1.1 200 OK\r\n\r\n"])
def test_an_answer_cut_in_its_headers_is_a_cut_not_a_key_problem(answer):
    """Headers that end where the connection closed (http.client takes them as
    they are) are reported as a cut connection, never as failed authentication."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(RAW_TIMEOUT)

    def serve():
        for _ in range(2):                      # the client tries a cut once more
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(RAW_TIMEOUT)
                    conn.recv(65536)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ccsync.Client(f"http://127.0.0.1:{listener.getsockname()[1]}",
                           ccsync.new_api_key(), timeout=RAW_TIMEOUT)
    try:
        with pytest.raises(ccsync.RemoteError) as caught:
            client.hello()
    finally:
        client.close()
        thread.join(RAW_TIMEOUT)
        listener.close()
    assert caught.value.kind == "cut", str(caught.value)
    assert "authentication" not in str(caught.value)
