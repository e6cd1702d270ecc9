"""R15 (pre-existing, not new in this change, but in the brief's scope): a
hostile server keeps a device in one sync forever.  A pull answer with a new
store id each time makes pull_changes re-seed and start again, up to
max_pages = 10**6 times in one sync_once (each a full upload); "stale" on
every page does the same with full re-pulls.  Bounded here by a stop Event
after 3 s; the sync would otherwise run on.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r15_hostile_server_loops.py
"""

from __future__ import annotations

import threading
import uuid


import ccsync
from conftest import key_author, make_cc_db


class NewStoreEveryTime(ccsync.ServerStore):
    reseeds = 0
    hostile = False

    def pull_raw(self, *a, **kw):
        page = super().pull_raw(*a, **kw)
        return {**page, "store": uuid.uuid4().hex} if self.hostile else page

    def push(self, records, **kw):
        NewStoreEveryTime.reseeds += 1
        return super().push(records, **kw)


def test_one_sync_ends(tmp_path):
    vault = ccsync.Vault.derive("review passphrase", b"0123456789abcdef", n=2 ** 10)
    server = NewStoreEveryTime.open(str(tmp_path / "server.db"))
    cc = make_cc_db(tmp_path / "lap.db")
    store = ccsync.open_store(str(tmp_path / "lap.db"))
    transport = ccsync.LocalTransport(server, "lap", author=key_author(server.register("lap")),
                                      vault=vault)
    cc.execute("INSERT INTO project (name) VALUES ('p')")
    ccsync.sync_once(store, transport)
    stop = threading.Event()
    timer = threading.Timer(3.0, stop.set)
    timer.start()
    NewStoreEveryTime.reseeds = 0
    server.hostile = True
    outcome = "ran until stopped"
    try:
        ccsync.sync_once(store, transport, stop=stop)
    except ccsync.CcsyncError as exc:
        outcome = str(exc)
    timer.cancel()
    assert NewStoreEveryTime.reseeds < 10, (NewStoreEveryTime.reseeds, outcome)
