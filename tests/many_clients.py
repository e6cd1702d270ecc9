"""Many devices syncing at once through the real server process, /health polled meanwhile.

Shared by the long form (tests/stress_clients.py, ``make stress``) and the short CI
form (tests/test_clients.py): the same code, other sizes.  Each device is a real cc
database with ccsync's Store and ccsync's own Client; each round inserts rows and
edits one as cc would, then runs ``sync_once`` (push + pull) and a ``hello``.  A
monitor thread polls ``GET /health`` every ~50 ms, a connection each, from an
address of its own (127.0.0.2), as a monitor elsewhere would.  At the end every
device syncs once more and must hold every device's rows.
"""

from __future__ import annotations

import contextlib
import http.client
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ccsync
from conftest import content, make_cc_db
from server_attacks import T, ServerProcess

POLL_S = 0.05                      # the monitor's pause between two /health polls
ROWS_PER_ROUND = 2                 # new projects a round; plus an edit of the device's first
LATE = 6 * T                       # a round (or the final sync) still running this long: stuck


class CountingClient(ccsync.Client):
    """ccsync's Client, counting the tries it had to make again (503 busy, a cut)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.retried: Counter = Counter()

    def _send(self, request):
        try:
            return super()._send(request)
        except ccsync.RemoteError as exc:
            if exc.kind in ("busy", "cut"):
                self.retried[exc.kind] += 1
            raise


@dataclass
class Device:
    """One machine: cc's own connection, ccsync's Store and Client, what it wrote."""

    name: str
    cc: sqlite3.Connection
    store: ccsync.Store
    client: CountingClient
    names: list[str] = field(default_factory=list)      # the projects it inserted
    rounds: int = 0
    slowest: float = 0.0

    def write_as_cc(self) -> None:
        """Insert this round's projects and edit the device's first one, as cc does."""
        for k in range(ROWS_PER_ROUND):
            name = f"{self.name}-r{self.rounds}-{k}"
            self.cc.execute("INSERT INTO project (name, main_branch) VALUES (?, 'main')",
                            (name,))
            self.names.append(name)
        self.cc.execute("UPDATE project SET main_branch = ? WHERE name = ?",
                        (f"b{self.rounds}", self.names[0]))

    def close(self) -> None:
        self.client.close()
        self.store.conn.close()
        self.cc.close()


@dataclass
class Figures:
    """What a run did and saw."""

    clients: int
    seconds: float
    rounds: int = 0
    errors: list[str] = field(default_factory=list)
    retried: Counter = field(default_factory=Counter)
    polls: list[tuple[object, float]] = field(default_factory=list)   # (status, seconds)
    slowest_round: float = 0.0
    server_threads: int = 0
    server_rss_mb: int = 0
    peak_threads: int = 0
    peak_rss_mb: int = 0
    stuck: list[str] = field(default_factory=list)      # threads still running after T
    diverged: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)

    def latency_ms(self, q: float) -> float:
        """The ``q`` quantile of the answered /health polls' latency (1.0: the slowest)."""
        ok = sorted(s for status, s in self.polls if status == 200)
        return ok[min(len(ok) - 1, int(len(ok) * q))] * 1000 if ok else float("nan")

    def report(self) -> str:
        """The figures, for the log of make stress."""
        outcomes = Counter(status for status, _ in self.polls)
        return (f"{self.clients} clients, {self.seconds:g} s: {self.rounds} rounds "
                f"(push+pull+hello), {len(self.errors)} errors, retried {dict(self.retried)}, "
                f"slowest round {self.slowest_round:.2f} s\n"
                f"/health: {len(self.polls)} polls {dict(outcomes)} "
                f"p50={self.latency_ms(0.5):.1f} ms p99={self.latency_ms(0.99):.1f} ms "
                f"max={self.latency_ms(1.0):.1f} ms\n"
                f"server: {self.peak_threads} threads and {self.peak_rss_mb} MB RSS at most, "
                f"{self.server_threads} threads and {self.server_rss_mb} MB at the end")

    def check(self) -> None:
        """Assert what a user relies on (see the module docstring)."""
        assert not self.errors, "\n".join(self.errors[:20])
        assert not self.stuck, self.stuck
        assert self.rounds >= self.clients, self.rounds          # every device got through
        assert self.polls and all(status == 200 for status, _ in self.polls), \
            Counter(status for status, _ in self.polls)
        assert not self.diverged, "\n".join(self.diverged[:20])
        assert not self.log_problems, "\n".join(self.log_problems[:20])


def poll_health(server: ServerProcess, stop: threading.Event, figures: Figures) -> None:
    """GET /health every POLL_S on a connection of its own until ``stop``; the
    server's threads and memory noted meanwhile."""
    while not stop.wait(POLL_S):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=T,
                                          source_address=("127.0.0.2", 0))
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            figures.polls.append((response.status, time.perf_counter() - started))
        except (OSError, http.client.HTTPException) as exc:    # a timeout included
            figures.polls.append((type(exc).__name__, time.perf_counter() - started))
        finally:
            conn.close()
        with contextlib.suppress(OSError):                     # (the process may be gone)
            figures.peak_threads = max(figures.peak_threads, server.threads())
            figures.peak_rss_mb = max(figures.peak_rss_mb, server.rss_mb())


def sync_round(device: Device) -> str | None:
    """One round: write, sync, hello; what went wrong (None: nothing)."""
    device.write_as_cc()
    result = ccsync.sync_once(device.store, device.client)
    if result.refused or result.pulled.refused or result.waiting:
        return (f"refused {dict(result.refused)}, rejected {dict(result.pulled.refused)}, "
                f"waiting {result.waiting}")
    if device.client.hello().get("device") != device.name:
        return "hello answered for another device"
    return None


def run_rounds(device: Device, until: float, figures: Figures, lock: threading.Lock) -> None:
    """Rounds until the monotonic time ``until`` (one at least); every failure recorded."""
    started = time.monotonic()
    while device.rounds == 0 or started < until:
        try:
            problem = sync_round(device)
        except Exception as exc:                # noqa: BLE001 -- recorded, then asserted
            problem = f"{type(exc).__name__}: {exc}"
        device.rounds += 1
        device.slowest = max(device.slowest, time.monotonic() - started)
        if problem:
            with lock:
                figures.errors.append(f"{device.name} round {device.rounds}: {problem}")
        started = time.monotonic()


def run_threads(target, devices: list[Device], args: tuple, limit: float) -> list[str]:
    """Run ``target(device, *args)`` on a thread per device; names of those still
    running after ``limit`` seconds."""
    threads = [threading.Thread(target=target, args=(d, *args), daemon=True,
                                name=d.name) for d in devices]
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def final_sync(device: Device, figures: Figures, lock: threading.Lock) -> None:
    """One more sync, once every device has pushed everything: it pulls the rest."""
    try:
        ccsync.sync_once(device.store, device.client)
    except Exception as exc:                    # noqa: BLE001 -- recorded, then asserted
        with lock:
            figures.errors.append(f"{device.name} final sync: {type(exc).__name__}: {exc}")


def check_converged(devices: list[Device], figures: Figures) -> None:
    """Every device holds every device's projects, with the last edits; all alike."""
    every = {name for d in devices for name in d.names}
    first = content(devices[0].cc)
    for d in devices:
        names = {n for (n,) in d.cc.execute("SELECT name FROM project")}
        if names != every:
            figures.diverged.append(f"{d.name}: missing {sorted(every - names)[:5]}, "
                                    f"extra {sorted(names - every)[:5]}")
        elif content(d.cc) != first:
            figures.diverged.append(f"{d.name}: content differs from {devices[0].name}'s")


def make_devices(tmp_path: Path, server: ServerProcess, clients: int) -> list[Device]:
    """Register ``clients`` devices on the server; a fresh cc database for each."""
    store = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    try:
        keys = [store.register(f"d{i}") for i in range(clients)]
    finally:
        store.conn.close()
    url = f"http://127.0.0.1:{server.port}"
    devices = []
    for i, key in enumerate(keys):
        path = tmp_path / f"d{i}.db"
        make_cc_db(path).close()
        cc = sqlite3.connect(str(path), isolation_level=None, timeout=5,  # cc's own, autocommit
                             check_same_thread=False)       # used on the device's thread
        devices.append(Device(f"d{i}", cc, ccsync.open_store(str(path)),
                              CountingClient(url, key, timeout=T)))
    return devices


def run_clients(tmp_path: Path, clients: int, seconds: float, *server_args: str) -> Figures:
    """The whole run against a fresh server process (started with ``server_args``);
    figures for check() and report()."""
    figures, lock = Figures(clients, seconds), threading.Lock()
    server = ServerProcess(tmp_path, *server_args)
    devices: list[Device] = []
    stop = threading.Event()
    monitor = threading.Thread(target=poll_health, args=(server, stop, figures), daemon=True)
    try:
        devices = make_devices(tmp_path, server, clients)
        monitor.start()
        until = time.monotonic() + seconds
        figures.stuck += run_threads(run_rounds, devices, (until, figures, lock),
                                     seconds + LATE)
        figures.stuck += run_threads(final_sync, devices, (figures, lock), LATE)
        stop.set()
        monitor.join(T + 1)
        if monitor.is_alive():
            figures.stuck.append("health monitor")
        figures.server_threads, figures.server_rss_mb = server.threads(), server.rss_mb()
        if not figures.stuck:
            check_converged(devices, figures)
    finally:
        stop.set()
        for d in devices:
            figures.rounds += d.rounds
            figures.slowest_round = max(figures.slowest_round, d.slowest)
            figures.retried.update(d.client.retried)
            d.close()
        alive = server.proc.poll() is None
        server.stop()
    log = server.log.read_text(errors="replace")
    if not alive:
        figures.log_problems.append("the server process died")
    figures.log_problems += [ln for ln in log.splitlines()
                             if "Traceback" in ln or " 500 " in ln or "error:" in ln]
    return figures
