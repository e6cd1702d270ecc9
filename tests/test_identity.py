"""Identity from the natural key: renames, swaps and ids stamped by someone else."""

from __future__ import annotations

import ccsync
from conftest import content


def converge(*devs, rounds: int = 2) -> None:
    for _ in range(rounds):
        for dev in devs:
            result = dev.sync()
            assert not result.refused and not result.pulled.refused, result.as_dict()


def natural(table: str, *key) -> str:
    return ccsync.natural_id(table, list(key))


def assert_same(*devs) -> dict:
    snaps = [dev.snapshot() for dev in devs]
    for dev, snap in zip(devs[1:], snaps[1:]):
        assert snap == snaps[0], dev.name
    return snaps[0]


def test_a_rename_moves_the_row_and_its_children_to_their_new_ids(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('main', 1)")
    a.sql("INSERT INTO switch_log (environment_id, switched_at) VALUES (1, '2024-05-01T09:00')")
    converge(a, b)
    b.sql("UPDATE project SET name = 'globex' WHERE name = 'acme'")
    converge(a, b)
    snap = assert_same(a, b)
    globex = natural("project", "globex")
    env = natural("environment", globex, "main")
    assert list(snap["project"]) == [globex]
    assert list(snap["environment"]) == [env]
    assert [r["environment_id"] for r in snap["switch_log"].values()] == [env]
    assert list(snap["switch_log"]) == [natural("switch_log", env, "2024-05-01T09:00")]
    assert snap["project"][globex]["main_branch"] == "master"     # values came along


def test_a_rename_back_restores_the_old_id_and_a_swap_keeps_both_rows(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'a-branch')")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('globex', 'g-branch')")
    converge(a, b)
    for step in ("UPDATE project SET name = 'tmp' WHERE name = 'acme'",
                 "UPDATE project SET name = 'acme' WHERE name = 'globex'",
                 "UPDATE project SET name = 'globex' WHERE name = 'tmp'"):
        b.sql(step)                                   # swapped between two syncs
    converge(a, b)
    snap = assert_same(a, b)
    by_id = {sid: r["main_branch"] for sid, r in snap["project"].items()}
    assert by_id == {natural("project", "acme"): "g-branch",
                     natural("project", "globex"): "a-branch"}


def test_ids_stamped_by_another_tool_move_to_their_keys_id(devices):
    """cc's own sync feature (or an older ccsync) left its ids: one natural key is one
    row everywhere all the same, with no copy left under the old id."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch, sync_id) VALUES ('acme', 'a', 'old-1')")
    a.sql("INSERT INTO environment (name, project_id, sync_id) VALUES ('main', 1, 'old-2')")
    b.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'b')")
    converge(a, b)
    snap = assert_same(a, b)
    acme = natural("project", "acme")
    assert list(snap["project"]) == [acme]
    assert list(snap["environment"]) == [natural("environment", acme, "main")]
    assert content(a.cc)["project"][acme]["main_branch"] in ("a", "b")


def test_bookkeeping_3_moves_its_synced_state_to_a_rowid_table(devices):
    """A database synced by bookkeeping 3 (shadow WITHOUT ROWID) keeps every synced
    row through the move, and syncs on as before."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('main', 1)")
    converge(a, b)
    conn = b.store.conn
    before = conn.execute("SELECT tbl, sid, rid, vals, clocks FROM _ccsync_shadow "
                          "ORDER BY tbl, sid").fetchall()
    with ccsync.transaction(conn):                  # lay it out as bookkeeping 3 did
        conn.execute("ALTER TABLE _ccsync_shadow RENAME TO old_shadow")
        conn.execute("CREATE TABLE _ccsync_shadow (tbl TEXT NOT NULL, sid TEXT NOT NULL, "
                     "rid INTEGER, vals TEXT NOT NULL, clocks TEXT NOT NULL, "
                     "PRIMARY KEY (tbl, sid)) WITHOUT ROWID")
        conn.execute("INSERT INTO _ccsync_shadow SELECT * FROM old_shadow")
        conn.execute("DROP TABLE old_shadow")
        conn.execute("UPDATE _ccsync_meta SET value = '3' WHERE key = 'bookkeeping'")
    a.sql("UPDATE project SET main_branch = 'develop'")
    converge(a, b)
    layout = conn.execute("SELECT sql FROM sqlite_master WHERE name = '_ccsync_shadow'"
                          ).fetchone()[0]
    assert "WITHOUT ROWID" not in layout.upper()
    assert b.store.meta("bookkeeping") == ccsync.BOOKKEEPING_VERSION
    after = {(r[0], r[1]): r for r in conn.execute(
        "SELECT tbl, sid, rid, vals, clocks FROM _ccsync_shadow")}
    assert set(after) == {(r[0], r[1]) for r in before}
    assert content(b.cc)["project"][natural("project", "acme")]["main_branch"] == "develop"
    assert_same(a, b)
