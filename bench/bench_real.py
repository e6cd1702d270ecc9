#!/usr/bin/env python3
"""End-to-end benchmark of ccsync: the real server and the real CLI, over loopback.

What it measures (every figure is a report; nothing here asserts a time limit):

1. first sync of ``--rows`` rows: device A ``push``, then a fresh, empty device
   B ``pull``: time, rows/s, bytes each way on the wire, peak RSS of the client
   and of the server, disk bytes the client wrote (also as a multiple of the
   database file), and B's row counts checked against A's;
2. an idle ``sync`` on A and on B (median of 5): latency and bytes;
3. a one-row edit on A, then ``sync`` on A and on B (median of 5);
4. 1 % of the rows edited on A (switch_log notes), then ``sync`` on A and on B;
5. ``--devices`` fresh devices with 1,000 rows each, all pushing at once, then
   all pulling at once (a server of their own): wall time and errors;
6. capture overhead: cc's bulk insert of 20,000 switch_log rows (executemany,
   WAL) into a database without ccsync, and into one after ``ccsync stamp``;
7. growth: the first-sync ratio at 10,000 rows and at ``--rows`` (and
   1,000,000 with ``--million``), each on its own server and devices;
8. during each first sync, a separate cc-like writer process inserts a
   switch_log row every 2-5 ms into the database being synced (its own
   connection, busy timeout 5 s) and records each write's latency.

How: ``build_zipapp.py`` builds ``dist/ccsync.pyz`` (unless ``--no-build``), a
copy of it in a temporary directory runs as ``server`` on 127.0.0.1 (ephemeral
port) and as every client command.  A counting TCP proxy thread on 127.0.0.1
sits in front of the server, so "bytes up/down" are the HTTP bytes (headers and
encrypted bodies) each way.  Devices are registered with ``register --name X
--json`` and configured with ``setup --server URL --api-key -``; each has its
own HOME.  The cc databases are built with plain sqlite3 from
tests/cc-schema.sql before ccsync touches them: ~45 % switch_log, ~45 %
knowledge_index, ~10 % repositories, projects, environments, databases and
(non-secret) settings.  Client peak RSS and disk writes come from the child's
own accounting (``wait4`` rusage and ``/proc/<pid>/io`` read while it is a
zombie); the server's peak RSS is ``VmHWM``, reset before each step through
``/proc/<pid>/clear_refs`` when the kernel allows it.

The FLOOR, measured in the same run on the same rows, with the crypto a sync
uses (end to end, then the transport's seal): read every row with sqlite3,
json.dumps, zlib.compress, AES-GCM encrypt under the user's key, AES-GCM
encrypt under the device's key, the two decrypts, zlib.decompress,
json.loads, executemany into a fresh database with the same schema, commit.
Devices are set up with a sync passphrase, so the sync runs end to end.
Sync figures are reported as a multiple of the floor ("x floor").

The temporary directory is removed at the end and every process started is
stopped.  Exit 0 when everything ran and every check held, 1 otherwise.

    .venv/bin/python bench/bench_real.py [--rows N] [--devices N] [--million]
        [--json PATH] [--quick] [--no-build]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as _dt
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = (REPO / "tests" / "cc-schema.sql").read_text()
BUILT_PYZ = REPO / "dist" / "ccsync.pyz"
PYTHON = sys.executable
perf = time.perf_counter

SYNCED_TABLES = ("version", "setting", "database", "project", "environment", "switch_log",
                 "backup", "repository", "skill_tag", "knowledge_index")
SCRUBBED_ENV = ("CC_SERVER", "CC_API_KEY", "CCSYNC_SERVER", "CCSYNC_API_KEY", "CC_DB",
                "CC_CA_FILE", "CCSYNC_LOCAL_SETTINGS", "CCSYNC_E2E_KEY", "CCSYNC_PASSPHRASE")
BENCH_PASSPHRASE = "the benchmark's sync passphrase"   # every device's, given to setup
LISTENING = re.compile(r"server listening on http://127\.0\.0\.1:(\d+) ")
WRITER_SOURCE = "bench-writer"          # switch_log.source of the writer's rows
REPEAT = 5                              # runs behind every median
SERVER_START_S, STOP_S = 30.0, 10.0
SETTING_NAMES = ("theme", "editor.fontsize", "editor.tabsize", "editor.wordwrap",
                 "ui.language", "ui.density", "default_version", "notifications.enabled",
                 "log.level", "switch.confirm", "backup.keep", "index.auto")
WORDS = ("fix", "invoice", "rounding", "customer", "report", "migration", "review", "call",
         "stock", "picking", "tax", "module", "upgrade", "test", "deploy", "hotfix", "sale",
         "purchase", "accounting", "payroll", "website", "portal", "the", "a", "for", "with",
         "and", "after", "before", "on", "staging", "production", "branch", "merge", "ticket",
         "debug", "slow", "query", "view", "field", "compute", "cron", "email", "template")


def log(*parts: object) -> None:
    """Progress goes to stderr; stdout is the final table."""
    print(*parts, file=sys.stderr, flush=True)


class BenchFailure(Exception):
    """A check that did not hold, or a command that failed."""


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


##### cc's data, built with plain sqlite3 ######################################

def create_cc_db(path: Path, *, wal: bool = True) -> sqlite3.Connection:
    """A new cc database from cc's real schema; an autocommit connection to it."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    conn.executescript(SCHEMA)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    return conn


def table_sizes(rows: int) -> dict[str, int]:
    """How ``rows`` rows split over the tables: 45 % / 45 % / 10 % the rest."""
    switch_log = knowledge = round(rows * 0.45)
    rest = max(5, rows - switch_log - knowledge)
    sizes = {"repository": max(1, rest * 10 // 100), "project": max(1, rest * 20 // 100),
             "database": max(1, rest * 25 // 100), "setting": max(1, rest * 5 // 100)}
    sizes["environment"] = max(1, rest - sum(sizes.values()))
    sizes.update(switch_log=switch_log, knowledge_index=knowledge)
    return sizes


def setting_names(count: int) -> list[str]:
    """Non-secret, syncable setting names (never *_path, *key, token, ...)."""
    names = list(SETTING_NAMES[:count])
    names += [f"pref.option_{i}" for i in range(count - len(names))]
    return names


def note_text(rng: random.Random) -> str:
    """A switch_log note of 50-200 characters of plain words."""
    size, words = rng.randint(50, 200), []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:size]


def iso(moment: _dt.datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def fill_cc(conn: sqlite3.Connection, rows: int, rng: random.Random,
            tag: str = "") -> dict[str, int]:
    """Fill an empty cc database with about ``rows`` rows; returns the count per table.

    ``tag`` prefixes every natural key (project, database, repository, ...) so
    that devices filled with different tags hold different rows; setting names
    are shared, as on real machines.
    """
    n = table_sizes(rows)
    base = _dt.datetime(2024, 1, 1, 8, 0, 0)
    projects, envs = n["project"], n["environment"]
    env_ids = {p: [] for p in range(1, projects + 1)}
    for e in range(1, envs + 1):
        env_ids[(e - 1) % projects + 1].append(e)
    ins = conn.executemany
    conn.execute("BEGIN")
    ins("INSERT INTO setting (name, value) VALUES (?, ?)",
        [(name, str(rng.randint(1, 100))) for name in setting_names(n["setting"])])
    ins("INSERT INTO database (id, name, last_update, in_pg, size_bytes, is_odoo) "
        "VALUES (?, ?, ?, 1, ?, 1)",
        [(i, f"{tag}db_{i:05d}", iso(base + _dt.timedelta(hours=i)), rng.randint(10**7, 10**10))
         for i in range(1, n["database"] + 1)])
    ins("INSERT INTO project (id, name, is_virtual, no_auto_archive, home_repo, main_branch, "
        "environment_ids) VALUES (?, ?, 0, 0, ?, 'main', ?)",
        [(p, f"{tag}project-{p:05d}", f"git@github.com:acme/{tag}project-{p}.git",
          json.dumps(env_ids[p])) for p in range(1, projects + 1)])
    ins("INSERT INTO environment (id, name, project_path, github_url, branch_name, project_id, "
        "database_id, module_ids, last_used_at, notes, pinned, status) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, '[]', ?, ?, 0, 'active')",
        [(e, f"env-{(e - 1) // projects}", f"/home/dev/envs/{tag}{e}",
          f"https://github.com/acme/{tag}project-{(e - 1) % projects + 1}", f"branch-{e}",
          (e - 1) % projects + 1, rng.randint(1, n["database"]),
          iso(base + _dt.timedelta(days=e % 300)), note_text(rng)) for e in range(1, envs + 1)])
    ins("INSERT INTO repository (id, name, path, origin_url, last_indexed_at, enabled) "
        "VALUES (?, ?, ?, ?, ?, 1)",
        [(r, f"{tag}repo-{r}", f"/home/dev/src/{tag}repo-{r}",
          f"git@github.com:acme/{tag}repo-{r}.git", iso(base))
          for r in range(1, n["repository"] + 1)])
    ins("INSERT INTO switch_log (environment_id, switched_at, flagged, ended_at, note, source, "
        "edited) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ((rng.randint(1, envs), iso(at := base + _dt.timedelta(seconds=600 * i,
                                                               microseconds=rng.randrange(10**6))),
          int(rng.random() < 0.05), iso(at + _dt.timedelta(minutes=rng.randint(5, 120))),
          note_text(rng), rng.choice(("auto", "manual")), int(i % 9 == 0))
         for i in range(n["switch_log"])))
    ins("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, commit_count, "
        "loc_authored, last_touched, top_files) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ((rng.randint(1, n["repository"]), f"addons.{tag}mod_{i % 300}.Model{i}.method",
          ("class", "method", "field")[i % 3], rng.randint(1, 200), rng.randint(1, 3000),
          iso(base + _dt.timedelta(minutes=i)),
          json.dumps([f"addons/mod_{i % 300}/models/m{j}.py" for j in range(2)]))
         for i in range(n["knowledge_index"])))
    conn.execute("COMMIT")
    return n


def row_counts(db: Path, *, without_writer: bool = False) -> dict[str, int]:
    """Rows per synced table (optionally not counting the writer's switch_log rows)."""
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
                  for t in SYNCED_TABLES}
        if without_writer:
            counts["switch_log"] -= conn.execute(
                "SELECT count(*) FROM switch_log WHERE source = ?", (WRITER_SOURCE,)).fetchone()[0]
    return counts


def db_size(db: Path) -> int:
    """The database file plus its WAL, in bytes."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def notes_digest(db: Path) -> str:
    """A digest of every switch_log (switched_at, note): equal on devices that agree."""
    digest = hashlib.sha256()
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        for row in conn.execute("SELECT switched_at, note FROM switch_log ORDER BY switched_at"):
            digest.update(repr(row).encode())
    return digest.hexdigest()


##### The floor: the same rows, moved by hand #################################

def measure_floor(src: Path, workdir: Path, repeat: int) -> dict:
    """Best of ``repeat`` hand-made transfers of every row of ``src``; stage times in s."""
    from Cryptodome.Cipher import AES
    from Cryptodome.Random import get_random_bytes
    best = None
    for attempt in range(repeat):
        dst_path = workdir / f"floor-{attempt}.db"
        dst = create_cc_db(dst_path)
        stages = {}

        def stage(name: str, started: float) -> float:
            stages[name] = perf() - started
            return perf()

        t = perf()
        with contextlib.closing(sqlite3.connect(src)) as conn:
            data = {}
            for table in SYNCED_TABLES:
                cur = conn.execute(f'SELECT * FROM "{table}"')
                data[table] = {"columns": [d[0] for d in cur.description], "rows": cur.fetchall()}
        t = stage("read", t)
        plain = json.dumps(data).encode()
        t = stage("json.dumps", t)
        packed = zlib.compress(plain)
        t = stage("zlib.compress", t)
        user, key, nonce = get_random_bytes(32), get_random_bytes(32), get_random_bytes(12)
        inner, inner_mac = AES.new(user, AES.MODE_GCM, nonce=nonce).encrypt_and_digest(packed)
        sealed, mac = AES.new(key, AES.MODE_GCM, nonce=nonce).encrypt_and_digest(inner)
        t = stage("aes-gcm encrypt x2", t)
        inner = AES.new(key, AES.MODE_GCM, nonce=nonce).decrypt_and_verify(sealed, mac)
        opened = AES.new(user, AES.MODE_GCM, nonce=nonce).decrypt_and_verify(inner, inner_mac)
        t = stage("aes-gcm decrypt x2", t)
        unpacked = zlib.decompress(opened)
        t = stage("zlib.decompress", t)
        received = json.loads(unpacked)
        t = stage("json.loads", t)
        dst.execute("BEGIN")
        for table, body in received.items():
            cols = ", ".join(f'"{c}"' for c in body["columns"])
            marks = ", ".join("?" * len(body["columns"]))
            dst.executemany(f'INSERT INTO "{table}" ({cols}) VALUES ({marks})', body["rows"])
        dst.execute("COMMIT")
        stage("executemany + commit", t)
        dst.close()
        if row_counts(dst_path) != row_counts(src):
            raise BenchFailure("floor: the hand-made copy does not hold the same rows")
        total = sum(stages.values())
        if best is None or total < best["seconds"]:
            best = {"seconds": total, "stages": stages, "json_bytes": len(plain),
                    "wire_bytes": len(sealed) + len(nonce) + len(mac),
                    "rows": sum(len(b["rows"]) for b in data.values())}
        for suffix in ("", "-wal", "-shm"):
            Path(f"{dst_path}{suffix}").unlink(missing_ok=True)
    return best


##### Processes: a measured client run, the server, the proxy, the writer ######

def clean_env(home: Path) -> dict[str, str]:
    """os.environ without ccsync's own variables, with HOME replaced."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["HOME"] = str(home)
    env["CCSYNC_PASSPHRASE"] = BENCH_PASSPHRASE
    return env


def read_proc(pid: int, name: str) -> dict[str, int]:
    """/proc/<pid>/io or /proc/<pid>/status as {key: int} (empty when unreadable)."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0])
    return values


@dataclass
class Run:
    """One finished client process and what it cost."""

    args: list[str]
    rc: int
    seconds: float
    stdout: str
    stderr: str
    max_rss_kb: int
    io: dict[str, int]
    timed_out: bool = False

    @property
    def disk(self) -> tuple[int, str]:
        """Bytes written: write_bytes (block layer) when the kernel counts it, else wchar."""
        if self.io.get("write_bytes"):
            return self.io["write_bytes"], "write_bytes"
        return self.io.get("wchar", 0), "wchar"

    @property
    def error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        picked = [l for l in lines if l.startswith("ccsync: error")] or lines[-1:]
        return (picked[0] if picked else f"exit {self.rc}, no stderr")[:300]

    def json(self) -> dict:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise BenchFailure(f"{' '.join(self.args[2:4])}: no JSON on stdout: "
                               f"{self.stdout[:200]!r} {self.error_line}") from None


def run_measured(args: list[str], env: dict, timeout: float, stdin_text: str | None = None,
                 cwd: Path | None = None) -> Run:
    """Run a command to its end (killed after ``timeout`` s) and collect its own costs.

    Peak RSS: the child's VmHWM, sampled every 10 ms while it runs.  (wait4's
    ru_maxrss alone would not do: exec records the parent's high-water mark
    into it, so it is trusted only when it exceeds ours.)  The child is waited
    for with WNOWAIT first, so its /proc/<pid>/io can still be read while it is
    a zombie; wait4 then reaps it.
    """
    own_peak = read_proc(os.getpid(), "status").get("VmHWM", 0)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = perf()
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err,
                                stdin=subprocess.PIPE if stdin_text is not None
                                else subprocess.DEVNULL)
        killed, done = threading.Event(), threading.Event()
        peak = [0]

        def kill() -> None:
            killed.set()
            proc.kill()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], read_proc(proc.pid, "status").get("VmHWM", 0))

        timer = threading.Timer(timeout, kill)
        sampler = threading.Thread(target=sample, daemon=True)
        timer.start()
        sampler.start()
        try:
            if stdin_text is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(stdin_text.encode())
                    proc.stdin.close()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
            done.set()
        seconds = perf() - started
        io = read_proc(proc.pid, "io")
        sampler.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if usage.ru_maxrss > own_peak:
            peak[0] = max(peak[0], usage.ru_maxrss)
        out.seek(0)
        err.seek(0)
        return Run(args, proc.returncode, seconds, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), peak[0], io, killed.is_set())


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts the bytes going each way."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.up = self.down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _relay(self, client: socket.socket) -> None:
        client.settimeout(None)
        with self._lock:
            self.connections += 1
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        peer = {client: server, server: client}
        open_ends = {client, server}
        try:
            while open_ends and not self._stop.is_set():
                readable, _, _ = select.select(list(open_ends), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:                    # EOF: pass the half-close on
                        open_ends.discard(sock)
                        with contextlib.suppress(OSError):
                            peer[sock].shutdown(socket.SHUT_WR)
                        continue
                    peer[sock].sendall(data)
                    with self._lock:
                        if sock is client:
                            self.up += len(data)
                        else:
                            self.down += len(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._acceptor.join(STOP_S)
        for thread in self._threads:
            thread.join(STOP_S)


class Server:
    """``ccsync.pyz server`` on 127.0.0.1, port 0, its own data file and HOME."""

    def __init__(self, pyz: Path, root: Path):
        self.pyz, self.root = pyz, root
        self.home = root / "server-home"
        self.home.mkdir(parents=True)
        self.data = root / "server.db"
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.can_reset_peak = True

    def start(self) -> None:
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [PYTHON, str(self.pyz), "server", "--host", "127.0.0.1", "--port", "0",
                 "--data", str(self.data)], env=clean_env(self.home),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return
            time.sleep(0.05)
        raise BenchFailure(f"server did not start: {self.log_path.read_text()[-500:]}")

    def register(self, name: str) -> str:
        run = run_measured([PYTHON, str(self.pyz), "register", "--name", name,
                            "--data", str(self.data), "--json"], clean_env(self.home), 60)
        if run.rc != 0:
            raise BenchFailure(f"register {name}: {run.error_line}")
        return run.json()["api_key"]

    def reset_peak(self) -> None:
        """Start a new peak-RSS window (VmHWM) if the kernel lets us."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            self.can_reset_peak = False

    def peak_rss_kb(self) -> int | None:
        return read_proc(self.proc.pid, "status").get("VmHWM")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_S)


@contextlib.contextmanager
def serving(pyz: Path, root: Path):
    """A running server with a counting proxy in front; both stopped on exit."""
    server = Server(pyz, root)
    proxy = None
    try:
        server.start()
        proxy = CountingProxy(server.port)
        yield server, proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()
        log_text = server.log_text() if server.log_path.exists() else ""
        if "Traceback" in log_text:
            log("server log holds a traceback:\n" + log_text[-2000:])


def writer_main(cfg: dict, ready, stop) -> None:
    """The cc-like writer (a child process): a committed switch_log insert every 2-5 ms.

    Own connection, busy timeout 5 s, Python's default (implicit BEGIN)
    transactions.  Every attempt's latency and error goes to cfg['out'].
    """
    rng = random.Random(cfg["seed"])
    conn = sqlite3.connect(cfg["db"], timeout=5)
    latencies, errors, locked = [], [], 0
    envs: list[int] = []
    refresh_at = 0.0
    deadline = time.monotonic() + cfg["max_seconds"]
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            if time.monotonic() >= refresh_at:     # rows a pull brings in become targets too
                envs = pick_environments(conn, rng) or envs
                refresh_at = time.monotonic() + 0.25
            started = perf()
            conn.execute("INSERT INTO switch_log (environment_id, switched_at, flagged, note, "
                         "source, edited) VALUES (?, ?, 0, ?, ?, 0)",
                         (rng.choice(envs) if envs else None,
                          iso(_dt.datetime.now()),
                          note_text(rng), WRITER_SOURCE))
            conn.commit()
            latencies.append(perf() - started)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            locked += "database is locked" in str(exc)
            errors.append(f"{type(exc).__name__}: {exc}")
        ready.set()
        time.sleep(rng.uniform(0.002, 0.005))
    conn.close()
    Path(cfg["out"]).write_text(json.dumps({"latencies": latencies, "errors": errors,
                                            "locked": locked}))


def pick_environments(conn: sqlite3.Connection, rng: random.Random, count: int = 8) -> list[int]:
    """A few existing environment ids (empty if there is none yet)."""
    low, high = conn.execute("SELECT min(id), max(id) FROM environment").fetchone()
    if low is None:
        return []
    probe = "SELECT id FROM environment WHERE id >= ? ORDER BY id LIMIT 1"
    return [conn.execute(probe, (rng.randint(low, high),)).fetchone()[0] for _ in range(count)]


@contextlib.contextmanager
def cc_writer(db: Path, workdir: Path, tag: str, max_seconds: float, outcome: dict):
    """Run the writer on ``db`` for the duration of the block; its summary into ``outcome``."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    out = workdir / f"writer-{tag}.json"
    proc = ctx.Process(target=writer_main, daemon=True, args=(
        {"db": str(db), "out": str(out), "tag": tag, "seed": zlib.crc32(tag.encode()),
         "max_seconds": max_seconds}, ready, stop))
    proc.start()
    try:
        if not ready.wait(60):
            raise BenchFailure(f"writer on {db.name} did not start")
        yield
    finally:
        stop.set()
        proc.join(STOP_S + 5)           # one write may wait up to its 5 s busy timeout
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_S)
    if not out.exists():
        raise BenchFailure(f"writer on {db.name} wrote no results (exit {proc.exitcode})")
    outcome.update(summarize_writer(json.loads(out.read_text())))


def summarize_writer(raw: dict) -> dict:
    ms = [s * 1000 for s in raw["latencies"]]
    return {"writes": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms, default=None), "locked": raw["locked"],
            "errors": len(raw["errors"]), "first_error": (raw["errors"] or [None])[0]}


##### Devices and measured steps ##############################################

class Device:
    """One machine: its own HOME (with .cc-cli/.env after setup) and cc database."""

    def __init__(self, pyz: Path, root: Path, name: str):
        self.pyz, self.name = pyz, name
        self.home = root / f"home-{name}"
        (self.home / ".cc-cli").mkdir(parents=True)
        self.db = self.home / ".cc-cli" / "cc_cli.db"

    def cli(self, *args: str, timeout: float = 120, stdin_text: str | None = None,
            db: bool = True) -> Run:
        argv = [PYTHON, str(self.pyz), *args, *(["--db", str(self.db)] if db else [])]
        return run_measured(argv, clean_env(self.home), timeout, stdin_text)

    def setup(self, url: str, key: str) -> None:
        run = self.cli("setup", "--server", url, "--api-key", "-", "--json",
                       stdin_text=key + "\n", db=False)
        if run.rc != 0:
            raise BenchFailure(f"setup {self.name}: {run.error_line}")
        if run.json().get("device") != self.name:
            raise BenchFailure(f"setup {self.name}: server knows it as {run.json()}")

    def edit(self, sql: str, *params) -> int:
        """An edit as cc makes it: its own short connection; returns rows changed."""
        with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as conn:
            changed = conn.execute(sql, params).rowcount
            conn.commit()
        return changed


@dataclass
class Step:
    """A measured client command: its Run plus wire bytes and the server's peak."""

    run: Run
    up: int
    down: int
    server_rss_kb: int | None
    server_peak_window: str          # "step" (VmHWM reset before it) or "since start"
    db_bytes: int
    result: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        disk, kind = self.run.disk
        return {"seconds": self.run.seconds, "up_bytes": self.up, "down_bytes": self.down,
                "client_peak_rss_kb": self.run.max_rss_kb, "server_peak_rss_kb": self.server_rss_kb,
                "server_peak_window": self.server_peak_window,
                "client_disk_bytes": disk, "client_disk_counter": kind, "db_bytes": self.db_bytes,
                "result": self.result}


def measured(dev: Device, command: str, server: Server, proxy: CountingProxy,
             timeout: float) -> Step:
    """Run ``command --json`` on ``dev``; fail loudly unless it exits 0."""
    server.reset_peak()
    up0, down0 = proxy.counts()
    run = dev.cli(command, "--json", timeout=timeout)
    up1, down1 = proxy.counts()
    if run.rc != 0:
        why = "timed out" if run.timed_out else run.error_line
        raise BenchFailure(f"{command} on {dev.name} failed (exit {run.rc}): {why}")
    window = "step" if server.can_reset_peak else "since start"
    return Step(run, up1 - up0, down1 - down0, server.peak_rss_kb(), window, db_size(dev.db),
                run.json())


##### Scenarios ###############################################################

@dataclass
class Report:
    """Table rows, detailed results and failed checks."""

    rows: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def row(self, scenario: str, step: str, *, seconds: float | None = None,
            floor: float | None = None, rows: int | None = None, measured_step: Step | None = None,
            note: str = "") -> None:
        entry = {"scenario": scenario, "step": step, "seconds": seconds,
                 "x_floor": seconds / floor if seconds is not None and floor else None,
                 "rows_per_s": rows / seconds if rows and seconds else None, "note": note}
        if measured_step is not None:
            entry.update(measured_step.as_dict())
            entry.pop("result")
        self.rows.append(entry)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            log(f"CHECK FAILED: {what}")
        return ok


def sync_timeout(rows: int) -> float:
    """A generous bound for one command moving ``rows`` rows (never judged)."""
    return 300 + rows * 0.02


def first_sync(pyz: Path, root: Path, rows: int, report: Report, label: str,
               floor_repeat: int, keep: bool = False):
    """Scenarios 1 and 8 at ``rows``: A pushes, fresh B pulls, a writer on each side.

    Returns (ratio, details) and, with ``keep``, the live (server, proxy, A, B)
    context for the steady-state scenarios (the caller closes it).
    """
    root.mkdir(parents=True)
    stack = contextlib.ExitStack()
    try:
        server, proxy = stack.enter_context(serving(pyz, root))
        url = f"http://127.0.0.1:{proxy.port}"
        a, b = Device(pyz, root, "A"), Device(pyz, root, "B")
        log(f"[{label}] building A with {rows:,} rows")
        with contextlib.closing(create_cc_db(a.db)) as conn:
            generated = {t: 0 for t in SYNCED_TABLES}
            generated.update(fill_cc(conn, rows, random.Random(rows)))
        create_cc_db(b.db).close()
        total = sum(generated.values())
        db_before = db_size(a.db)
        log(f"[{label}] floor (best of {floor_repeat})")
        floor = measure_floor(a.db, root, floor_repeat)
        for dev in (a, b):
            dev.setup(url, server.register(dev.name))
        timeout = sync_timeout(total)
        writers = {"A": {}, "B": {}}
        log(f"[{label}] A push {total:,} rows (writer on A)")
        with cc_writer(a.db, root, "A", timeout + 60, writers["A"]):
            push = measured(a, "push", server, proxy, timeout)
        log(f"[{label}] B pull (writer on B)")
        with cc_writer(b.db, root, "B", timeout + 60, writers["B"]):
            pull = measured(b, "pull", server, proxy, timeout)
        counts_b = row_counts(b.db, without_writer=True)
        sync_s = push.run.seconds + pull.run.seconds
        details = {"rows": total, "generated": generated, "floor": floor, "db_before": db_before,
                   "push": push.as_dict(), "pull": pull.as_dict(), "writer": writers,
                   "b_counts_without_writer": counts_b, "x_floor": sync_s / floor["seconds"]}
        report.check(counts_b == generated,
                     f"{label}: B's row counts differ from A's: A {generated} B {counts_b}")
        report.check(push.result.get("accepted", 0) >= total,
                     f"{label}: A's push accepted {push.result.get('accepted')} of {total}")
        for side, w in writers.items():
            report.check(w["locked"] == 0 and w["errors"] == 0,
                         f"{label}: writer on {side}: {w['locked']} locked, {w['errors']} errors "
                         f"({w['first_error']})")
        if keep:
            return details, stack.pop_all(), (server, proxy, a, b)
        return details, None, None
    finally:
        stack.close()


def growth_point(details: dict) -> tuple[float, float, int, int]:
    """(push + pull seconds, x floor, db bytes before ccsync, B's db bytes after the pull)."""
    seconds = details["push"]["seconds"] + details["pull"]["seconds"]
    return seconds, details["x_floor"], details["db_before"], details["pull"]["db_bytes"]


def report_first_sync(report: Report, details: dict) -> None:
    floor, rows = details["floor"]["seconds"], details["rows"]
    push, pull = details["push"], details["pull"]
    step = {"push": push, "pull": pull}
    for name, who in (("push", "A push"), ("pull", "B pull (fresh db)")):
        entry = {"scenario": "1 first sync", "step": who, "seconds": step[name]["seconds"],
                 "x_floor": step[name]["seconds"] / floor,
                 "rows_per_s": rows / step[name]["seconds"], **step[name]}
        entry.pop("result")
        backup = step[name]["result"].get("backup")
        entry["note"] = "incl. pre-sync backup" if backup else ""
        report.rows.append(entry)
    report.row("1 first sync", "A push + B pull", seconds=push["seconds"] + pull["seconds"],
               floor=floor, rows=rows,
               note="B counts " + ("==" if details["b_counts_without_writer"]
                                        == details["generated"] else "!=") + " A")
    for side, w in details["writer"].items():
        report.row("8 cc writer", f"during {'A push' if side == 'A' else 'B pull'}",
                   note=f"{w['writes']} writes p50 {fmt_ms(w['p50_ms'])} p99 {fmt_ms(w['p99_ms'])}"
                        f" max {fmt_ms(w['max_ms'])} locked {w['locked']} errors {w['errors']}")


def settle(server: Server, proxy: CountingProxy, a: Device, b: Device, report: Report,
           timeout: float) -> None:
    """Sync A, B, A so the writers' rows reach both; then both must hold the same counts."""
    for dev in (a, b, a):
        measured(dev, "sync", server, proxy, timeout)
    counts_a, counts_b = row_counts(a.db), row_counts(b.db)
    report.check(counts_a == counts_b, f"after settling, A {counts_a} != B {counts_b}")


def idle_syncs(ctx, report: Report, floor: float) -> None:
    """Scenario 2: a sync with nothing to do, median of REPEAT on each side."""
    server, proxy, a, b = ctx
    for dev in (a, b):
        steps = [measured(dev, "sync", server, proxy, 120) for _ in range(REPEAT)]
        moved = [(s.result.get("sent"), s.result.get("applied")) for s in steps]
        median = sorted(steps, key=lambda s: s.run.seconds)[len(steps) // 2]
        report.details.setdefault("idle", {})[dev.name] = [s.as_dict() for s in steps]
        busy = [m for m in moved if m != (0, 0)]
        report.row("2 idle sync", f"sync {dev.name} (median of {REPEAT})",
                   seconds=median.run.seconds, floor=floor, measured_step=median,
                   note=f"NOT idle: sent/applied {busy}" if busy else "sent 0, applied 0")


def one_row_edits(ctx, report: Report, floor: float, rng: random.Random) -> None:
    """Scenario 3: one switch_log note edited on A, then sync A, sync B (median of REPEAT)."""
    server, proxy, a, b = ctx
    steps = {"A": [], "B": []}
    for i in range(REPEAT):
        row_id, switched_at = pick_switch_log(a, rng)
        note = f"edited by bench {i} {rng.random():.6f}"
        a.edit("UPDATE switch_log SET note = ? WHERE id = ?", note, row_id)
        steps["A"].append(measured(a, "sync", server, proxy, 120))
        steps["B"].append(measured(b, "sync", server, proxy, 120))
        with contextlib.closing(sqlite3.connect(b.db, timeout=5)) as conn:
            got = conn.execute("SELECT note FROM switch_log WHERE switched_at = ?",
                               (switched_at,)).fetchone()
        report.check(got == (note,), f"one-row edit {i} did not arrive on B: {got!r}")
    report.details["one_row"] = {k: [s.as_dict() for s in v] for k, v in steps.items()}
    for name, runs in steps.items():
        median = sorted(runs, key=lambda s: s.run.seconds)[len(runs) // 2]
        counts = "sent %s" % [s.result.get("sent") for s in runs] if name == "A" else \
                 "applied %s" % [s.result.get("applied") for s in runs]
        report.row("3 one-row edit", f"sync {name} (median of {REPEAT})",
                   seconds=median.run.seconds, floor=floor, measured_step=median, note=counts)


def pick_switch_log(dev: Device, rng: random.Random) -> tuple[int, str]:
    """A random switch_log row that the generator made (not the writer)."""
    with contextlib.closing(sqlite3.connect(dev.db, timeout=5)) as conn:
        count = conn.execute("SELECT count(*) FROM switch_log WHERE source != ?",
                             (WRITER_SOURCE,)).fetchone()[0]
        return conn.execute("SELECT id, switched_at FROM switch_log WHERE source != ? "
                            "ORDER BY id LIMIT 1 OFFSET ?",
                            (WRITER_SOURCE, rng.randrange(count))).fetchone()


def percent_edits(ctx, report: Report, floor: float, rows: int, rng: random.Random) -> None:
    """Scenario 4: 1 % of the rows (switch_log notes) edited on A, then sync A, sync B."""
    server, proxy, a, b = ctx
    k = max(1, rows // 100)
    with contextlib.closing(sqlite3.connect(a.db, timeout=5)) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM switch_log WHERE source != ?",
                                          (WRITER_SOURCE,))]
    chosen = rng.sample(ids, min(k, len(ids)))
    with contextlib.closing(sqlite3.connect(a.db, timeout=5)) as conn:
        conn.executemany("UPDATE switch_log SET note = note || ' (edited)' WHERE id = ?",
                         [(i,) for i in chosen])
        conn.commit()
    step_a = measured(a, "sync", server, proxy, sync_timeout(k))
    step_b = measured(b, "sync", server, proxy, sync_timeout(k))
    report.details["one_percent"] = {"edited": len(chosen), "A": step_a.as_dict(),
                                     "B": step_b.as_dict()}
    report.check(step_a.result.get("sent", 0) >= len(chosen),
                 f"1% edit: A sent {step_a.result.get('sent')} of {len(chosen)}")
    report.check(step_b.result.get("applied", 0) >= len(chosen),
                 f"1% edit: B applied {step_b.result.get('applied')} of {len(chosen)}")
    report.check(notes_digest(a.db) == notes_digest(b.db), "1% edit: switch_log notes differ")
    report.row("4 1% edited", f"sync A ({len(chosen):,} notes)", seconds=step_a.run.seconds,
               floor=floor, rows=len(chosen), measured_step=step_a,
               note=f"sent {step_a.result.get('sent')}")
    report.row("4 1% edited", "sync B", seconds=step_b.run.seconds, floor=floor,
               rows=len(chosen), measured_step=step_b,
               note=f"applied {step_b.result.get('applied')}")


def many_devices(pyz: Path, root: Path, count: int, rows_each: int, report: Report,
                 floor_per_row: float) -> None:
    """Scenario 5: ``count`` fresh devices push at once, then pull at once.

    Its "x floor" is the wall time over the floor's time per row (from the
    main first sync) times the rows the phase moved (accepted or applied).
    """
    root.mkdir(parents=True)
    with serving(pyz, root) as (server, proxy):
        url = f"http://127.0.0.1:{proxy.port}"
        devices, expected, settings = [], {t: 0 for t in SYNCED_TABLES}, set()
        log(f"[devices] preparing {count} devices with {rows_each:,} rows each")
        for i in range(count):
            dev = Device(pyz, root, f"dev{i:02d}")
            with contextlib.closing(create_cc_db(dev.db)) as conn:
                made = fill_cc(conn, rows_each, random.Random(1000 + i), tag=f"d{i:02d}-")
            for table, n in made.items():
                expected[table] += n
            settings.update(setting_names(made["setting"]))
            dev.setup(url, server.register(dev.name))
            devices.append(dev)
        expected["setting"] = len(settings)
        timeout = sync_timeout(rows_each * count)
        phases = {}
        for command in ("push", "pull"):
            log(f"[devices] all {count} {command} at once")
            server.reset_peak()
            up0, down0 = proxy.counts()
            started = perf()
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                runs = list(pool.map(lambda d: d.cli(command, "--json", timeout=timeout),
                                     devices))
            wall = perf() - started
            up1, down1 = proxy.counts()
            errors = [f"{d.name}: exit {r.rc}: {r.error_line}"
                      for d, r in zip(devices, runs) if r.rc != 0]
            moved = sum(r.json().get("accepted" if command == "push" else "applied", 0)
                        for r in runs if r.rc == 0)
            phases[command] = {"wall_s": wall, "rows_moved": moved, "up_bytes": up1 - up0,
                               "down_bytes": down1 - down0,
                               "server_peak_rss_kb": server.peak_rss_kb(), "errors": errors,
                               "client_peak_rss_kb": max(r.max_rss_kb for r in runs),
                               "client_disk_bytes": sum(r.disk[0] for r in runs),
                               "client_disk_counter": runs[0].disk[1],
                               "db_bytes": sum(db_size(d.db) for d in devices),
                               "slowest_s": max(r.seconds for r in runs)}
            for line in errors:
                report.check(False, f"{count} devices {command}: {line}")
        bad = {d.name: c for d in devices if (c := row_counts(d.db)) != expected}
        report.check(not bad, f"{count} devices: {len(bad)} device(s) do not hold everyone's "
                              f"rows, e.g. {next(iter(bad.items()), None)} vs {expected}")
    report.details["devices"] = {"count": count, "rows_each": rows_each, "expected": expected,
                                 "phases": phases}
    for command, p in phases.items():
        report.rows.append({
            "scenario": f"5 {count} devices", "step": f"all {command} at once",
            "seconds": p["wall_s"], "x_floor": scaled_ratio(p["wall_s"], floor_per_row,
                                                            p["rows_moved"]),
            "rows_per_s": p["rows_moved"] / p["wall_s"], "up_bytes": p["up_bytes"],
            "down_bytes": p["down_bytes"], "client_peak_rss_kb": p["client_peak_rss_kb"],
            "server_peak_rss_kb": p["server_peak_rss_kb"],
            "client_disk_bytes": p["client_disk_bytes"],
            "client_disk_counter": p["client_disk_counter"], "db_bytes": p["db_bytes"],
            "note": f"{p['rows_moved']:,} rows {'accepted' if command == 'push' else 'applied'}"
                    f"; RSS: largest client, disk: all clients; errors {len(p['errors'])}"})
    total = sum(p["wall_s"] for p in phases.values())
    moved = sum(p["rows_moved"] for p in phases.values())
    report.rows.append({"scenario": f"5 {count} devices", "step": "push + pull wall",
                        "seconds": total, "x_floor": scaled_ratio(total, floor_per_row, moved),
                        "rows_per_s": moved / total,
                        "note": f"errors {sum(len(p['errors']) for p in phases.values())}, "
                    f"{'all' if not bad else 'NOT all'} hold {sum(expected.values()):,} rows"})


def scaled_ratio(seconds: float, floor_per_row: float, rows: int) -> float | None:
    """``seconds`` over the floor's time for ``rows`` rows."""
    return seconds / (floor_per_row * rows) if floor_per_row and rows else None


def capture_overhead(pyz: Path, root: Path, rows: int, report: Report) -> None:
    """Scenario 6: cc's bulk insert (executemany, WAL) without ccsync vs after ``stamp``."""
    root.mkdir(parents=True)
    rng = random.Random(6)
    base = _dt.datetime(2025, 6, 1)
    batch = [(rng.randint(1, 200), iso(base + _dt.timedelta(seconds=30 * i)), 0,
              note_text(rng), "auto", 0) for i in range(rows)]
    times = {"without ccsync": [], "after ccsync stamp": []}
    pending = None
    for attempt in range(3):
        for variant in times:
            dev = Device(pyz, root, f"cap{attempt}-{variant.split()[0]}")
            with contextlib.closing(create_cc_db(dev.db)) as conn:
                fill_cc(conn, 1000, random.Random(attempt))    # a small cc db with environments
            if variant != "without ccsync":
                run = dev.cli("stamp", "--json")
                if run.rc != 0:
                    raise BenchFailure(f"stamp: {run.error_line}")
            with contextlib.closing(sqlite3.connect(dev.db, timeout=5)) as conn:
                started = perf()
                conn.executemany("INSERT INTO switch_log (environment_id, switched_at, flagged, "
                                 "note, source, edited) VALUES (?, ?, ?, ?, ?, ?)", batch)
                conn.commit()
                times[variant].append(perf() - started)
            if variant != "without ccsync" and pending is None:
                status = dev.cli("status", "--json")
                pending = status.json()["pending"].get("switch_log", {}) if status.rc == 0 else {}
            shutil.rmtree(dev.home)
    without, with_ = (statistics.median(times[v]) for v in times)
    report.details["capture"] = {"rows": rows, "seconds": times, "pending_after": pending}
    report.check((pending or {}).get("insert", 0) >= rows,
                 f"capture: status shows {pending} pending switch_log, expected {rows} inserts")
    report.row("6 capture", f"cc inserts {rows:,} rows, no ccsync", seconds=without, rows=rows,
               note="median of 3, WAL")
    report.row("6 capture", f"cc inserts {rows:,} rows, after stamp", seconds=with_, rows=rows,
               note=f"{with_ / without:.2f}x without; "
                    f"pending inserts {(pending or {}).get('insert')}")


##### Output ##################################################################

def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def fmt_x(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def table_lines(report: Report) -> list[str]:
    header = ("scenario", "step", "time", "x floor", "rows/s", "up", "down", "cli RSS",
              "srv RSS", "cli disk (x db)", "note")
    lines = []
    for r in report.rows:
        disk = "-"
        if r.get("client_disk_bytes") is not None:
            tag = "wb" if r["client_disk_counter"] == "write_bytes" else "wchar"
            disk = (f"{fmt_bytes(r['client_disk_bytes'])} {tag} "
                    f"({fmt_x(r['client_disk_bytes'] / max(1, r['db_bytes']))})")
        kb = lambda v: fmt_bytes(v * 1024) if v else "-"     # noqa: E731
        lines.append((r["scenario"], r["step"], fmt_s(r["seconds"]),
                      fmt_x(r.get("x_floor")),
                      f"{r['rows_per_s']:,.0f}" if r.get("rows_per_s") else "-",
                      fmt_bytes(r.get("up_bytes")), fmt_bytes(r.get("down_bytes")),
                      kb(r.get("client_peak_rss_kb")), kb(r.get("server_peak_rss_kb")), disk,
                      r.get("note", "")))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: " | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa
    return [fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, lines)]


##### Main ####################################################################

def build_pyz(workdir: Path, build: bool) -> Path:
    """Build dist/ccsync.pyz (unless told not to) and run a private copy of it."""
    if build:
        log("building dist/ccsync.pyz")
        done = subprocess.run([PYTHON, str(REPO / "build_zipapp.py")], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchFailure(f"build_zipapp.py failed: {done.stderr.strip()[-300:]}")
    if not BUILT_PYZ.exists():
        raise BenchFailure(f"{BUILT_PYZ} is missing (run without --no-build)")
    pyz = workdir / "ccsync.pyz"
    shutil.copy2(BUILT_PYZ, pyz)
    return pyz


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="rows on device A for the first sync "
                                            "(default 10000; 2000 with --quick)")
    p.add_argument("--devices", type=int,
                   help="devices syncing at once (default 20; 4 with --quick)")
    p.add_argument("--million", action="store_true", help="add a 1,000,000-row growth point")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results.json",
                   help="where to write the results (default: bench/results.json)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--no-build", action="store_true", help="use the existing dist/ccsync.pyz")
    args = p.parse_args(argv)
    args.rows = args.rows or (2000 if args.quick else 10_000)
    args.devices = args.devices or (4 if args.quick else 20)
    args.device_rows = 300 if args.quick else 1000
    args.capture_rows = 5000 if args.quick else 20_000
    args.growth_base = 1000 if args.quick else 10_000
    if args.rows < 100 or args.devices < 1:
        p.error("--rows must be at least 100 and --devices at least 1")
    return args


def run_all(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    pyz = build_pyz(workdir, not args.no_build)
    version = subprocess.run([PYTHON, str(pyz), "--version"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    report.details["meta"] = {
        "ccsync": version, "pyz_sha256": hashlib.sha256(pyz.read_bytes()).hexdigest(),
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu",
        "loadavg_at_start": os.getloadavg(), "started": _dt.datetime.now().isoformat(),
        "args": {k: str(v) for k, v in vars(args).items()}}
    startup = statistics.median(
        run_measured([PYTHON, str(pyz), "--version"], clean_env(workdir), 60).seconds
        for _ in range(REPEAT))
    report.row("baseline", "python ccsync.pyz --version", seconds=startup,
               note=f"interpreter start + import, median of {REPEAT}")
    rng = random.Random(42)
    floor_repeat = 3 if args.rows <= 200_000 else 1
    main_floor = None
    growth = {}
    # Scenarios 1 and 8, then 2-4 on the same devices.
    try:
        details, stack, ctx = first_sync(pyz, workdir / "main", args.rows, report,
                                         f"{args.rows:,} rows", floor_repeat, keep=True)
    except BenchFailure as exc:
        report.check(False, f"first sync at {args.rows:,} rows: {exc}")
        stack = ctx = None
    if ctx is not None:
        with stack:
            main_floor = details["floor"]["seconds"]
            report.details["first_sync"] = details
            growth[args.rows] = growth_point(details)
            report.row("floor", f"by hand, {details['floor']['rows']:,} rows", seconds=main_floor,
                       floor=main_floor, rows=details["floor"]["rows"],
                       note=f"{fmt_bytes(details['floor']['wire_bytes'])} encrypted")
            report_first_sync(report, details)
            for name, step in (("steady state", lambda: settle(*ctx, report, sync_timeout(5000))),
                               ("idle", lambda: idle_syncs(ctx, report, main_floor)),
                               ("one-row", lambda: one_row_edits(ctx, report, main_floor, rng)),
                               ("1%", lambda: percent_edits(ctx, report, main_floor, args.rows,
                                                            rng))):
                log(f"[{args.rows:,} rows] {name}")
                try:
                    step()
                except BenchFailure as exc:
                    report.check(False, f"{name}: {exc}")
    shutil.rmtree(workdir / "main", ignore_errors=True)
    # Scenario 7: the other growth points, each on its own server.
    sizes = {args.growth_base} | ({1_000_000} if args.million else set())
    for size in sorted(sizes - {args.rows}):
        try:
            details, _, _ = first_sync(pyz, workdir / f"growth-{size}", size, report,
                                       f"{size:,} rows", 3 if size <= 200_000 else 1)
            growth[size] = growth_point(details)
            report.details.setdefault("growth", {})[size] = details
        except BenchFailure as exc:
            report.check(False, f"growth point {size:,}: {exc}")
        shutil.rmtree(workdir / f"growth-{size}", ignore_errors=True)
    for size, (seconds, ratio, db_before, db_after) in sorted(growth.items()):
        report.rows.append({"scenario": "7 growth", "step": f"first sync at {size:,} rows",
                            "seconds": seconds, "x_floor": ratio, "rows_per_s": size / seconds,
                            "note": f"push + pull, x its own floor; db {fmt_bytes(db_before)} "
                                    f"before ccsync, {fmt_bytes(db_after)} on B after"})
    # Scenario 5 and 6.
    try:
        many_devices(pyz, workdir / "devices", args.devices, args.device_rows, report,
                     main_floor / args.rows if main_floor else 0)
    except BenchFailure as exc:
        report.check(False, f"{args.devices} devices: {exc}")
    shutil.rmtree(workdir / "devices", ignore_errors=True)
    log("[capture] bulk insert with and without triggers")
    try:
        capture_overhead(pyz, workdir / "capture", args.capture_rows, report)
    except BenchFailure as exc:
        report.check(False, f"capture overhead: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import Cryptodome  # noqa: F401
    except ImportError:
        log("pycryptodomex is missing: run with .venv/bin/python")
        return 1
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="ccsync-bench-"))
    try:
        run_all(args, workdir, report)
    except BenchFailure as exc:
        report.check(False, str(exc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = table_lines(report)
    print("\n".join(lines))
    if report.failures:
        print("\nFAILED CHECKS:\n  " + "\n  ".join(report.failures))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"table": report.rows, "details": report.details,
                                     "failures": report.failures}, indent=2, default=str))
    log(f"results written to {args.json}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
