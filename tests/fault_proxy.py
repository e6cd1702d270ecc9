"""A fault-injecting proxy in front of the real server, and the fault rounds run through it.

:class:`FaultProxy` listens on 127.0.0.1 and relays HTTP/1.1 (it reads whole
requests and answers by Content-Length) until it is armed with a fault, which
breaks every request after the first ``after`` it relayed:

- ``refuse``: nobody listens on its port (connection refused); a kept-alive
  connection is closed first;
- ``reset_request``: relays a random number of the request's bytes, then resets
  both sides (RST, SO_LINGER 0), possibly while the client is still sending;
- ``reset_response``: relays the request, then a random part of the answer, then RST;
- ``stall``: takes the request and relays nothing, until disarmed (bounded);
- ``truncate``: relays the request, then a random part of the answer, then closes
  cleanly (FIN).

A *lane* is one fault on a world of its own (:class:`stress_tools.World`,
devices configured with the proxy's URL).  Each round a writes new rows; a's
``sync`` (pushing them) and/or b's ``sync`` (pulling them) run with the fault
armed after a random number of requests: each must exit 1 with one
``ccsync: error:`` line naming the URL, a's data is unchanged, b holds exactly
whole pages (the rows it gained are those of the server's records up to its
cursor), and the database passes integrity_check.  Disarmed, the device's next
sync succeeds, and after the round both devices hold what a wrote.

Long form: tests/stress_faults.py; CI form: tests/test_faults.py.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
import re
import socket
import sqlite3
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ccsync
from stress_tools import (World, add_rows, assert_converged, canonical, cli, converge, error_line,
                          failure_text, fill, in_parallel, integrity, sync, sync_ids)

FAULTS = ("refuse", "reset_request", "reset_response", "stall", "truncate")
SOCKET_TIMEOUT = 30.0       # every proxy socket gives up after this
MAX_HEAD = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Reader:
    """Buffered HTTP/1.1 message reads from one socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()

    def _more(self) -> bool:
        data = self.sock.recv(1 << 16)
        self.buf += data
        return bool(data)

    def head(self) -> bytes | None:
        """The next message's head (through the blank line); None at end of stream."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_HEAD or not self._more():
                return None
        head, self.buf = bytes(self.buf[:end + 4]), self.buf[end + 4:]
        return head

    def exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._more():
                raise ConnectionError("stream ended inside a body")
        data, self.buf = bytes(self.buf[:size]), self.buf[size:]
        return data

    def message(self) -> tuple[bytes, bytes] | None:
        head = self.head()
        return None if head is None else (head, self.exact(content_length(head)))


def content_length(head: bytes) -> int:
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return int(match.group(1)) if match else 0


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` that can break requests."""

    def __init__(self, target: tuple[str, int], rng: random.Random, hold_s: float = 30.0):
        self.target, self.rng, self.hold_s = target, rng, hold_s
        self.lock = threading.Lock()
        self.fault: str | None = None
        self.after = self.relayed = self.broken = 0
        self.released = threading.Event()      # ends stalls
        self.stopped = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.listener: socket.socket | None = None
        self.port = 0
        self._listen()
        # Bound, never listening: while the listener is closed the port refuses
        # connections, and nobody else can take it (SO_REUSEPORT, this user only).
        self.reservation = socket.socket()
        self.reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.reservation.bind(("127.0.0.1", self.port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control --

    def arm(self, fault: str, after: int = 0) -> None:
        """Break every request after the next ``after`` relayed ones."""
        assert fault in FAULTS, fault
        with self.lock:
            self.fault, self.after, self.relayed, self.broken = fault, after, 0, 0
            self.released.clear()
        if fault == "refuse" and after == 0:
            self.broken = 1                 # every connection from now on is refused
            self._close_listener()

    def disarm(self) -> None:
        """Relay everything again (and listen again after ``refuse``)."""
        with self.lock:
            self.fault = None
            self.released.set()
            listening = self.listener is not None
        if not listening:
            self._listen()

    def stop(self) -> None:
        self.stopped.set()
        self.released.set()
        self._close_listener()
        self.reservation.close()
        with self.lock:
            open_sockets = list(self.sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(SOCKET_TIMEOUT)

    # -- plumbing --

    def _listen(self) -> None:
        """Listen (again: on the same port, which the reservation kept)."""
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        with self.lock:
            self.listener = listener
        self._spawn(self._accept, listener)

    def _close_listener(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return                      # closed: refuse, or stop
            self._spawn(self._serve, client)

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(SOCKET_TIMEOUT)
        with self.lock:
            self.sockets.add(sock)
        return sock

    def _fault_now(self) -> str | None:
        """The fault for the request that just arrived (None: relay it)."""
        with self.lock:
            if self.fault is None or self.relayed < self.after:
                return None
            self.broken += 1
            return self.fault

    # -- one client connection --

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            down = _Reader(self._track(client))
            while (head := down.head()) is not None:
                fault = self._fault_now()
                if fault == "refuse":           # the server goes away mid-sync
                    self._close_listener()
                    return
                if fault == "stall":
                    self.released.wait(self.hold_s)
                    return
                if upstream is None:
                    upstream = self._track(socket.create_connection(self.target, SOCKET_TIMEOUT))
                    up = _Reader(upstream)
                if fault == "reset_request":
                    self._cut_request(head, down, client, upstream)
                    return
                upstream.sendall(head + down.exact(content_length(head)))
                answer = up.message()
                if answer is None:
                    return
                if not self._relay(fault, b"".join(answer), client):
                    return
                if b"\r\nconnection: close" in answer[0].lower():
                    return
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    sock.close()
                    with self.lock:
                        self.sockets.discard(sock)

    def _cut_request(self, head: bytes, down: _Reader, client, upstream) -> None:
        cut = self.rng.randrange(len(head) + content_length(head))
        upstream.sendall(head[:cut])
        if cut > len(head):
            upstream.sendall(down.exact(cut - len(head)))
        _reset(client)
        _reset(upstream)

    def _relay(self, fault: str | None, answer: bytes, client: socket.socket) -> bool:
        """Send the answer (all of it, or a random part for a fault); True: carry on."""
        if fault is None:
            with self.lock:
                self.relayed += 1
            client.sendall(answer)
            return True
        client.sendall(answer[:self.rng.randrange(len(answer))])
        if fault == "reset_response":
            _reset(client)
        return False


##### the lanes ##################################################################

@dataclass
class Lane:
    """One fault's rounds and what they showed."""

    fault: str
    rounds: int = 0
    broken_syncs: int = 0               # syncs that failed cleanly, as they must
    errors: collections.Counter = field(default_factory=collections.Counter)
    pages_kept: int = 0                 # broken pulls that kept whole pages
    failure: str | None = None

    def line(self) -> str:
        shapes = "; ".join(f"{n}x {text}" for text, n in self.errors.most_common())
        state = "ok" if self.failure is None else f"FAILED: {self.failure}"
        return (f"{self.fault:<15} {self.rounds} round(s), {self.broken_syncs} sync(s) failed "
                f"cleanly, {self.pages_kept} kept whole pages, converged: {state}\n"
                f"{'':<16}errors: {shapes}")


@dataclass(frozen=True)
class Plan:
    """How big a lane is: rounds, rows a writes per round, which devices' syncs break."""

    rounds: int
    base_rows: int
    round_rows: tuple[int, int]
    both: bool = True                   # break a's and b's sync each round (else alternate)
    stall_timeout: float = 3.0          # the CLI's network timeout in a stalled sync (the
    #                                     other faults run the CLI as it is: 60 s)
    quiet: bool = True                  # end with sync rounds until one moves nothing


def run_lanes(root: Path, seed: int, plan: Plan, faults=FAULTS) -> list[Lane]:
    """One lane per fault, all at once (each its own server, proxy and devices)."""
    def one(index_fault):
        index, fault = index_fault
        return run_lane(root / fault, fault, random.Random(f"{seed}:{fault}"), plan, index)
    return in_parallel(one, list(enumerate(faults)), len(faults))


def summary(lanes: list[Lane]) -> str:
    """E.g. ``faults: 5/5 lanes converged; refuse 80 clean failures in 40 rounds, ...``."""
    good = sum(lane.failure is None for lane in lanes)
    return f"faults: {good}/{len(lanes)} lanes converged; " + ", ".join(
        f"{lane.fault} {lane.broken_syncs} clean failures in {lane.rounds} rounds"
        for lane in lanes)


def run_lane(root: Path, fault: str, rng: random.Random, plan: Plan, index: int = 0) -> Lane:
    """``plan.rounds`` rounds of one fault; an assertion that fails is kept in
    ``Lane.failure``.  ``index`` staggers which device breaks first."""
    lane = Lane(fault)
    root.mkdir(parents=True)
    world, proxy = World(root), None
    try:
        world.start_server()
        proxy = FaultProxy(("127.0.0.1", world.server.port), rng, hold_s=4 * plan.stall_timeout)
        world.point_at(proxy.url)
        unsent = fill(world.a, plan.base_rows, rng)      # the first round's sync sends them
        written = canonical(world.a.conn)[0]
        for number in range(plan.rounds):
            written = _round(world, proxy, lane, rng, plan, number + index, unsent)
            lane.rounds, unsent = lane.rounds + 1, 0
        if plan.quiet:
            converge(world)
        assert_converged(world, written)
    except Exception:                       # noqa: BLE001 - reported with the others
        lane.failure = failure_text()
    finally:
        if proxy is not None:
            proxy.stop()
        world.close()
    return lane


def _round(world, proxy, lane, rng, plan, number, unsent) -> dict:
    """a writes; a's broken sync, a's sync through the healed proxy, b's broken sync
    (a pull of a's rows), b's sync; then both hold what a wrote (returned, as
    canonical tables).  ``unsent``: a's rows not synced before."""
    rows = unsent + add_rows(world.a, rng.randint(*plan.round_rows), rng, f"r{number}")
    written = canonical(world.a.conn)[0]
    victims = world.devices if plan.both else (world.devices[number % 2],)
    for dev in world.devices:
        if dev in victims:
            _broken_sync(world, proxy, lane, rng, plan, dev, rows)
        sync(dev)
    for dev in world.devices:
        assert canonical(dev.conn) == (written, []), (dev.name, "differs after healing")
    return written


def _broken_sync(world, proxy, lane, rng, plan, dev, rows: int) -> None:
    """``dev``'s sync with the lane's fault armed after a random number of requests:
    it must fail cleanly and keep the device's data whole."""
    after = rng.randint(0, _requests(world, dev, rows) - 1)
    before = canonical(dev.conn), sync_ids(dev.conn)
    proxy.arm(lane.fault, after)
    try:
        proc = cli(dev, "sync", "--json",
                   client_timeout=plan.stall_timeout if lane.fault == "stall" else None)
    finally:
        proxy.disarm()
    line = error_line(proc, proxy.url)
    assert proxy.broken, (lane.fault, after, "the fault never fired")
    assert "authentication" not in line, (lane.fault, line)   # a cut answer is a cut
    lane.broken_syncs += 1
    lane.errors[_shape(line, proxy.url)] += 1
    lane.pages_kept += _check_kept(world, dev, before)


def _requests(world, dev, rows: int) -> int:
    """How many requests ``dev``'s sync makes at least: a pushes ``rows`` new rows
    (batches of PUSH_BATCH) and pulls once; b pulls the pages the server hands out
    past its cursor (end to end, pages hold whole batches: asked of the store itself).
    The content report after a sync is not counted: a fault there fails nothing."""
    if dev is world.a:
        return math.ceil(rows / ccsync.PUSH_BATCH) + 1
    store = ccsync.ServerStore.open(str(world.data), create=False)
    try:
        vault = store.e2e_params() and _vault()
        pages, cursor, more = 0, _cursor(dev), True
        while more and pages < 10_000:
            page = store.pull_raw(cursor, ccsync.PULL_PAGE,
                                  check=vault.check if vault else None)
            cursor, more, pages = page["cursor"], page["more"], pages + 1
    finally:
        store.conn.close()
    return max(1, pages)


def _vault() -> "ccsync.Vault":
    """The vault the stress devices are set up with (stress_tools writes it)."""
    from e2e_helpers import shared_vault_text
    return ccsync.Vault.parse(shared_vault_text())


def _cursor(dev) -> int:
    """The server sequence number ``dev`` merged up to (0 before its first sync)."""
    if not dev.sql("SELECT 1 FROM sqlite_master WHERE name = '_ccsync_meta'"):
        return 0
    row = dev.sql("SELECT value FROM _ccsync_meta WHERE key = 'cursor'")
    return int(row[0][0]) if row else 0


def _check_kept(world, dev, before) -> int:
    """After a broken sync: integrity ok; a's data as it was; b holds whole pages only
    (the rows it gained are exactly the server's records up to its cursor).  Returns 1
    when b kept pages it pulled before the break."""
    integrity(dev.db)
    (tables, problems), ids = before
    now_tables, now_problems = canonical(dev.conn)
    if dev is world.a:
        assert (now_tables, now_problems) == (tables, problems), "a's data changed"
        return 0
    assert not now_problems, now_problems[:5]
    assert all(now_tables[t].get(k) == v for t, rows in tables.items() for k, v in rows.items())
    with contextlib.closing(sqlite3.connect(world.data, timeout=10)) as conn:
        upto = {tuple(r) for r in conn.execute("SELECT tbl, sid FROM change WHERE seq <= ?",
                                               (_cursor(dev),))}
        sealed = conn.execute("SELECT 1 FROM meta WHERE key = 'e2e'").fetchone() is not None
    known = sync_ids(dev.conn)
    if sealed:                          # the server knows rows by keyed ids
        vault = _vault()
        keyed = lambda rows: {(t, vault.row_id(t, sid)) for t, sid in rows}  # noqa: E731
        known, ids = keyed(known), keyed(ids)
    gained = known - ids
    assert gained == upto - ids, ("not whole pages", len(gained), len(upto - ids))
    return int(bool(gained))


def _shape(line: str, url: str) -> str:
    """An error line with the URL and numbers taken out, for counting."""
    return re.sub(r"\d+", "N", line.replace(url, "URL"))
