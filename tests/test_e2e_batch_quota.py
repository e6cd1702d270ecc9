"""R14: a stored batch is counted only by the shares of the records the
store keeps, but it is stored (and sent to every device) whole.

_StoredBatch.share = len(blob) // len(records) over ALL records of the
push, refused and superseded ones included; the blob goes in with the first
record kept.  So a push whose records are mostly refused or superseded
stores the whole blob for a fraction of its size in the quota.  An honest
case: after a migration every device re-seeds all it holds; the rows of
other current devices are refused (R11) and the rest superseded, so each
device's 1-own-edit re-seed stores a full copy of the data, charged 1/N.
A new device then downloads every such copy.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r14_batch_bytes_not_counted.py
"""

from __future__ import annotations

import secrets

import ccsync
from conftest import key_author, make_cc_db


def test_stored_batch_bytes_match_what_usage_counts(tmp_path):
    vault = ccsync.Vault.derive("review passphrase", b"0123456789abcdef", n=2 ** 10)
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    devs = {}
    for name in ("lap", "desk"):
        cc = make_cc_db(tmp_path / f"{name}.db")
        store = ccsync.open_store(str(tmp_path / f"{name}.db"))
        devs[name] = (cc, store, ccsync.LocalTransport(
            server, name, author=key_author(server.register(name)), vault=vault))
    lap, desk = devs["lap"], devs["desk"]
    lap[0].executemany("INSERT INTO switch_log (switched_at, note) VALUES (?, ?)",
                       [(f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}", secrets.token_hex(200))
                        for i in range(1000)])
    ccsync.sync_once(*lap[1:])
    ccsync.sync_once(*desk[1:])
    desk[0].execute("INSERT INTO project (name) VALUES ('desk-own')")
    ccsync.sync_once(*desk[1:])

    # The server's data is rebuilt (or the store re-keyed): both re-seed.
    server.begin_e2e(vault.params(private=True), 0, replace=True)
    ccsync.sync_once(*lap[1:])
    ccsync.sync_once(*desk[1:])
    held = server.conn.execute(
        "SELECT coalesce(sum(length(b.data)), 0) FROM batch b WHERE b.id IN "
        "(SELECT batch FROM change WHERE device = 'desk')").fetchone()[0]
    counted = server.usage("desk")["stored"]
    # desk's re-seed batch (1001 records: 1 its own, 1000 lap's refused) is
    # stored whole, ~274 kB, and sent to every device; desk is charged ~500 bytes.
    assert held <= 2 * counted[1], f"desk's batches hold {held} bytes; its usage: {counted}"
