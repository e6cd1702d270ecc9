"""R1: a device with a sync passphrase sends its whole synced state in
PLAINTEXT to a server whose store is new and plaintext (lost data file,
or an operator who simply moves the file away).

encrypt_server() pulls inside _in_plaintext(); the pull sees a store id it
does not know, so pull_changes() calls reseed_server() with the vault
switched off: every row goes out unsealed.  A hostile server then only has
to refuse begin_e2e (answer "behind") to keep the plaintext on disk.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r1_plaintext_downgrade.py
"""

from __future__ import annotations



import pytest

import ccsync
from conftest import key_author, make_cc_db

SECRET = "github.com/acme/SECRET-REPO-r1"


@pytest.fixture
def vault():
    return ccsync.Vault.derive("review passphrase", b"0123456789abcdef", n=2 ** 10)


class Recording(ccsync.ServerStore):
    """An honest server store that remembers every push that came unsealed."""

    plaintext_pushes: list

    def push(self, records, **kw):
        if kw.get("sealed") is None and records:
            self.plaintext_pushes.append(records)
        return super().push(records, **kw)


class Hostile(Recording):
    """A server that never lets a store become end to end."""

    def begin_e2e(self, params, cursor, **_options):
        return {"behind": self._max_seq() + 1, "store": self.store_id}


def _dev(tmp_path, server, name, vault, key=None):
    cc = make_cc_db(tmp_path / f"{name}.db") if not (tmp_path / f"{name}.db").exists() else None
    store = ccsync.open_store(str(tmp_path / f"{name}.db"))
    key = key or server.register(name)
    return cc, store, key


@pytest.mark.parametrize("kind", [Recording, Hostile])
def test_a_new_plaintext_store_gets_everything_in_plaintext(tmp_path, vault, kind):
    old = ccsync.ServerStore.open(str(tmp_path / "old.db"))
    cc, store, key = _dev(tmp_path, old, "lap", vault)
    cc.execute("INSERT INTO repository (name, origin_url, path) VALUES ('r', ?, '/src/r')",
               (SECRET,))
    ccsync.sync_once(store, ccsync.LocalTransport(old, "lap", author=key_author(key),
                                                  vault=vault))
    assert old.e2e_params() is not None               # the old store was end to end

    # The server's data file is lost (or moved away by its operator): a new
    # store, plaintext.  The same device key is registered there again.
    new = kind.open(str(tmp_path / "new.db"))
    new.plaintext_pushes = []
    for row in old.conn.execute("SELECT * FROM device"):
        new.conn.execute(f"INSERT INTO device VALUES ({','.join('?' * len(row))})", tuple(row))
    transport = ccsync.LocalTransport(new, "lap", author=key_author(key), vault=vault)
    try:
        ccsync.sync_once(store, transport)
    except ccsync.CcsyncError:
        pass                                           # the hostile server makes it fail
    sent = repr(new.plaintext_pushes)
    assert SECRET not in sent, "the device sent its data to the server unencrypted"


def test_hostile_server_keeps_the_plaintext_on_disk(tmp_path, vault):
    old = ccsync.ServerStore.open(str(tmp_path / "old.db"))
    cc, store, key = _dev(tmp_path, old, "lap", vault)
    cc.execute("INSERT INTO repository (name, origin_url, path) VALUES ('r', ?, '/src/r')",
               (SECRET,))
    ccsync.sync_once(store, ccsync.LocalTransport(old, "lap", author=key_author(key),
                                                  vault=vault))
    new = Hostile.open(str(tmp_path / "new.db"))
    new.plaintext_pushes = []
    for row in old.conn.execute("SELECT * FROM device"):
        new.conn.execute(f"INSERT INTO device VALUES ({','.join('?' * len(row))})", tuple(row))
    transport = ccsync.LocalTransport(new, "lap", author=key_author(key), vault=vault)
    with pytest.raises(ccsync.CcsyncError):
        ccsync.sync_once(store, transport)
    new.conn.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("new.db*"))
    assert SECRET.encode() not in raw, "the value sits in plaintext in the server's file"
