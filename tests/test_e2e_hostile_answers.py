"""R4: a hostile (or broken) server's answer crashes `ccsync sync` with a
Python traceback instead of one `ccsync: error:` line.

(a) ``refs`` that is not a list (a number, null): opened_page() iterates
    it -> TypeError.
(b) a store that still says ``{"plaintext": true}`` after encrypt_server()
    made it end to end: the second PlaintextStore (a bare Exception, not a
    CcsyncError) escapes sync_once().

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r4_hostile_answers_traceback.py
"""

from __future__ import annotations

import pytest

import ccsync
from e2e_hostile import hostile_world

HONEST_PULL = ccsync.ServerStore.pull_raw
HONEST_PUSH = ccsync.ServerStore.push


@pytest.mark.parametrize("refs", [5, None, 7.5])
def test_refs_not_a_list(tmp_path, monkeypatch, refs):
    with hostile_world(tmp_path) as (srv, dev):
        def pull_raw(self, cursor=0, limit=2000, since=None, max_bytes=0, check=None, *rest):
            page = HONEST_PULL(self, cursor, limit, since, max_bytes, check, *rest)
            if check is not None and "refs" in page:
                page["refs"] = refs
            return page

        monkeypatch.setattr(ccsync.ServerStore, "pull_raw", pull_raw)
        proc = dev.cli("sync")
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("ccsync: error:"), proc.stderr
        assert "answered 500" not in proc.stderr, proc.stderr     # the hostile answer, met


def test_a_store_that_stays_plaintext(tmp_path, monkeypatch):
    with hostile_world(tmp_path) as (srv, dev):
        def pull_raw(self, cursor=0, limit=2000, since=None, max_bytes=0, check=None,
                     skip=(), began=None):
            if check is not None:
                return {"plaintext": True, "records": ccsync.RawJSON("[]"), "cursor": cursor,
                        "more": False, "store": self.store_id}
            with ccsync.snapshot(self.conn):               # a plaintext page, as before
                return self._page(cursor, limit, since, max_bytes, list(skip), began)

        monkeypatch.setattr(ccsync.ServerStore, "pull_raw", pull_raw)
        proc = dev.cli("sync")
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("ccsync: error:"), proc.stderr
        assert "answered 500" not in proc.stderr, proc.stderr     # the hostile answer, met
