"""Auto-sync: the background loop cc's daemon embeds, and the `daemon` command.

What a user relies on: edits made while the loop runs reach the other
devices; a server outage is ridden out with a bounded backoff and recovers
without a restart; stop() is prompt and never leaves the database half
synced; two syncs on one database never interleave; an unconfigured or
broken setup never raises into the host program; errors go to the
``ccsync`` logger, which importing ccsync leaves unconfigured.

Every wait here is bounded (see wait_for); no test relies on wall-clock
timing except generous upper bounds.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ccsync
from conftest import content, make_cc_db

REPO = Path(__file__).resolve().parent.parent

needs_crypto = pytest.mark.skipif(not ccsync.crypto_available(),
                                  reason="the transport needs pycryptodomex")

CC_ENV_VARS = ("CC_SERVER", "CC_API_KEY", "CC_CA_FILE", "CC_DB", "CCSYNC_LOCAL_SETTINGS",
               "CCSYNC_E2E_KEY", "CCSYNC_PASSPHRASE")


##### helpers ##################################################################

@pytest.fixture(autouse=True)
def fast_loops(monkeypatch):
    """The loops here run at fractions of a second on purpose; the floor a
    host's interval gets (10 s) is tested in test_newcomer."""
    monkeypatch.setattr(ccsync, "MIN_INTERVAL_S", 0.01)


def wait_for(cond, timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``cond`` every ``step`` seconds for up to ``timeout``; its last truth value."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return bool(cond())
        time.sleep(step)


def lock_for(db: str) -> ccsync.SyncLock:
    """The SyncLock run_sync takes for ``db`` (it locks the path SQLite reports)."""
    store = ccsync.open_store(db)
    try:
        return ccsync.SyncLock(store.path)
    finally:
        store.conn.close()


def server_rows(data: str, table: str) -> int:
    """How many change records the server's data file holds for ``table``."""
    conn = sqlite3.connect(data, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM change WHERE tbl = ?", (table,)).fetchone()[0]
    finally:
        conn.close()


def clean_env(home: Path) -> dict:
    """os.environ without any cc/ccsync variable, with HOME (and USERPROFILE) at ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in CC_ENV_VARS}
    env["HOME"] = env["USERPROFILE"] = str(home)
    return env


def write_env(home: Path, server: str, key: str) -> None:
    d = home / ".cc-cli"
    d.mkdir(parents=True, exist_ok=True)
    (d / ".env").write_text(f"CC_SERVER={server}\nCC_API_KEY={key}\n")


class Net:
    """A real SyncServer on a thread, two registered devices 'a' and 'b'."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.data = str(tmp_path / "server.db")
        self.srv = ccsync.SyncServer(("127.0.0.1", 0), self.data).start()
        reg = ccsync.ServerStore.open(self.data)
        try:
            self.key_a, self.key_b = reg.register("a"), reg.register("b")
        finally:
            reg.conn.close()
        self.db_a, self.db_b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
        self.cc_a, self.cc_b = make_cc_db(Path(self.db_a)), make_cc_db(Path(self.db_b))
        self._b_store: ccsync.Store | None = None
        self.autos: list[ccsync.AutoSync] = []

    @property
    def url(self) -> str:
        return self.srv.url

    def auto(self, db: str | None = None, **kw) -> ccsync.AutoSync:
        kw.setdefault("server", self.url)
        kw.setdefault("api_key", self.key_a)
        kw.setdefault("interval", 0.2)
        kw.setdefault("environ", {})
        auto = ccsync.AutoSync(db_path=db or self.db_a, **kw)
        self.autos.append(auto)
        return auto

    def sync_b(self) -> ccsync.SyncResult:
        if self._b_store is None:
            self._b_store = ccsync.open_store(self.db_b)
        return ccsync.sync_once(self._b_store, ccsync.Client(self.url, self.key_b))

    def b_sees(self, query: str, *args) -> bool:
        """Sync B once, then whether ``query`` finds a row on B."""
        self.sync_b()
        return bool(self.cc_b.execute(query, args).fetchall())

    def close(self) -> None:
        for auto in self.autos:
            auto.stop(5)
        if self._b_store is not None:
            self._b_store.conn.close()
        self.cc_a.close()
        self.cc_b.close()
        self.srv.stop()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME and no cc/ccsync variables, so nothing of the user's is read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    for name in CC_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def net(tmp_path, home):
    n = Net(tmp_path)
    yield n
    n.close()


##### 1. next_delay ############################################################

def test_next_delay_after_success_is_the_interval():
    for rand in (lambda: 0.0, lambda: 0.5, lambda: 1.0):
        assert ccsync.next_delay(300, 0, rand) == 300
        assert ccsync.next_delay(0.2, 0, rand) == 0.2


def test_next_delay_backs_off_exponentially_capped_at_an_hour_with_jitter():
    low, high = (lambda: 0.0), (lambda: 1.0)
    bases = []
    for failures in range(1, 40):
        base = min(3600.0, 300 * 2 ** failures)
        bases.append(base)
        hi, lo = ccsync.next_delay(300, failures, high), ccsync.next_delay(300, failures, low)
        assert hi == pytest.approx(base)                 # rand 1.0 -> 100 % of the base
        assert lo == pytest.approx(base * 0.5)           # rand 0.0 -> 50 % of the base
        for r in (0.0, 0.25, 0.5, 0.75, 0.999, 1.0):
            d = ccsync.next_delay(300, failures, lambda r=r: r)
            assert base * 0.5 - 1e-9 <= d <= base + 1e-9
            assert d <= 3600
    assert bases[:3] == [600, 1200, 2400]                # grows exponentially ...
    assert bases[3:] == [3600] * (len(bases) - 3)        # ... until the one-hour cap
    # default rand stays in range too
    for _ in range(200):
        assert 300 <= ccsync.next_delay(300, 1) <= 600
    # once a sync succeeds (failures reset), back to the interval
    assert ccsync.next_delay(300, 0, high) == 300


def test_next_delay_capped_after_a_very_long_outage():
    # A daemon left running against a retired server keeps counting failures
    # (about one per hour at the cap); the delay must stay an hour, not raise.
    # AutoSync keeps its interval as a float, so test float intervals too.
    for interval in (300, 300.0, 0.2):
        for failures in (100, 1023, 1024, 1100, 10_000):
            assert 1800 <= ccsync.next_delay(interval, failures, lambda: 0.0) <= 3600
            assert ccsync.next_delay(interval, failures, lambda: 1.0) <= 3600


def test_loop_survives_a_very_long_outage(tmp_path, home):
    # The same long outage seen from the loop: after the failed attempt the
    # loop must schedule the next one, not die on its own arithmetic.
    db = tmp_path / "a.db"
    make_cc_db(db).close()
    auto = ccsync.AutoSync(db_path=str(db), server="http://127.0.0.1:9", api_key="k",
                           interval=300, environ={}, rand=lambda: 0.0)
    auto.failures = 1100
    assert auto.start()
    try:
        assert wait_for(lambda: auto.failures > 1100)
        time.sleep(0.3)
        assert auto.running, "the loop thread died after a failed attempt"
    finally:
        auto.stop(5)


##### 2. the loop syncs edits made while it runs ###############################

@needs_crypto
def test_loop_syncs_edits_made_while_it_runs(net):
    auto = net.auto()
    assert auto.start() is True
    assert auto.running
    assert wait_for(lambda: auto.last_result is not None), auto.last_error
    # cc edits its database with its own connection while the loop runs
    net.cc_a.execute("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    assert wait_for(lambda: net.b_sees(
        "SELECT 1 FROM project WHERE name = 'acme' AND main_branch = 'master'")), auto.last_error
    # and a later edit too
    net.cc_a.execute("UPDATE project SET main_branch = '17.0' WHERE name = 'acme'")
    assert wait_for(lambda: net.b_sees(
        "SELECT 1 FROM project WHERE name = 'acme' AND main_branch = '17.0'")), auto.last_error
    assert auto.last_result is not None
    assert auto.last_error is None
    assert auto.failures == 0
    assert auto.last_sync_at is not None
    assert auto.stop() is True
    assert not auto.running


##### 3. server down and back ##################################################

@needs_crypto
def test_loop_rides_out_a_server_outage_and_recovers(net):
    auto = net.auto(rand=lambda: 0.0)
    assert auto.start()
    assert wait_for(lambda: auto.last_result is not None), auto.last_error
    port = net.srv.server_address[1]
    net.srv.stop()
    net.cc_a.execute("INSERT INTO project (name) VALUES ('during-outage')")
    # (a sync in flight when the server went away may first fail as "cut";
    # the attempts after it find nobody listening)
    assert wait_for(lambda: auto.failures >= 1 and "unreachable" in (auto.last_error or "")), \
        (auto.failures, auto.last_error)
    assert auto.running                                  # the loop survives the failure
    # the server comes back on the same port and data file
    net.srv = ccsync.SyncServer(("127.0.0.1", port), net.data).start()
    assert wait_for(lambda: auto.failures == 0 and auto.last_error is None, timeout=15), \
        (auto.failures, auto.last_error)
    assert auto.running
    assert wait_for(lambda: net.b_sees("SELECT 1 FROM project WHERE name = 'during-outage'"))


##### 4. stop() during a sync ##################################################

@needs_crypto
def test_stop_during_a_long_sync_is_prompt_and_leaves_the_db_consistent(net):
    cc = net.cc_a
    cc.execute("INSERT INTO repository (name, path, origin_url) "
               "VALUES ('addons', '/src/addons', 'https://example.com/addons.git')")
    cc.execute("BEGIN")
    cc.executemany("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind) "
                   "VALUES (1, ?, 'function')", [(f"sym_{i}",) for i in range(10_000)])
    cc.execute("COMMIT")
    auto = net.auto()
    assert auto.start()
    # wait until the push is under way: the server has some, not all, of the rows
    assert wait_for(lambda: server_rows(net.data, "knowledge_index") > 0, timeout=30)
    t0 = time.monotonic()
    stopped = auto.stop()
    took = time.monotonic() - t0
    assert took < 1.5, took
    assert wait_for(lambda: not auto.running, timeout=5)
    assert server_rows(net.data, "knowledge_index") < 10_000     # it really was cut short
    assert stopped is True          # a sync in flight ends at its next batch boundary
    # the lock was released, and a plain sync finishes the job from where it stopped
    lock = lock_for(net.db_a)
    assert lock.acquire(0)
    lock.release()
    store = ccsync.open_store(net.db_a)
    try:
        ccsync.sync_once(store, ccsync.Client(net.url, net.key_a))
        assert not any(sum(c.values()) for c in store.pending().values()), store.pending()
    finally:
        store.conn.close()
    net.sync_b()
    assert net.cc_b.execute("SELECT count(*) FROM knowledge_index").fetchone()[0] == 10_000
    assert net.cc_b.execute(
        "SELECT count(DISTINCT symbol) FROM knowledge_index").fetchone()[0] == 10_000
    assert server_rows(net.data, "knowledge_index") == 10_000        # nothing duplicated
    assert content(net.cc_a) == content(net.cc_b)


##### 5. one sync at a time per database #######################################

@needs_crypto
def test_two_loops_on_one_database_never_interleave(net, monkeypatch):
    calls: list[tuple[float, float]] = []
    guard = threading.Lock()
    real = ccsync.sync_once

    def recording(*args, **kw):
        enter = time.monotonic()
        try:
            time.sleep(0.1)
            return real(*args, **kw)
        finally:
            with guard:
                calls.append((enter, time.monotonic()))

    monkeypatch.setattr(ccsync, "sync_once", recording)
    one, two = net.auto(interval=0.05), net.auto(interval=0.05)
    assert one.start() and two.start()
    time.sleep(2.0)
    assert one.stop(5) and two.stop(5)
    assert len(calls) >= 4, calls
    spans = sorted(calls)
    for (_s1, e1), (s2, _e2) in zip(spans, spans[1:]):
        assert s2 >= e1, f"two syncs overlapped: {spans}"
    assert one.failures == 0 and two.failures == 0, (one.last_error, two.last_error)


@needs_crypto
def test_sync_now_skips_while_another_sync_holds_the_lock(net):
    auto = net.auto()
    lock = lock_for(net.db_a)
    assert lock.acquire()
    try:
        assert auto.sync_now() is None
        assert auto.failures == 0                 # skipped, not a failure
        assert auto.last_error is None
        store = ccsync.open_store(net.db_a)
        try:
            t0 = time.monotonic()
            with pytest.raises(ccsync.SyncBusy):
                ccsync.run_sync(store, ccsync.Client(net.url, net.key_a), lock_timeout=0.2)
            assert time.monotonic() - t0 < 5
        finally:
            store.conn.close()
    finally:
        lock.release()
    assert auto.sync_now() is not None            # free again
    assert auto.failures == 0


##### 6. unconfigured ##########################################################

def test_start_unconfigured_is_a_quiet_no_op(tmp_path, home):
    db = tmp_path / "a.db"
    make_cc_db(db).close()
    before = {t.name for t in threading.enumerate()}
    auto = ccsync.AutoSync(db_path=str(db), environ={})
    assert auto.configured is False
    assert auto.start() is False
    assert auto.running is False
    assert "ccsync-autosync" not in {t.name for t in threading.enumerate()} - before
    assert auto.sync_now() is None
    assert auto.last_error and "not configured" in auto.last_error
    assert auto.stop() is True                    # stopping a never-started loop is fine
    # and with no arguments at all (defaults from an empty environment and HOME)
    bare = ccsync.AutoSync(environ={})
    assert bare.start() is False
    assert bare.sync_now() is None
    assert bare.last_error


##### 7. never raises into the host ############################################

def test_sync_now_never_raises(tmp_path, home):
    missing = tmp_path / "nope" / "missing.db"
    auto = ccsync.AutoSync(db_path=str(missing), server="http://127.0.0.1:9",
                           api_key="k", environ={})
    assert auto.sync_now() is None
    assert auto.last_error and "missing.db" in auto.last_error
    assert auto.failures == 1
    assert not missing.exists()                   # nothing created

    db = tmp_path / "a.db"
    make_cc_db(db).close()
    bad = ccsync.AutoSync(db_path=str(db), server="ftp://x", api_key="k", environ={})
    assert bad.configured                         # a URL and a key are known ...
    assert bad.sync_now() is None                 # ... but the URL is unusable
    assert bad.last_error and "ftp://x" in bad.last_error
    assert bad.failures == 1


@needs_crypto
def test_loop_with_a_bad_url_keeps_running(tmp_path, home):
    db = tmp_path / "a.db"
    make_cc_db(db).close()
    auto = ccsync.AutoSync(db_path=str(db), server="ftp://x", api_key="k", interval=0.05,
                           environ={}, rand=lambda: 0.0)
    assert auto.start()
    try:
        assert wait_for(lambda: auto.failures >= 2)
        assert auto.running
    finally:
        assert auto.stop(5)


##### 8. logging ###############################################################

@needs_crypto
def test_errors_go_to_the_ccsync_logger(net, caplog):
    net.srv.stop()
    auto = net.auto()
    with caplog.at_level(logging.INFO, logger="ccsync"):
        assert auto.sync_now() is None
    records = [r for r in caplog.records if r.name == "ccsync" and r.levelno >= logging.WARNING]
    assert records, caplog.text
    assert any("unreachable" in r.getMessage() for r in records), caplog.text
    net.srv = ccsync.SyncServer(("127.0.0.1", 0), net.data).start()   # for teardown


def test_importing_ccsync_configures_no_logging_handlers():
    out = subprocess.run(
        [sys.executable, "-c",
         "import ccsync, logging; print(logging.getLogger('ccsync').handlers); "
         "print(logging.getLogger().handlers)"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]"]


##### 9. the daemon command ####################################################

@needs_crypto
def test_daemon_syncs_and_stops_cleanly_on_sigterm(net):
    home = net.tmp / "daemon-home"
    write_env(home, net.url, net.key_a)
    net.cc_a.execute("INSERT INTO project (name) VALUES ('from-daemon')")
    proc = subprocess.Popen(
        [sys.executable, "ccsync.py", "daemon", "--interval", "10", "--db", net.db_a],
        cwd=REPO, env=clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert wait_for(lambda: net.b_sees("SELECT 1 FROM project WHERE name = 'from-daemon'"),
                        timeout=20) or proc.poll() is not None
        assert proc.poll() is None, proc.communicate(timeout=5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "stopped" in err, err
    assert "Traceback" not in err, err


def test_daemon_unconfigured_exits_1_with_one_error_line(tmp_path, home):
    db = tmp_path / "a.db"
    make_cc_db(db).close()
    out = subprocess.run(
        [sys.executable, "ccsync.py", "daemon", "--interval", "10", "--db", str(db)],
        cwd=REPO, env=clean_env(home), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("ccsync: error:")]
    assert len(errors) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


##### 10. sync --quiet #########################################################

@needs_crypto
def test_sync_quiet_prints_nothing_on_success(net):
    home = net.tmp / "cli-home"
    write_env(home, net.url, net.key_a)
    net.cc_a.execute("INSERT INTO project (name) VALUES ('quiet')")
    out = subprocess.run([sys.executable, "ccsync.py", "sync", "--quiet", "--db", net.db_a],
                         cwd=REPO, env=clean_env(home), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert net.b_sees("SELECT 1 FROM project WHERE name = 'quiet'")


##### 11. embedding from the zipapp ############################################

def test_autosync_importable_from_the_pyz(tmp_path):
    pyz = tmp_path / "ccsync.pyz"
    built = subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "--output", str(pyz)],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    home = tmp_path / "empty-home"
    home.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ccsync; "
            "assert ccsync.__file__.startswith(sys.argv[1]), ccsync.__file__; "
            "a = ccsync.AutoSync(environ={}); print(a.start())")
    out = subprocess.run([sys.executable, "-c", code, str(pyz)], cwd=tmp_path,
                         env=clean_env(home), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


##### environ={} means an empty environment ####################################

@needs_crypto
def test_explicit_environ_is_the_whole_environment(net, monkeypatch):
    # The host passes environ={} so that nothing from its own process
    # environment applies; CCSYNC_LOCAL_SETTINGS there must not either.
    monkeypatch.setenv("CCSYNC_LOCAL_SETTINGS", "theme")
    net.cc_a.execute("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    auto = net.auto(environ={})
    assert auto.sync_now() is not None, auto.last_error
    assert net.b_sees("SELECT 1 FROM setting WHERE name = 'theme' AND value = 'dark'")


@needs_crypto
def test_local_settings_from_explicit_environ_stay_local(net):
    net.cc_a.execute("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    net.cc_a.execute("INSERT INTO project (name) VALUES ('marker')")
    auto = net.auto(environ={"CCSYNC_LOCAL_SETTINGS": "theme"})
    assert auto.sync_now() is not None, auto.last_error
    assert net.b_sees("SELECT 1 FROM project WHERE name = 'marker'")
    assert not net.b_sees("SELECT 1 FROM setting WHERE name = 'theme'")


##### 11. end to end ###########################################################

@needs_crypto
def test_auto_sync_runs_end_to_end_with_the_key_setup_stored(net):
    # cc's daemon reads the same .env as the CLI: CCSYNC_E2E_KEY makes its syncs end to end.
    vault = ccsync.Vault.derive("daemon passphrase", b"daemon-salt-0123", n=2 ** 10)
    net.cc_a.execute("INSERT INTO project (name) VALUES ('sealed-by-the-daemon')")
    auto = net.auto(environ={"CCSYNC_E2E_KEY": vault.text()})
    result = auto.sync_now()
    assert result is not None and result.accepted == 1, auto.last_error
    with sqlite3.connect(net.data) as conn:
        assert conn.execute("SELECT count(*) FROM change WHERE payload = '' "
                            "AND batch IS NOT NULL").fetchone()[0] == 1
        assert b"sealed-by-the-daemon" not in Path(net.data).read_bytes()
    store_b = ccsync.open_store(net.db_b)
    try:
        ccsync.sync_once(store_b, ccsync.Client(net.url, net.key_b, vault=vault))
    finally:
        store_b.conn.close()
    assert net.cc_b.execute("SELECT name FROM project").fetchall() == [("sealed-by-the-daemon",)]
