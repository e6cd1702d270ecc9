"""Core sync rules, in-process (no HTTP): capture, merge, identity, safety.

Each test states one rule a cc user relies on.  Devices come from the
``devices`` fixture in conftest.py (cc's real schema, one shared server).
"""

from __future__ import annotations

import copy
import json
import shutil
import sqlite3
import time
import uuid

import pytest

import ccsync
from conftest import SCHEMA

TICK = 0.01   # long enough for the wall clock (ms) to move between two edits


##### helpers ##################################################################

def count(dev, table: str) -> int:
    return dev.sql(f'SELECT count(*) FROM "{table}"')[0][0]


def one(dev, query: str, *args):
    rows = dev.sql(query, *args)
    assert len(rows) == 1, rows
    return rows[0]


def converge(*devs, rounds: int = 2) -> list[ccsync.SyncResult]:
    """Sync every device, round-robin, a few times; returns all results."""
    results = []
    for _ in range(rounds):
        for dev in devs:
            results.append(dev.sync())
    return results


def assert_clean(results) -> None:
    """No record refused by the server nor by a device."""
    for r in results:
        assert not r.refused, r.as_dict()
        assert not r.pulled.refused, r.as_dict()


def add_project(dev, name="acme", **cols) -> int:
    cols = {"main_branch": "master", "home_repo": "git@example.com:acme.git", **cols}
    names = ", ".join(["name", *cols])
    marks = ", ".join("?" * (len(cols) + 1))
    dev.sql(f"INSERT INTO project ({names}) VALUES ({marks})", name, *cols.values())
    return one(dev, "SELECT id FROM project WHERE name = ?", name)[0]


def shared_project(a, b, name="acme") -> None:
    """A project created on a, synced to b."""
    add_project(a, name)
    a.sync()
    b.sync()
    assert count(b, "project") == 1


def project_col(dev, col: str, name="acme"):
    rows = dev.sql(f"SELECT {col} FROM project WHERE name = ?", name)
    return rows[0][0] if rows else None


def dump(conn: sqlite3.Connection) -> dict:
    """Every table of a database, raw (ids included), for before/after comparison."""
    out = {}
    for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall():
        out[name] = sorted(map(tuple, conn.execute(f'SELECT * FROM "{name}"').fetchall()),
                           key=repr)
    return out


def captured(dev, table: str) -> dict:
    """One outgoing record of ``table`` from dev (dev must have a pending row there)."""
    dev.store.prepare()
    records = [r for r in dev.store.capture().records if r and r["t"] == table]
    assert records, f"no pending {table} record on {dev.name}"
    return copy.deepcopy(records[0])


def server_payloads(server) -> str:
    return "\n".join(p for (p,) in server.conn.execute("SELECT payload FROM change"))


##### 1. capture and stamp #####################################################

def test_prepare_stamps_every_row_with_a_uuid_and_returns_the_count(devices):
    a = devices("a")
    add_project(a, "acme")
    add_project(a, "beta")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/src/17')")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('dev', 1)")

    assert a.store.prepare() == 5

    sids = [sid for t in ("project", "version", "setting", "environment")
            for (sid,) in a.sql(f"SELECT sync_id FROM {t}")]
    assert len(sids) == 5 and len(set(sids)) == 5
    for sid in sids:
        uuid.UUID(sid)                      # raises if not a UUID


def test_second_prepare_stamps_nothing(devices):
    a = devices("a")
    add_project(a)
    assert a.store.prepare() == 1
    assert a.store.prepare() == 0


def test_row_inserted_by_cc_after_prepare_is_captured_at_next_sync(devices):
    a, b = devices("a", "b")
    a.store.prepare()
    add_project(a, "late")

    result = a.sync()

    assert result.stamped == 1
    assert result.sent == 1 and result.accepted == 1
    b.sync()
    assert project_col(b, "main_branch", "late") == "master"


def test_table_missing_from_database_is_skipped_silently(devices):
    a, b = devices("a", "b")
    a.sql("DROP TABLE knowledge_index")
    add_project(a)

    assert a.store.prepare() == 1
    assert "knowledge_index" not in a.store.tables()
    result = a.sync()

    assert result.accepted == 1 and not result.refused
    b.sync()
    assert project_col(b, "name") == "acme"


def test_missing_sync_columns_are_added(tmp_path, devices):
    schema = SCHEMA.replace(
        "last_fetched_at TEXT, sync_id TEXT, synced_at TEXT);", "last_fetched_at TEXT);")
    assert schema != SCHEMA
    conn = sqlite3.connect(str(tmp_path / "a.db"), isolation_level=None)
    conn.executescript(schema)
    conn.execute("INSERT INTO version (name, path) VALUES ('17.0', '/src/17')")
    conn.close()
    a, b = devices("a", "b")
    assert "sync_id" not in [r[1] for r in a.sql("PRAGMA table_info(version)")]

    assert a.store.prepare() == 1

    cols = [r[1] for r in a.sql("PRAGMA table_info(version)")]
    assert "sync_id" in cols and "synced_at" in cols
    assert one(a, "SELECT sync_id FROM version")[0] is not None
    a.sync()
    b.sync()
    assert one(b, "SELECT name FROM version")[0] == "17.0"


def test_bookkeeping_objects_are_prefixed_ccsync(devices):
    a = devices("a")
    add_project(a)
    before = {n for (n,) in a.sql("SELECT name FROM sqlite_master")}

    a.store.prepare()

    added = {n for (n,) in a.sql("SELECT name FROM sqlite_master")
             if not n.startswith("sqlite_")} - before      # sqlite_autoindex_* is SQLite's
    assert added, "prepare added nothing"
    assert all(n.startswith("_ccsync_") for n in added), sorted(added)


def test_remove_drops_bookkeeping_but_keeps_sync_columns_and_data(devices):
    a = devices("a")
    add_project(a)
    a.sync()
    sid = one(a, "SELECT sync_id FROM project")[0]

    a.store.remove()

    left = a.sql("SELECT type, name FROM sqlite_master WHERE name LIKE '\\_ccsync\\_%' "
                 "ESCAPE '\\'")
    assert left == []
    assert one(a, "SELECT name, sync_id FROM project") == ("acme", sid)
    assert one(a, "SELECT synced_at FROM project")[0] is not None


def test_cc_can_still_write_after_remove(devices):
    a = devices("a")
    add_project(a)
    a.sync()
    a.store.remove()

    add_project(a, "beta")
    a.sql("UPDATE project SET main_branch = 'develop' WHERE name = 'acme'")
    a.sql("DELETE FROM project WHERE name = 'beta'")

    assert a.sql("SELECT name, main_branch FROM project") == [("acme", "develop")]


##### 2-3. per-column last writer wins #########################################

def test_edits_to_different_columns_of_one_row_are_both_kept(devices):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("UPDATE project SET main_branch = 'develop' WHERE name = 'acme'")
    b.sql("UPDATE project SET home_repo = 'git@example.com:new.git' WHERE name = 'acme'")
    assert_clean(converge(a, b))

    for dev in (a, b):
        assert one(dev, "SELECT main_branch, home_repo FROM project") == (
            "develop", "git@example.com:new.git")


@pytest.mark.parametrize("first", ["earlier_editor", "later_editor"])
def test_later_edit_of_same_column_wins_whoever_syncs_first(devices, first):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("UPDATE project SET main_branch = 'from-a' WHERE name = 'acme'")
    time.sleep(TICK)
    b.sql("UPDATE project SET main_branch = 'from-b' WHERE name = 'acme'")
    order = (a, b) if first == "earlier_editor" else (b, a)
    assert_clean(converge(*order))

    assert project_col(a, "main_branch") == "from-b"
    assert project_col(b, "main_branch") == "from-b"


def test_offline_edit_does_not_overwrite_later_edit(devices):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("UPDATE project SET main_branch = 'offline-a' WHERE name = 'acme'")   # t1, offline
    time.sleep(TICK)
    b.sql("UPDATE project SET main_branch = 'online-b' WHERE name = 'acme'")    # t2 > t1
    b.sync()
    time.sleep(TICK)
    late = a.sync()                       # a comes back online after t2
    b.sync()

    assert late.superseded == 1           # the server knew a's edit was older
    assert project_col(a, "main_branch") == "online-b"
    assert project_col(b, "main_branch") == "online-b"


def test_unsent_older_edit_loses_to_newer_incoming_edit_on_pull(devices):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("UPDATE project SET main_branch = 'old-a' WHERE name = 'acme'")
    time.sleep(TICK)
    b.sql("UPDATE project SET main_branch = 'new-b' WHERE name = 'acme'")
    b.sync()
    a.pull()                              # a's edit still unsent
    a.sync()
    b.sync()

    assert project_col(a, "main_branch") == "new-b"
    assert project_col(b, "main_branch") == "new-b"


def test_unsent_newer_edit_survives_pull_of_older_edit(devices):
    a, b = devices("a", "b")
    shared_project(a, b)

    b.sql("UPDATE project SET main_branch = 'old-b' WHERE name = 'acme'")
    time.sleep(TICK)
    a.sql("UPDATE project SET main_branch = 'new-a' WHERE name = 'acme'")
    b.sync()
    a.pull()

    assert project_col(a, "main_branch") == "new-a"
    a.sync()
    b.sync()
    assert project_col(b, "main_branch") == "new-a"


##### 4. delete versus edit ####################################################

@pytest.mark.parametrize("first", ["deleter", "editor"])
def test_edit_after_delete_brings_row_back_everywhere(devices, first):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("DELETE FROM project WHERE name = 'acme'")
    time.sleep(TICK)
    b.sql("UPDATE project SET main_branch = 'revived' WHERE name = 'acme'")
    assert_clean(converge(*((a, b) if first == "deleter" else (b, a))))

    for dev in (a, b):
        assert one(dev, "SELECT name, main_branch FROM project") == ("acme", "revived")
    assert a.snapshot() == b.snapshot()


@pytest.mark.parametrize("first", ["editor", "deleter"])
def test_delete_after_edit_removes_row_everywhere(devices, first):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("UPDATE project SET main_branch = 'edited' WHERE name = 'acme'")
    time.sleep(TICK)
    b.sql("DELETE FROM project WHERE name = 'acme'")
    assert_clean(converge(*((a, b) if first == "editor" else (b, a))))

    assert count(a, "project") == 0
    assert count(b, "project") == 0


def test_later_delete_wins_over_unsent_earlier_edit_pulled_first(devices):
    a, b = devices("a", "b")
    shared_project(a, b)

    a.sql("UPDATE project SET main_branch = 'edited' WHERE name = 'acme'")   # t1, unsent
    time.sleep(TICK)
    b.sql("DELETE FROM project WHERE name = 'acme'")                         # t2 > t1
    b.sync()
    a.pull()                              # the newer delete arrives before a pushes
    converge(a, b)

    assert count(b, "project") == 0
    assert count(a, "project") == 0


def test_unsent_newer_edit_survives_pull_of_older_delete(devices):
    a, b = devices("a", "b")
    shared_project(a, b)

    b.sql("DELETE FROM project WHERE name = 'acme'")
    time.sleep(TICK)
    a.sql("UPDATE project SET main_branch = 'kept' WHERE name = 'acme'")
    b.sync()
    a.pull()

    assert project_col(a, "main_branch") == "kept"
    converge(a, b)
    assert project_col(b, "main_branch") == "kept"


##### 5. natural keys ##########################################################

def _same_things(dev, extra_project: str | None) -> None:
    if extra_project:                     # shifts local ids so they differ between devices
        add_project(dev, extra_project)
    dev.sql("INSERT INTO version (name, path) VALUES ('17.0', ?)", f"/home/{dev.name}/odoo17")
    pid = add_project(dev, "acme")
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    dev.sql("INSERT INTO environment (name, project_id) VALUES ('dev', ?)", pid)
    eid = one(dev, "SELECT id FROM environment WHERE name = 'dev'")[0]
    dev.sql("INSERT INTO switch_log (environment_id, switched_at) "
            "VALUES (?, '2024-05-01T10:00:00Z')", eid)


def test_same_natural_keys_on_two_devices_become_one_row(devices):
    a, b = devices("a", "b")
    _same_things(a, None)
    _same_things(b, "b-only")

    results = converge(a, b)

    assert_clean(results)
    for dev in (a, b):
        assert one(dev, "SELECT count(*) FROM version WHERE name = '17.0'") == (1,)
        assert one(dev, "SELECT count(*) FROM project WHERE name = 'acme'") == (1,)
        assert one(dev, "SELECT count(*) FROM setting WHERE name = 'theme'") == (1,)
        assert count(dev, "environment") == 1
        assert count(dev, "switch_log") == 1
    assert a.snapshot() == b.snapshot()


def test_natural_key_twins_keep_references_to_the_local_parent(devices):
    a, b = devices("a", "b")
    _same_things(a, None)
    _same_things(b, "b-only")

    converge(a, b)

    for dev in (a, b):
        acme = one(dev, "SELECT id FROM project WHERE name = 'acme'")[0]
        env_id, project_id = one(dev, "SELECT id, project_id FROM environment")
        assert project_id == acme
        assert one(dev, "SELECT environment_id FROM switch_log")[0] == env_id
    assert one(b, "SELECT id FROM project WHERE name = 'acme'")[0] != \
        one(a, "SELECT id FROM project WHERE name = 'acme'")[0]


##### 6. copied database ######################################################

def _fill(dev) -> None:
    dev.sql("INSERT INTO version (name, path) VALUES ('16.0', '/src/16'), ('17.0', '/src/17')")
    for p in ("acme", "beta"):
        pid = add_project(dev, p)
        for e in ("dev", "staging"):
            dev.sql("INSERT INTO environment (name, project_id, version_id) VALUES (?, ?, 2)",
                    e, pid)
    for eid in range(1, 5):
        for minute in range(3):
            dev.sql("INSERT INTO switch_log (environment_id, switched_at) VALUES (?, ?)",
                    eid, f"2024-05-01T10:0{minute}:00Z")
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark'), ('lang', 'en')")
    dev.sql("INSERT INTO database (name) VALUES ('acme-prod')")
    dev.sql("INSERT INTO backup (name, env_name, db_name, database_id, file_path, created_at) "
            "VALUES ('nightly', 'dev', 'acme-prod', 1, '/bk/1.dump', '2024-05-01')")


def _counts(dev) -> dict:
    return {s.name: count(dev, s.name) for s in ccsync.SPEC}


def _orphan_switch_logs(dev) -> int:
    return one(dev, "SELECT count(*) FROM switch_log s LEFT JOIN environment e "
                    "ON e.id = s.environment_id WHERE e.id IS NULL")[0]


def test_copied_database_syncs_without_duplicates(tmp_path, devices):
    a = devices("a")
    _fill(a)
    before = _counts(a)
    shutil.copy(a.path, tmp_path / "b.db")      # before any ccsync use
    b = devices("b")

    results = converge(a, b)

    assert_clean(results)
    assert _counts(a) == before
    assert _counts(b) == before
    for dev in (a, b):
        assert one(dev, "SELECT count(*) FROM (SELECT DISTINCT environment_id, switched_at "
                        "FROM switch_log)")[0] == before["switch_log"]
        assert _orphan_switch_logs(dev) == 0
    assert a.snapshot() == b.snapshot()


def test_copied_database_after_sync_gets_its_own_device_and_no_duplicates(tmp_path, devices):
    a = devices("a")
    _fill(a)
    a.sync()
    before = _counts(a)
    shutil.copy(a.path, tmp_path / "b.db")
    b = devices("b")
    b.store.prepare()

    assert b.store.device_id and b.store.device_id != a.store.device_id
    b.sql("UPDATE project SET main_branch = 'from-copy' WHERE name = 'acme'")
    assert_clean(converge(a, b))

    assert _counts(a) == before and _counts(b) == before
    assert project_col(a, "main_branch") == "from-copy"
    assert _orphan_switch_logs(a) == 0 and _orphan_switch_logs(b) == 0


def test_copied_database_with_rows_lacking_a_natural_key_syncs_cleanly(tmp_path, devices):
    """A repository without origin_url has no natural key: the copy must still match it."""
    a = devices("a")
    a.sql("INSERT INTO repository (name, path, origin_url) VALUES ('odoo', '/src/odoo', NULL)")
    a.sql("INSERT INTO skill_tag (repository_id, commit_sha, tag) VALUES (1, 'abc1', 'python')")
    shutil.copy(a.path, tmp_path / "b.db")
    b = devices("b")

    results = converge(a, b)

    assert_clean(results)
    for dev in (a, b):
        assert count(dev, "repository") == 1 and count(dev, "skill_tag") == 1
        assert dev.store.pending_references() == 0
    assert a.snapshot() == b.snapshot()


##### 7. child before parent ###################################################

def _push_in_order(dev, server, tables: list[str]) -> None:
    """Push dev's pending records to the server one by one, in ``tables`` order."""
    dev.store.prepare()
    records, position = [], None
    while True:
        batch = dev.store.capture(position)
        if batch.next_pos is None:
            break
        records += [r for r in batch.records if r]
        position = batch.next_pos
    assert {r["t"] for r in records} == set(tables)
    for table in tables:
        for record in records:
            if record["t"] == table:
                answer = server.push([copy.deepcopy(record)], device=dev.name)
                assert answer["results"][0]["status"] == "accepted", answer


def _pull_one_by_one(dev) -> ccsync.SyncResult:
    dev.store.prepare()
    result = ccsync.SyncResult()
    ccsync.pull_changes(dev.store, dev.transport, result, page_size=1)
    return result


def test_child_arriving_before_its_parent_gets_the_right_parent(devices, server):
    a, b = devices("a", "b")
    add_project(b, "b-only")                    # b's ids differ from a's
    pid = add_project(a, "acme")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('dev', ?)", pid)
    _push_in_order(a, server, ["environment", "project"])

    result = _pull_one_by_one(b)

    assert not result.pulled.refused
    acme = one(b, "SELECT id FROM project WHERE name = 'acme'")[0]
    assert one(b, "SELECT name, project_id FROM environment") == ("dev", acme)
    assert b.store.pending_references() == 0


def test_nullable_reference_arriving_before_its_parent_is_filled_in(devices, server):
    a, b = devices("a", "b")
    b.sql("INSERT INTO version (name, path) VALUES ('15.0', '/b/15')")
    pid = add_project(a, "acme")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/17')")
    a.sql("INSERT INTO environment (name, project_id, version_id) VALUES ('dev', ?, 1)", pid)
    _push_in_order(a, server, ["project", "environment", "version"])

    result = _pull_one_by_one(b)

    assert not result.pulled.refused
    v17 = one(b, "SELECT id FROM version WHERE name = '17.0'")[0]
    acme = one(b, "SELECT id FROM project WHERE name = 'acme'")[0]
    assert one(b, "SELECT project_id, version_id FROM environment") == (acme, v17)
    assert b.store.pending_references() == 0


##### 8. device-local columns ##################################################

def test_local_path_of_existing_row_is_not_overwritten(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/a/odoo17', '8069')")
    b.sql("INSERT INTO version (name, path, port) VALUES ('17.0', '/b/odoo17', '8069')")
    converge(a, b)

    a.sql("UPDATE version SET port = '8070', path = '/a/moved' WHERE name = '17.0'")
    converge(a, b)

    assert one(b, "SELECT path, port FROM version") == ("/b/odoo17", "8070")
    assert one(a, "SELECT path, port FROM version") == ("/a/moved", "8070")


def test_row_new_to_a_device_takes_the_senders_path(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/odoo17')")
    converge(a, b)

    assert one(b, "SELECT name, path FROM version") == ("17.0", "/a/odoo17")


def test_local_path_changed_on_receiver_survives_later_remote_edit(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/odoo17')")
    converge(a, b)
    b.sql("UPDATE version SET path = '/b/mine' WHERE name = '17.0'")

    a.sql("UPDATE version SET branch = 'main', path = '/a/else' WHERE name = '17.0'")
    converge(a, b)

    assert one(b, "SELECT path, branch FROM version") == ("/b/mine", "main")


def test_changing_only_a_local_column_sends_nothing(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/odoo17')")
    converge(a, b)

    a.sql("UPDATE version SET path = '/a/elsewhere' WHERE name = '17.0'")
    result = a.push()

    assert result.sent == 0
    assert a.store.pending()["version"] == {"insert": 0, "update": 0, "delete": 0}


##### 9. secrets and local settings ############################################

PRIVATE_SETTINGS = ["github_pat", "sync.api_key", "smtp.password", "sh_session_id", "ide",
                    "odoo.internal_addons_dir", "my_path"]


@pytest.mark.parametrize("name", PRIVATE_SETTINGS)
def test_private_setting_never_leaves_the_device(devices, server, name):
    a, b = devices("a", "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sql("INSERT INTO setting (name, value) VALUES (?, 'PRIVATE-VALUE-1')", name)
    a.sync()
    a.sql("UPDATE setting SET value = 'PRIVATE-VALUE-2' WHERE name = ?", name)
    a.sync()
    a.sql("DELETE FROM setting WHERE name = ?", name)
    a.sync()
    b.sync()

    payloads = server_payloads(server)
    assert "dark" in payloads                       # the ordinary setting did travel
    assert "PRIVATE-VALUE" not in payloads
    sid = ccsync.natural_id("setting", [name])
    assert server.conn.execute("SELECT count(*) FROM change WHERE sid = ?",
                               (sid,)).fetchone()[0] == 0
    assert b.sql("SELECT name FROM setting") == [("theme",)]


@pytest.mark.parametrize("name", PRIVATE_SETTINGS)
def test_incoming_private_setting_is_refused_with_a_reason(devices, name):
    a, b = devices("a", "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    record = captured(a, "setting")
    record["id"] = ccsync.natural_id("setting", [name])
    record["p"]["v"].update(name=name, value="evil")
    record["p"]["k"]["name"] = name
    b.store.prepare()

    result = b.store.apply_page([record], None)

    assert result.applied == 0
    assert result.refused == {f"{ccsync.setting_policy(name)} setting": 1}
    assert b.sql("SELECT * FROM setting") == []


@pytest.mark.parametrize("kind", ["edit", "rename", "delete"])
@pytest.mark.parametrize("name", ["ide", "github_pat"])
def test_incoming_record_cannot_touch_private_setting_by_its_sync_id(devices, name, kind):
    """A record aimed at the setting's (predictable) sync_id that does not name it."""
    a, b = devices("a", "b")
    b.sql("INSERT INTO setting (name, value) VALUES (?, 'mine')", name)
    b.sync()
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    record = captured(a, "setting")
    record["id"] = one(b, "SELECT sync_id FROM setting")[0]
    hlc = record["c"]["value"]
    if kind == "edit":
        record["c"] = {"value": hlc}
        record["p"] = {"v": {"value": "rm -rf ~"}, "l": {}, "k": {}}
    elif kind == "rename":
        record["c"] = {"name": hlc, "value": hlc}
        record["p"] = {"v": {"name": "theme", "value": "rm -rf ~"}, "l": {},
                       "k": {"name": "theme"}}
    else:
        record["c"] = {ccsync.TOMBSTONE: hlc}
        record["p"] = {"v": {}, "l": {}, "k": {}}

    result = b.store.apply_page([record], None)

    assert b.sql("SELECT name, value FROM setting") == [(name, "mine")]
    assert sum(result.refused.values()) == 1


##### 10. wire safety ##########################################################

def test_incoming_column_unknown_here_is_ignored(devices):
    a, b = devices("a", "b")
    add_project(a)
    record = captured(a, "project")
    hlc = record["c"]["name"]
    for col in ("colour", 'name" = 1; DROP TABLE project; --'):
        record["c"][col] = hlc
        record["p"]["v"][col] = "red"
    b.store.prepare()

    result = b.store.apply_page([record], None)

    assert not result.refused and result.applied == 1
    assert project_col(b, "main_branch") == "master"
    assert "colour" not in [r[1] for r in b.sql("PRAGMA table_info(project)")]


@pytest.mark.parametrize("bad", [["a", "b"], {"x": 1}, True])
def test_incoming_non_scalar_value_is_refused_with_a_reason(devices, bad):
    a, b = devices("a", "b")
    add_project(a)
    record = captured(a, "project")
    record["p"]["v"]["main_branch"] = bad
    b.store.prepare()

    result = b.store.apply_page([record], None)

    assert result.applied == 0
    assert sum(result.refused.values()) == 1
    assert count(b, "project") == 0


def test_incoming_non_scalar_local_value_is_refused_not_a_crash(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/odoo17')")
    record = captured(a, "version")
    record["p"]["l"]["path"] = ["/etc", "passwd"]
    b.store.prepare()

    result = b.store.apply_page([record], None)

    assert sum(result.refused.values()) == 1
    assert count(b, "version") == 0


def test_incoming_non_scalar_key_value_is_refused_not_a_crash(devices):
    a, b = devices("a", "b")
    add_project(a)
    record = captured(a, "project")
    record["p"]["k"]["name"] = ["acme"]
    b.store.prepare()

    result = b.store.apply_page([record], None)

    assert sum(result.refused.values()) == 1


def test_malformed_record_on_the_server_does_not_block_later_syncs(devices, server):
    a, b = devices("a", "b")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/odoo17')")
    bad = captured(a, "version")
    bad["p"]["l"]["path"] = {"not": "a scalar"}
    assert server.push([bad], device="evil")["results"][0]["status"] == "refused"
    # A store written by an older server may hold it all the same.
    server.conn.execute(
        "INSERT INTO change (tbl, sid, dev, clocks, payload, received_at, device) "
        "VALUES (?, ?, ?, ?, ?, '2026-01-01T00:00:00Z', 'evil')",
        (bad["t"], bad["id"], bad["dev"], json.dumps(bad["c"]), json.dumps(bad["p"])))
    add_project(a, "acme")
    a.sync()

    first = b.sync()
    second = b.sync()

    assert sum(first.pulled.refused.values()) >= 1
    assert project_col(b, "name") == "acme"
    assert second.pulled.received == 0


@pytest.mark.parametrize("table", ["device", "sqlite_master", "_ccsync_meta", "no_such_table"])
def test_incoming_record_for_unknown_table_is_refused_with_a_reason(devices, table):
    a, b = devices("a", "b")
    add_project(a)
    record = captured(a, "project")
    record["t"] = table
    b.store.prepare()
    before = dump(b.store.conn)

    result = b.store.apply_page([record], None)

    assert result.applied == 0
    assert sum(result.refused.values()) == 1
    after = dump(b.store.conn)
    held = after.pop("_ccsync_held")
    before.pop("_ccsync_held")
    assert after == before                     # nothing but the kept record changed
    assert len(held) == 1 and b.store.held()["refused"] == {"unknown table": 1}


def test_refused_incoming_record_does_not_stop_the_page(devices):
    a, b = devices("a", "b")
    add_project(a, "acme")
    add_project(a, "beta")
    a.store.prepare()
    records = copy.deepcopy([r for r in a.store.capture().records if r])
    records[0]["p"]["v"]["main_branch"] = ["not", "scalar"]
    b.store.prepare()

    result = b.store.apply_page(records, None)

    assert result.applied == 1 and sum(result.refused.values()) == 1
    assert [n for (n,) in b.sql("SELECT name FROM project")] == ["beta"]


##### 11. refused rows stay pending ############################################

CLOCK_AHEAD = "clock ahead of the server (check this device's time)"


def test_row_refused_by_server_stays_pending_until_accepted(devices, server):
    a = devices("a")
    a.store.prepare()
    add_project(a)
    server.clock = lambda: time.time() - 3600        # a's clock looks 1 hour ahead

    refused = a.push()

    assert refused.accepted == 0
    assert refused.refused == {CLOCK_AHEAD: 1}
    assert [(r["table"], r["reason"]) for r in a.store.refused()] == [("project", CLOCK_AHEAD)]
    assert a.store.pending()["project"]["insert"] == 1

    server.clock = time.time
    fixed = a.push()

    assert fixed.accepted == 1 and not fixed.refused
    assert a.store.refused() == []
    assert a.store.pending()["project"] == {"insert": 0, "update": 0, "delete": 0}


##### 12. no echo, no needless traffic ########################################

def test_rows_just_downloaded_are_not_uploaded_back(devices):
    a, b = devices("a", "b")
    _fill(a)
    a.sync()

    b.pull()

    assert b.push().sent == 0
    assert all(not any(c.values()) for c in b.store.pending().values())


def test_sync_with_no_change_sends_and_receives_nothing(devices):
    a, b = devices("a", "b")
    _fill(a)
    add_project(b, "b-only")
    converge(a, b)

    for dev in (a, b):
        result = dev.sync()
        assert (result.sent, result.pulled.received) == (0, 0)


def test_editing_one_row_of_a_thousand_sends_one_record(devices):
    a, b = devices("a", "b")
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                     [(f"opt.{i:04d}", str(i)) for i in range(1000)])
    converge(a, b)

    a.sql("UPDATE setting SET value = 'changed' WHERE name = 'opt.0500'")
    sent = a.sync()
    got = b.sync()

    assert sent.sent == 1
    assert got.pulled.received == 1
    assert one(b, "SELECT value FROM setting WHERE name = 'opt.0500'")[0] == "changed"


##### 13. crash in the middle of applying a page ##############################

class SimulatedCrash(BaseException):
    """Stands for the process dying (kill -9, power loss): nothing catches it."""


def test_crash_mid_apply_leaves_device_as_before_then_converges(devices, monkeypatch):
    a, b = devices("a", "b")
    _fill(a)
    a.sync()
    add_project(b, "b-only")
    b.sync()
    a.sql("UPDATE project SET main_branch = 'develop' WHERE name = 'acme'")
    add_project(a, "gamma")
    a.sync()
    b.store.prepare()
    before, cursor = dump(b.store.conn), b.store.cursor

    real = ccsync.Store._materialize
    calls = []

    def crashing(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise SimulatedCrash("simulated crash")
        return real(self, *args, **kw)

    monkeypatch.setattr(ccsync.Store, "_materialize", crashing)
    with pytest.raises(SimulatedCrash):
        b.pull()

    assert b.store.cursor == cursor
    assert dump(b.store.conn) == before
    assert not b.store.conn.in_transaction

    monkeypatch.undo()
    assert_clean(converge(a, b))
    assert a.snapshot() == b.snapshot()
    assert _counts(a) == _counts(b)
    assert count(b, "project") == 4


def test_cc_edit_after_crashed_pull_is_still_captured(devices, monkeypatch):
    a, b = devices("a", "b")
    add_project(a)
    a.sync()
    b.store.prepare()

    def crash(*_args, **_kw):
        raise SimulatedCrash("simulated crash")

    monkeypatch.setattr(ccsync.Store, "_materialize", crash)
    with pytest.raises(SimulatedCrash):
        b.pull()
    monkeypatch.undo()

    add_project(b, "after-crash")

    assert b.store.pending()["project"]["insert"] == 1


##### 14. short write transactions #############################################

def test_big_pull_commits_page_by_page(devices, monkeypatch):
    a, b = devices("a", "b")
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                     [(f"opt.{i:04d}", str(i)) for i in range(3000)])
    a.sync()
    b.store.prepare()

    real = ccsync.Store.apply_page
    pages = []

    def watched(self, records, cursor):
        result = real(self, records, cursor)
        committed = b.cc.execute(
            "SELECT value FROM _ccsync_meta WHERE key = 'cursor'").fetchone()[0]
        pages.append((len(records), cursor, int(committed), self.conn.in_transaction))
        return result

    monkeypatch.setattr(ccsync.Store, "apply_page", watched)
    result = b.pull()

    assert result.pulled.applied == 3000
    assert len(pages) >= 2
    assert all(n <= ccsync.PULL_PAGE for n, *_ in pages)
    cursors = [c for _, c, _, _ in pages]
    assert cursors == sorted(set(cursors))               # moves forward every page
    assert all(c == committed and not open_tx for _, c, committed, open_tx in pages)
    assert count(b, "setting") == 3000


##### 15. deletes and references ##############################################

def test_deleted_parent_stays_while_a_live_row_needs_it(devices):
    """A project deleted on one device while an environment still points at it
    stays on every device (the same everywhere), with the environment attached."""
    a, b, c = devices("a", "b", "c")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('main', 1)")
    converge(a, b)
    b.sql("DELETE FROM project WHERE name = 'acme'")        # only the project
    converge(a, b, c)

    for device in (a, b, c):
        assert device.sql("SELECT p.name FROM environment e JOIN project p "
                          "ON p.id = e.project_id") == [("acme",)], device.name
    assert a.snapshot() == b.snapshot() == c.snapshot()
    assert all(d.store.pending_references() == 0 for d in (a, b, c))


def test_deleting_the_last_child_lets_the_parent_delete_take_effect(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO environment (name, project_id) VALUES ('main', 1)")
    converge(a, b)
    b.sql("DELETE FROM project WHERE name = 'acme'")
    converge(a, b)
    a.sql("DELETE FROM environment WHERE name = 'main'")
    converge(a, b)
    converge(a, b)

    for device in (a, b):
        assert device.sql("SELECT count(*) FROM project") == [(0,)], device.name
        assert device.sql("SELECT count(*) FROM environment") == [(0,)], device.name


def test_nullable_reference_to_a_deleted_row_reads_as_null_everywhere(devices):
    a, b, c = devices("a", "b", "c")
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', '/a/17')")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO environment (name, project_id, version_id) VALUES ('main', 1, 1)")
    converge(a, b)
    b.sql("DELETE FROM version WHERE name = '17.0'")
    converge(a, b, c)

    for device in (a, b, c):
        assert device.sql("SELECT version_id FROM environment") == [(None,)], device.name
    assert a.snapshot() == b.snapshot() == c.snapshot()


def test_bulk_insert_keeps_clocks_near_wall_time_and_is_accepted(devices, server):
    """cc re-indexing code-index rows in one go must not push the hybrid clock
    ahead (one tick per edit used to add 1 ms each: 100,000 rows, minutes), since
    the server refuses clocks more than 5 minutes ahead.  20,000 rows, which that
    bug would have put 20 s ahead."""
    a = devices("a")
    a.sql("INSERT INTO repository (name, path, origin_url) VALUES ('r', '/r', 'git@x:r')")
    a.store.prepare()                        # capture is on before the bulk insert
    a.cc.execute("BEGIN")
    a.cc.executemany("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind) "
                     "VALUES (1, ?, 'function')", ((f"sym{i}",) for i in range(20_000)))
    a.cc.execute("COMMIT")

    hlc = a.store.conn.execute("SELECT hlc FROM _ccsync_clock").fetchone()[0]
    ahead_ms = hlc / ccsync.HLC_PER_MS - time.time() * 1000
    assert ahead_ms < 5_000
    a.store.prepare()
    last = len(a.store.tables()) - 1         # knowledge_index, the last table
    newest = a.store.capture(after=(last, 1, 20_000 - 1), limit=5).records[-1]
    assert newest["c"]["symbol"] == hlc
    assert server.push([newest])["results"] == [{"status": "accepted", "seq": 1}]


def test_first_sync_does_not_pull_its_own_rows_back(devices):
    a = devices("a")
    for i in range(50):
        a.sql("INSERT INTO project (name) VALUES (?)", f"p{i}")
    first = a.sync()
    assert first.accepted == 50 and first.pulled.received == 0


def test_merging_two_projects_also_merges_their_same_named_environments(devices):
    """b renames project 'old' to 'acme' while a creates its own 'acme'; both have
    an environment 'main'.  The projects merge, and so do the two 'main's."""
    a, b, c = devices("a", "b", "c")
    a.sql("INSERT INTO project (name) VALUES ('old')")
    a.sql("INSERT INTO environment (name, project_id, notes) VALUES ('main', 1, 'from old')")
    converge(a, b)
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO environment (name, project_id, branch_name) VALUES ('main', 2, 'dev')")
    b.sql("UPDATE project SET name = 'acme' WHERE name = 'old'")
    results = converge(a, b, c, rounds=3)

    assert_clean(results)
    for device in (a, b, c):
        assert device.sql("SELECT p.name, e.name FROM environment e JOIN project p "
                          "ON p.id = e.project_id") == [("acme", "main")], device.name
    assert a.snapshot() == b.snapshot() == c.snapshot()


def test_diff_interrupted_after_reinstalling_triggers_runs_at_next_sync(devices):
    """Edits made while capture triggers were missing are found by a full diff;
    a crash between reinstalling the triggers and that diff must not lose them."""
    a = devices("a")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sync()
    for (name,) in a.sql("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                         "AND tbl_name = 'project'"):
        a.sql(f'DROP TRIGGER "{name}"')              # e.g. a cc migration rebuilt the table
    a.sql("UPDATE project SET main_branch = 'main' WHERE name = 'acme'")
    a.store._install()                               # reinstalled, then "crash" before the diff

    pushed = a.push()

    assert pushed.sent == 1 and pushed.accepted == 1


def test_pending_counts_each_kind_of_change_once(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name) VALUES ('acme'), ('moved'), ('later')")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark'), ('github_pat', 'x')")
    assert_clean(converge(a, b))
    assert not any(sum(c.values()) for c in a.store.pending().values())
    a.sql("UPDATE project SET main_branch = 'dev' WHERE name = 'acme'")       # an update
    a.sql("UPDATE project SET id = id + 100 WHERE name = 'moved'")            # only moved
    a.sql("INSERT INTO project (name) VALUES ('new')")                        # an insert,
    a.sql("UPDATE project SET main_branch = 'x' WHERE name = 'new'")          # edited again
    a.sql("DELETE FROM project WHERE name = 'later'")                         # a delete
    a.sql("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    a.sql("UPDATE setting SET value = 'y' WHERE name = 'github_pat'")          # stays here
    a.sql("INSERT INTO setting (name, value) VALUES ('ccsync.local_settings', 'font'), "
          "('font', 'mono'), ('lang', 'en')")                                 # lang leaves
    pending = a.store.pending()
    assert pending["project"] == {"insert": 1, "update": 1, "delete": 1}
    assert pending["setting"] == {"insert": 1, "update": 1, "delete": 0}
    assert_clean(converge(a, b))
    assert not any(sum(c.values()) for c in a.store.pending().values())
