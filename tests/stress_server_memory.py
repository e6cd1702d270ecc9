"""Long form: memory of the real server process under unauthenticated input, oversized
request heads included (make stress)."""

from __future__ import annotations

import secrets
import contextlib
import socket
import threading
import time
from pathlib import Path


import ccsync
from server_attacks import T, ServerProcess, read_all


PAD = b"X-Pad: " + b"a" * 65000 + b"\r\n"        # just under http.client's 65536 line limit


def _send_all(port: int, data: bytes, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    lock = threading.Lock()

    def one() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=T)
        with contextlib.suppress(OSError):      # the server may close an oversized head early
            sock.sendall(data)
        with lock:
            socks.append(sock)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return socks


def test_oversized_request_heads_do_not_grow_the_server(tmp_path):
    """http.server's parse_headers keeps up to 100 lines of 64 KiB per head (~6.4 MB),
    before admit() sees anything; --max-connections (64) of them at once, repeated,
    and the process holds ~10 MB per slot.  Measured: 40 MB -> ~650-720 MB RSS,
    ~530-700 MB still held after every attacker is gone."""
    server = ServerProcess(tmp_path)
    try:
        before = server.rss_mb()
        peak = after = 0
        for _round in range(3):
            socks = _send_all(server.port, b"POST /v1/push HTTP/1.1\r\n" + PAD * 99 + b"\r\n", 64)
            for _ in range(8):
                peak = max(peak, server.rss_mb())
                time.sleep(0.25)
            for sock in socks:
                sock.close()
            time.sleep(1.0)
            after = server.rss_mb()
        print(f"RSS before {before} MB, peak {peak} MB, after {after} MB")
        assert peak - before < 200, (before, peak, after)
    finally:
        server.stop()


def test_wrongly_signed_big_bodies_with_a_known_key_id_do_not_grow_the_server(tmp_path):
    """Holds: 20 concurrent requests naming a registered key id, with a wrong head
    signature and Content-Length 60 MiB, each streaming until cut off."""
    server = ServerProcess(tmp_path)
    try:
        store = ccsync.ServerStore.open(str(tmp_path / "server.db"))
        api_key = store.register("a")
        store.conn.close()
        keys = ccsync.DeviceKeys.from_api_key(api_key)
        before = server.rss_mb()
        chunk, statuses = secrets.token_bytes(1 << 16), []

        def attack() -> None:
            headers = {"Content-Type": ccsync.WIRE_TYPE, **ccsync.signed_headers(
                keys, "POST", "/v1/push", b"", str(int(time.time())), secrets.token_hex(16))}
            headers[ccsync.H_HEAD] = "0" * 64                   # wrong head signature
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            with socket.create_connection(("127.0.0.1", server.port), timeout=T) as sock:
                sock.sendall((f"POST /v1/push HTTP/1.1\r\nHost: x\r\n{head}Content-Length: "
                              f"{60 * 1024 * 1024}\r\n\r\n").encode())
                for _ in range(960):
                    try:
                        sock.sendall(chunk)
                    except OSError:
                        break
                answer = read_all(sock)
                if answer.startswith(b"HTTP/1."):
                    statuses.append(int(answer.split(b" ", 2)[1]))

        threads = [threading.Thread(target=attack) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        after = server.rss_mb()
        print(f"RSS before {before} MB after {after} MB, statuses {set(statuses)}")
        assert statuses and set(statuses) == {401}
        assert after - before < 40, (before, after)
    finally:
        server.stop()
