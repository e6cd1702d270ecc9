"""R10: the migration empties the store on the word of a device that has
"merged all of it" by cursor, but a device with an older cc keeps the
records of a table it lacks aside (_ccsync_held) and does not re-seed them
(reseed_records reads the shadow only).  Once the store is emptied those
records exist nowhere the others can get them: a device set up later never
receives them, and the migrating device, once its cc has the table, merges
them from _ccsync_held locally and never sends them either.

Here 'old' (plaintext days, full schema) wrote knowledge_index rows and is
then retired (revoked, so a re-seed of its rows is taken); 'lap' (cc without knowledge_index) migrates; 'pi' joins.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r10_migration_drops_records_kept_aside.py
"""

from __future__ import annotations



import ccsync
from conftest import key_author, make_cc_db


def test_records_only_kept_aside_survive_the_migration(tmp_path):
    vault = ccsync.Vault.derive("review passphrase", b"0123456789abcdef", n=2 ** 10)
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))

    def device(name, vault=None, older=None):
        cc = make_cc_db(tmp_path / f"{name}.db")
        if older:
            cc.executescript(older)
        store = ccsync.open_store(str(tmp_path / f"{name}.db"))
        transport = ccsync.LocalTransport(server, name, author=key_author(server.register(name)),
                                          vault=vault)
        return cc, store, transport

    old = device("old")                                  # plaintext, then retired
    old[0].execute("INSERT INTO repository (name, path) VALUES ('r', '/src/r')")
    old[0].execute("INSERT INTO knowledge_index (repository_id, symbol) VALUES (1, 'ledger')")
    ccsync.sync_once(old[1], old[2])
    server.revoke("old")                                 # retired the proper way

    lap = device("lap", vault, older="DROP TABLE knowledge_index;")
    result = ccsync.sync_once(lap[1], lap[2])            # pulls (keeps aside), then migrates
    assert server.e2e_params() is not None
    assert lap[1].conn.execute("SELECT count(*) FROM _ccsync_held").fetchone()[0] == 1

    pi = device("pi", vault)
    ccsync.sync_once(pi[1], pi[2])
    assert pi[0].execute("SELECT count(*) FROM repository").fetchone()[0] == 1
    got = pi[0].execute("SELECT symbol FROM knowledge_index").fetchall()
    assert got == [("ledger",)], "the migration lost a record only a held copy had"
