"""References that a delete empties while an edit naming the row is not yet sent."""

from __future__ import annotations

import pytest

import ccsync
from test_identity import assert_same, converge, natural


def staging_version(snap: dict) -> str | None:
    return next(r["version_id"] for r in snap["environment"].values() if r["name"] == "staging")


@pytest.mark.parametrize("deleter", ["b", "a"])
def test_an_unsent_reference_re_links_when_a_later_edit_brings_its_row_back(devices, deleter):
    """a creates an environment on 17.0 and has not pushed it when 17.0's delete
    settles here (pulled from b, or a's own); c's later edit keeps 17.0 alive.
    The environment must end on 17.0 everywhere, not NULL (a punch-out in cc)."""
    a, b, c = devices("a", "b", "c")
    a.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/odoo/17.0', '8069')")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    converge(a, b, c)
    a.sql("INSERT INTO environment (name, project_id, version_id) VALUES ('staging', 1, 1)")
    if deleter == "b":
        b.sql("DELETE FROM version WHERE name = '17.0'")
        b.sync()
        a.pull()                                      # the delete arrives; the env is unsent
    else:
        a.store.prepare()                             # the environment is stamped, not sent
        a.sql("DELETE FROM version WHERE name = '17.0'")  # cc's delete leaves version_id
        a.push()                                      # the delete settles first
    assert a.sql("SELECT version_id FROM environment WHERE name = 'staging'") == [(None,)]
    c.sql("UPDATE version SET branch = 'y' WHERE name = '17.0'")   # later: 17.0 stays
    converge(c, a, b, c)
    snap = assert_same(a, b, c)
    assert staging_version(snap) == natural("version", "17.0")
    assert a.store.conn.execute("SELECT count(*) FROM _ccsync_named").fetchone()[0] == 0


def test_an_unsent_reference_to_a_row_deleted_for_good_reads_null_everywhere(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/odoo/17.0', '8069')")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    converge(a, b)
    a.sql("INSERT INTO environment (name, project_id, version_id) VALUES ('staging', 1, 1)")
    b.sql("DELETE FROM version WHERE name = '17.0'")
    b.sync()
    a.pull()
    converge(a, b)
    snap = assert_same(a, b)
    assert snap["version"] == {} and staging_version(snap) is None
    # The edit named 17.0 on the wire; 17.0 coming back later re-links it.
    b.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/odoo/17.0', '8069')")
    converge(b, a)
    assert staging_version(assert_same(a, b)) == ccsync.natural_id("version", ["17.0"])


def test_an_edit_sent_with_the_delete_made_here_decides_a_row_a_child_keeps(devices):
    """b edits an environment and deletes it before syncing; a meanwhile records time
    on it, so it stays everywhere.  b's edit is the latest of its column: it must win."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    a.sql("INSERT INTO environment (name, project_id, branch_name) VALUES ('main', 1, 'x')")
    converge(a, b)
    a.sql("INSERT INTO switch_log (environment_id, switched_at) VALUES (1, '2024-05-01T09:00')")
    b.sql("UPDATE environment SET branch_name = 'z'")
    b.sql("DELETE FROM environment WHERE name = 'main'")
    converge(b, a, b)
    snap = assert_same(a, b)
    assert [r["branch_name"] for r in snap["environment"].values()] == ["z"]
