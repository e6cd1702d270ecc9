"""Pipelined sync (the next push batch read, the next pull page fetched, while the
last is in flight): an interrupt, a stop or a failure never leaves a request running
or anything half-applied.  Written by a reviewer trying to break the pipelining."""
from __future__ import annotations

import signal
import threading
import time

import pytest

import ccsync
from conftest import Device


class Interrupt(BaseException):
    pass


class SlowTransport(ccsync.LocalTransport):
    def __init__(self, server, name, delay):
        super().__init__(server, name)
        self.delay, self.active, self.closed_while_active = delay, 0, False
        self.lock = threading.Lock()

    def push(self, records, cursor=None):
        with self.lock:
            self.active += 1
        try:
            time.sleep(self.delay)
            return super().push(records, cursor)
        finally:
            with self.lock:
                self.active -= 1

    def close(self):
        if self.active:
            self.closed_while_active = True


def interrupted_during(call, after: float = 0.4) -> None:
    """Run ``call`` and interrupt it (as Ctrl-C would) ``after`` seconds in."""
    def fire(_sig, _frame):
        raise Interrupt()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        with pytest.raises(Interrupt):
            call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_interrupt_while_waiting_for_a_push_leaves_no_request_running(tmp_path, server):
    """Ctrl-C (KeyboardInterrupt) while push_changes waits for the in-flight push:
    the push is settled (closing the transport is how a real Client cuts it
    short; this one cannot be cut, so it is waited for) before sync_once returns."""
    ccsync_server = ccsync.ServerStore.open(str(tmp_path / "srv.db"))
    dev = Device(tmp_path / "a.db", ccsync_server, "a")
    dev.transport = SlowTransport(ccsync_server, "a", 1.5)
    for i in range(3):
        dev.sql("INSERT INTO project (name) VALUES (?)", f"p{i}")

    interrupted_during(lambda: ccsync.sync_once(dev.store, dev.transport, batch_size=10))
    still_running = dev.transport.active      # (Thread.is_alive() lies after an
    deadline = time.monotonic() + 5            # interrupted join on 3.11)
    while dev.transport.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not still_running, "a push is still running on its thread after sync_once returned"


def test_interrupt_while_waiting_for_a_pull_page_settles_it(tmp_path, server):
    """The same for pull.  _InFlight waits on an Event, not Thread.join: on CPython
    <= 3.12 a join interrupted by a signal marks the still-running thread stopped
    (gh-90882), and a second join would return at once."""
    srv = ccsync.ServerStore.open(str(tmp_path / "srv.db"))
    a = Device(tmp_path / "a.db", srv, "a")
    for i in range(3):
        a.sql("INSERT INTO project (name) VALUES (?)", f"p{i}")
    a.sync()
    b = Device(tmp_path / "b.db", srv, "b")

    class SlowPull(ccsync.LocalTransport):
        active = 0

        def pull(self, *args, **kw):
            SlowPull.active += 1
            try:
                time.sleep(1.5)
                return super().pull(*args, **kw)
            finally:
                SlowPull.active -= 1
    b.transport = SlowPull(srv, "b")

    interrupted_during(lambda: ccsync.sync_once(b.store, b.transport, page_size=1))
    assert SlowPull.active == 0


def test_stop_during_a_page_merge_does_not_wait_out_a_page_nobody_wants(tmp_path):
    """stop is set while page 1 merges; the prefetch of page 2 is already out.
    pull_changes closes the transport (a real Client's request ends there) and
    waits for it about a second at most: AutoSync.stop promises about a second."""
    srv = ccsync.ServerStore.open(str(tmp_path / "srv.db"))
    a = Device(tmp_path / "a.db", srv, "a")
    for i in range(4):
        a.sql("INSERT INTO project (name) VALUES (?)", f"p{i}")
    a.sync()
    b = Device(tmp_path / "b.db", srv, "b")
    stop = threading.Event()
    calls = []

    class SlowPull(ccsync.LocalTransport):
        """Slow from the second page on; close() cuts a request short, as a Client's does."""

        cut = threading.Event()

        def pull(self, *args, **kw):
            calls.append(args)
            if len(calls) > 1 and self.cut.wait(3):
                raise ccsync.RemoteError("connection closed").with_kind("cut")
            return super().pull(*args, **kw)

        def close(self):
            self.cut.set()
    b.transport = SlowPull(srv, "b")
    orig = b.store.apply_page
    when = []

    def apply_and_stop(records, cursor):
        out = orig(records, cursor)
        stop.set()
        when.append(time.monotonic())
        return out
    b.store.apply_page = apply_and_stop
    with pytest.raises(ccsync.SyncCancelled):
        ccsync.sync_once(b.store, b.transport, page_size=1, stop=stop)
    latency = time.monotonic() - when[0]
    assert len(calls) <= 2 and latency < 2.0, (len(calls), latency)


def test_apply_page_failing_while_a_prefetch_is_out(tmp_path):
    from conftest import content
    srv = ccsync.ServerStore.open(str(tmp_path / "srv.db"))
    a = Device(tmp_path / "a.db", srv, "a")
    for i in range(6):
        a.sql("INSERT INTO version (name, path) VALUES (?, '/v')", f"{i}.0")
    a.sync()
    b = Device(tmp_path / "b.db", srv, "b")
    active = []

    class SlowPull(ccsync.LocalTransport):
        def pull(self, *args, **kw):
            active.append(1)
            try:
                time.sleep(0.3)
                return super().pull(*args, **kw)
            finally:
                active.pop()
    b.transport = SlowPull(srv, "b")
    orig = ccsync.Store._apply_chunk
    n = []

    def boom(self, chunk, result):
        n.append(1)
        if len(n) == 3:
            raise sqlite3.OperationalError("database is locked")
        return orig(self, chunk, result)
    import sqlite3
    ccsync.Store._apply_chunk = boom
    try:
        with pytest.raises(sqlite3.OperationalError):
            ccsync.sync_once(b.store, b.transport, page_size=2)
    finally:
        ccsync.Store._apply_chunk = orig
    assert not active
    b.sync()
    assert content(a.cc) == content(b.cc)


def test_stop_while_a_push_is_in_flight_acks_it_and_sends_nothing_more(tmp_path):
    from conftest import content
    srv = ccsync.ServerStore.open(str(tmp_path / "srv.db"))
    a = Device(tmp_path / "a.db", srv, "a")
    b = Device(tmp_path / "b.db", srv, "b")
    for i in range(6):
        a.sql("INSERT INTO version (name, path) VALUES (?, '/v')", f"{i}.0")
    stop = threading.Event()
    pushed = []

    class StopMidPush(ccsync.LocalTransport):
        def push(self, records, cursor=None):
            pushed.append(len(records))
            stop.set()
            time.sleep(0.2)
            return super().push(records, cursor)
    a.transport = StopMidPush(srv, "a")
    with pytest.raises(ccsync.SyncCancelled):
        ccsync.sync_once(a.store, a.transport, batch_size=2, stop=stop)
    assert pushed == [2]
    on_server = srv.conn.execute("SELECT count(*) FROM change").fetchone()[0]
    assert on_server == 2
    assert a.store.pending()["version"]["insert"] == 4
    a.transport = ccsync.LocalTransport(srv, "a")
    a.sync(batch_size=2)
    b.sync()
    assert content(a.cc) == content(b.cc)
