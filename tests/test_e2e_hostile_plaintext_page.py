"""R2: a hostile server makes an end-to-end device take records it made up.

opened_page() returns a page untouched when it has no ``refs``: a server
that answers a device's end-to-end pull with plain ``records`` (as a
plaintext store would) gets them merged, although they come from no batch
under the user's key.  The README says the server can only "forge batches
no device opens".  Here the server plants a repository whose origin URL is
the attacker's, and renames a project, over the real HTTP transport.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r2_hostile_server_injects_plaintext.py
"""

from __future__ import annotations

import json
from pathlib import Path


import pytest

import ccsync
from conftest import key_author, make_cc_db

EVIL = "https://evil.example/attacker/payload.git"


def _forged_records(tmp_path: Path) -> list[dict]:
    """Plaintext records as any plaintext store hands out (made with a scratch device)."""
    scratch = ccsync.ServerStore.open(str(tmp_path / "scratch.db"))
    cc = make_cc_db(tmp_path / "scratch_dev.db")
    cc.execute("INSERT INTO repository (name, origin_url, path) VALUES ('planted', ?, '/x')",
               (EVIL,))
    store = ccsync.open_store(str(tmp_path / "scratch_dev.db"))
    ccsync.sync_once(store, ccsync.LocalTransport(scratch, "scratch"))
    records = scratch.pull(0)["records"]
    store.conn.close(), cc.close(), scratch.conn.close()
    return records


def test_a_page_without_refs_is_merged_by_an_e2e_device(tmp_path, monkeypatch):
    forged = _forged_records(tmp_path)
    vault = ccsync.Vault.derive("review passphrase", b"0123456789abcdef", n=2 ** 10)
    data = tmp_path / "server.db"
    srv = ccsync.SyncServer(("127.0.0.1", 0), str(data)).start()
    try:
        key = ccsync.ServerStore.open(str(data)).register("lap")
        cc = make_cc_db(tmp_path / "lap.db")
        store = ccsync.open_store(str(tmp_path / "lap.db"))
        cc.execute("INSERT INTO project (name) VALUES ('real')")
        client = ccsync.Client(srv.url, key, vault=vault)
        ccsync.sync_once(store, client)                  # the store becomes end to end
        assert ccsync.ServerStore.open(str(data)).e2e_params() is not None

        # The server turns hostile: an end-to-end pull is answered in plaintext.
        honest = ccsync.ServerStore.pull_raw

        def hostile(self, cursor=0, limit=2000, since=None, max_bytes=0, check=None, skip=(),
                    began=None):
            page = honest(self, cursor, limit, since, max_bytes, check, skip, began)
            if check is None or page.get("e2e"):
                return page
            page.pop("refs", None), page.pop("blobs", None)
            return {**page, "records": ccsync.RawJSON(json.dumps(forged)),
                    "cursor": page["cursor"] + 1}

        monkeypatch.setattr(ccsync.ServerStore, "pull_raw", hostile)
        with pytest.raises(ccsync.RemoteError, match="records in plaintext"):
            ccsync.sync_once(store, ccsync.Client(srv.url, key, vault=vault))
        urls = [u for (u,) in cc.execute("SELECT origin_url FROM repository")]
        assert EVIL not in urls, "an end-to-end device merged records the server made up"
    finally:
        srv.stop()
