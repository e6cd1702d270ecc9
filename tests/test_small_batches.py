"""Three devices on the real server with tiny batches and pages that mix deletes,
edits and kept edits across tables (and a small --max-body forcing batches to
halve): every device ends identical with nothing pending."""
from __future__ import annotations

import os
import random

import pytest

import ccsync
from conftest import content, make_cc_db
from test_transport import start_server, register, RAW_TIMEOUT  # noqa: F401


class Dev:
    def __init__(self, path, url, key):
        self.cc = make_cc_db(path)
        self.store = ccsync.open_store(str(path))
        self.client = ccsync.Client(url, key, timeout=RAW_TIMEOUT)

    def sql(self, q, *a):
        return self.cc.execute(q, a).fetchall()

    def sync(self, **kw):
        kw.setdefault("batch_size", getattr(self, "batch", 2))
        kw.setdefault("page_size", 2)
        r = ccsync.sync_once(self.store, self.client, **kw)
        assert not r.refused, r.as_dict()
        assert not r.pulled.refused, r.as_dict()
        return r

    def close(self):
        self.store.conn.close()
        self.cc.close()


def fill(d, tag):
    for i in range(5):
        d.sql("INSERT INTO version (name, path, port) VALUES (?, ?, ?)", f"{i}.0", f"/{tag}/{i}", "80")
        d.sql("INSERT INTO setting (name, value) VALUES (?, ?)", f"ui.opt{i}", tag)
        d.sql("INSERT INTO database (name) VALUES (?)", f"db{i}")
        d.sql("INSERT INTO project (name, main_branch) VALUES (?, 'main')", f"p{i}")
    for i in range(1, 5):
        d.sql("UPDATE database SET clone_db_id = (SELECT id FROM database WHERE name = ?) "
              "WHERE name = ?", f"db{i-1}", f"db{i}")
    for i in range(5):
        d.sql("INSERT INTO environment (name, project_id, version_id, database_id, project_path) "
              "SELECT 'e' || ?, p.id, v.id, db.id, '/x' FROM project p, version v, database db "
              "WHERE p.name = ? AND v.name = ? AND db.name = ?", i, f"p{i}", f"{i}.0", f"db{i}")
        d.sql("INSERT INTO switch_log (environment_id, switched_at) SELECT id, ? FROM environment "
              "WHERE name = ?", f"2024-01-0{i+1} 10:00", f"e{i}")


def check(devs):
    snaps = [content(d.cc) for d in devs]
    for s in snaps[1:]:
        assert s == snaps[0]
    for d in devs:
        pend = {t: c for t, c in d.store.pending().items() if any(c.values())}
        assert pend == {}, pend
    return snaps[0]


# Two seeds in the suite's budget; CCSYNC_SMALL_BATCH_SEEDS=50 for a longer run.
SEEDS = int(os.environ.get("CCSYNC_SMALL_BATCH_SEEDS", "2"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_three_devices_mixed_parts_small_batches(tmp_path, start_server, seed):
    srv = start_server(max_body=1200 if seed % 2 else ccsync.DEFAULT_MAX_BODY)
    devs = [Dev(tmp_path / f"{n}.db", srv.url, register(srv, n)) for n in "abc"]
    if seed % 2:                        # big batches that the server refuses: halving
        for d in devs:
            d.batch = 16
    a, b, c = devs
    try:
        fill(a, "a")
        a.sync(batch_size=3)
        for d in devs:
            d.sync()
        rnd = random.Random(seed)
        for _round in range(4):
            # a edits (unsent), b deletes some of those rows and syncs, a pulls only
            # (a's edits of rows b deleted go to the outbox: part 2).
            for t, col in (("version", "port"), ("setting", "value"), ("database", "last_update"),
                           ("project", "main_branch"), ("environment", "branch_name"),
                           ("switch_log", "note")):
                ids = [r[0] for r in a.sql(f"SELECT id FROM {t}")]
                for rid in rnd.sample(ids, min(2, len(ids))):
                    a.sql(f"UPDATE {t} SET {col} = ? WHERE id = ?", f"a{_round}-{rid}", rid)
            for t in ("switch_log", "setting", "database"):
                ids = [r[0] for r in b.sql(f"SELECT id FROM {t}")]
                for rid in rnd.sample(ids, min(2, len(ids))):
                    b.sql(f"DELETE FROM {t} WHERE id = ?", rid)
            b.sync()
            a.sync(push=False)
            # c creates and deletes across tables
            c.sql("INSERT OR IGNORE INTO version (name, path) VALUES (?, '/c')", f"c{_round}.0")
            c.sql("INSERT OR IGNORE INTO setting (name, value) VALUES (?, 'c')", f"ui.c{_round}")
            c.sql("INSERT OR IGNORE INTO database (name, clone_db_id) SELECT ?, min(id) FROM database",
                  f"cdb{_round}")
            ids = [r[0] for r in c.sql("SELECT id FROM version")]
            if ids:
                vid = rnd.choice(ids)
                c.sql("UPDATE environment SET version_id = NULL WHERE version_id = ?", vid)
                c.sql("DELETE FROM version WHERE id = ?", vid)
            for d in rnd.sample(devs, 3):
                d.sync()
        for _ in range(2):
            for d in devs:
                d.sync()
        check(devs)
    finally:
        for d in devs:
            d.close()
