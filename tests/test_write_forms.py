"""Capture under every write form SQLite allows on a synced table.

cc (and whatever else opens cc_cli.db) may write a synced table with any
statement SQLite accepts: plain INSERT/UPDATE/DELETE, the OR <conflict>
variants, REPLACE, UPSERT, INSERT ... SELECT, rowid changes, bulk deletes,
and schema changes (ADD/RENAME/DROP COLUMN, RENAME TO, cc's table rebuild,
VACUUM).  Each must keep working after ``stamp`` and be captured, repeatedly,
before and after syncs, inside and outside explicit transactions, in both
journal modes; the edit time recorded for a cell is always its latest edit;
rows that REPLACE removes sync as deletes.

Every test here runs in-process (LocalTransport, the conftest ``devices``
fixture): device ``a`` writes, ``a`` and ``b`` sync, and both must end up
holding the same content, with the latest values.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

import ccsync
from conftest import SCHEMA, make_cc_db

TICK = 0.01   # long enough for the wall clock (ms) to move between two edits


##### helpers ##################################################################

def converge(*devs, rounds: int = 2, **kw) -> list[ccsync.SyncResult]:
    """Sync every device, round-robin, a few times; returns all results."""
    results = []
    for _ in range(rounds):
        for dev in devs:
            results.append(dev.sync(**kw))
    return results


def assert_clean(results) -> None:
    """No record refused by the server nor by a device."""
    for r in results:
        assert not r.refused, r.as_dict()
        assert not r.pulled.refused, r.as_dict()


def one(dev, query: str, *args):
    rows = dev.sql(query, *args)
    assert len(rows) == 1, rows
    return rows[0]


def settings(dev) -> dict:
    return dict(dev.sql("SELECT name, value FROM setting"))


def setting_id(dev, name: str) -> int:
    return one(dev, "SELECT id FROM setting WHERE name = ?", name)[0]


def setting_sid(dev, name: str) -> str:
    return one(dev, "SELECT sync_id FROM setting WHERE name = ?", name)[0]


def capture_triggers(dev) -> list[str]:
    return sorted(n for (n,) in dev.sql(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' "
        "AND name LIKE '\\_ccsync\\_%' ESCAPE '\\'"))


def assert_same(a, b) -> None:
    """Both devices hold the same synced content."""
    sa, sb = a.snapshot(), b.snapshot()
    if sa != sb:                         # a readable difference, row by row
        diff = {}
        for table in sa:
            ra, rb = sa[table], sb.get(table, {})
            rows = {sid: (ra.get(sid), rb.get(sid)) for sid in set(ra) | set(rb)
                    if ra.get(sid) != rb.get(sid)}
            if rows:
                diff[table] = rows
        pytest.fail(f"{a.name} and {b.name} differ (sync_id: ({a.name}, {b.name})): {diff}")


def assert_settings(expected: dict, *devs) -> None:
    """``expected``: name -> value, or None for a setting that must be gone."""
    for dev in devs:
        have = settings(dev)
        for name, value in expected.items():
            if value is None:
                assert name not in have, (dev.name, name, have.get(name))
            else:
                assert have.get(name) == value, (dev.name, name, have.get(name))


def in_transaction(dev, fn):
    """Run ``fn`` inside an explicit BEGIN ... COMMIT on cc's autocommit connection."""
    dev.sql("BEGIN")
    try:
        out = fn()
    except BaseException:
        if dev.cc.in_transaction:
            dev.sql("ROLLBACK")
        raise
    dev.sql("COMMIT")
    return out


def cc_connection(dev) -> sqlite3.Connection:
    """A connection opened the way cc opens its own: Python's implicit transactions,
    busy_timeout 5000, foreign_keys on."""
    conn = sqlite3.connect(str(dev.path), timeout=5)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


# Every device starts as a copy of one fresh cc database (the schema script
# runs once), with synchronous = OFF on both connections: durability is not
# under test here, and fsyncs would make up most of the run time.
_TEMPLATE: list = []


def _template() -> Path:
    if not _TEMPLATE:
        holder = tempfile.TemporaryDirectory()
        path = Path(holder.name) / "template.db"
        make_cc_db(path).close()
        _TEMPLATE[:] = [holder, path]
    return _TEMPLATE[1]


JOURNALS = ["delete", "wal"]


@pytest.fixture
def journal() -> str:
    """The journal mode of the devices' databases; tests parametrize it to test both."""
    return "delete"


@pytest.fixture
def pair(devices, server, tmp_path, journal):
    """Devices a and b, both in the given journal mode (set before any sync)."""
    server.conn.execute("PRAGMA synchronous = OFF")
    for name in ("a", "b"):
        shutil.copyfile(_template(), tmp_path / f"{name}.db")
    a, b = devices("a", "b")
    for dev in (a, b):
        for conn in (dev.cc, dev.store.conn):
            conn.execute("PRAGMA synchronous = OFF")
        # No pause between ccsync's write slices (if the store paces its
        # writes): fairness to a concurrent cc writer is not under test here,
        # and nothing else writes while a test syncs.
        gate = getattr(dev.store, "gate", None)
        if gate is not None and hasattr(gate, "gap_s") and hasattr(gate, "ratio"):
            gate.gap_s = gate.ratio = 0.0
    if journal == "wal":
        for dev in (a, b):
            assert dev.sql("PRAGMA journal_mode=WAL")[0][0] == "wal"
    else:
        for dev in (a, b):
            assert dev.sql("PRAGMA journal_mode")[0][0] == "delete"
    return a, b


SEED = {"theme": "light", "font": "mono", "lang": "en",
        **{f"del.{r}": f"gone-{r}" for r in range(1, 5)}}


def seed_settings(a, b) -> None:
    """Settings created on a, stamped and shared with b."""
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)", list(SEED.items()))
    assert_clean(converge(a, b))
    assert settings(b) == SEED
    assert_same(a, b)


def seed_project(a, b) -> None:
    """A project with one environment on a, shared with b."""
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    pid = one(a, "SELECT id FROM project WHERE name = 'acme'")[0]
    a.sql("INSERT INTO environment (name, project_id, branch_name, notes, ssh_host, ssh_user) "
          "VALUES ('dev', ?, '17.0-dev', 'n0', 'box.lan', 'odoo')", pid)
    assert_clean(converge(a, b))
    assert one(b, "SELECT name, notes FROM environment") == ("dev", "n0")
    assert_same(a, b)


def create_sql(table: str) -> str:
    """cc 4.0's CREATE TABLE statement for ``table`` (from tests/cc-schema.sql)."""
    match = re.search(rf"^CREATE TABLE {table} \(.*?\);$", SCHEMA, re.M)
    assert match, table
    return match.group(0)


##### write forms ##############################################################
# Each form runs on device ``dev`` for round ``r`` (1, 2, 3, 4) and sets the
# setting 'theme' (or other rows) to ``value``; it returns what the setting
# table must hold afterwards: name -> value, None for a row that must be gone.

UPSERT = ("INSERT INTO setting (name, value) VALUES (?, ?) "
          "ON CONFLICT(name) DO UPDATE SET value = excluded.value")


def _update_or(verb):
    def form(dev, value, r):
        dev.sql(f"UPDATE {verb} setting SET value = ? WHERE name = 'theme'", value)
        return {"theme": value}
    return form


def _insert_or(verb):
    def form(dev, value, r):
        dev.sql(f"INSERT {verb} INTO setting (name, value) VALUES (?, ?)", f"new.{r}", value)
        return {f"new.{r}": value}
    return form


def f_update(dev, value, r):
    dev.sql("UPDATE setting SET value = ? WHERE name = 'theme'", value)
    return {"theme": value}


def f_update_orm(dev, value, r):
    # cc's ORM write: every field of the record, unchanged ones included, by id.
    rid, name = one(dev, "SELECT id, name FROM setting WHERE name = 'theme'")
    dev.sql("UPDATE setting SET name = ?, value = ? WHERE id = ?", name, value, rid)
    return {"theme": value}


def f_upsert_orm(dev, value, r):
    # cc's setting.upsert: search by key, UPDATE what is found, INSERT the rest.
    out = {}
    for name, val in (("theme", value), ("font", f"{value}.font"), (f"new.{r}", value)):
        found = dev.sql("SELECT id FROM setting WHERE name = ?", name)
        if found:
            dev.sql("UPDATE setting SET name = ?, value = ? WHERE id = ?", name, val, found[0][0])
        else:
            dev.sql("INSERT INTO setting (name, value) VALUES (?, ?)", name, val)
        out[name] = val
    return out


def f_update_many_rows(dev, value, r):
    dev.sql("UPDATE setting SET value = ? || '.' || name WHERE name IN ('theme', 'font')", value)
    return {"theme": f"{value}.theme", "font": f"{value}.font"}


def f_update_returning(dev, value, r):
    rows = dev.sql("UPDATE setting SET value = ? WHERE name = 'theme' RETURNING id", value)
    assert len(rows) == 1
    return {"theme": value}


def f_update_from(dev, value, r):
    dev.sql("UPDATE setting SET value = src.v FROM (SELECT ? AS v) AS src "
            "WHERE setting.name = 'theme'", value)
    return {"theme": value}


def f_insert_or_replace(dev, value, r):
    dev.sql("INSERT OR REPLACE INTO setting (name, value) VALUES ('theme', ?)", value)
    return {"theme": value}


def f_replace_into(dev, value, r):
    dev.sql("REPLACE INTO setting (name, value) VALUES ('theme', ?)", value)
    return {"theme": value}


def f_insert_or_replace_select(dev, value, r):
    dev.sql("INSERT OR REPLACE INTO setting (name, value) "
            "SELECT name, ? FROM setting WHERE name = 'theme'", value)
    return {"theme": value}


def f_insert_or_ignore(dev, value, r):
    dev.sql("INSERT OR IGNORE INTO setting (name, value) VALUES ('theme', 'ignored')")
    dev.sql("INSERT OR IGNORE INTO setting (name, value) VALUES ('new.1', ?)", value)
    dev.sql("INSERT OR IGNORE INTO setting (name, value) VALUES (?, ?)", f"new.{r}", value)
    return {f"new.{r}": value}       # later rounds: new.1 keeps round 1's value


def f_insert_or_ignore_new(dev, value, r):
    dev.sql("INSERT OR IGNORE INTO setting (name, value) VALUES (?, ?)", f"new.{r}", value)
    return {f"new.{r}": value}


def f_upsert(dev, value, r):
    dev.sql(UPSERT, "theme", value)
    return {"theme": value}


def f_upsert_new_name(dev, value, r):
    dev.sql(UPSERT, "new.1", value)          # round 1 inserts it, later rounds update it
    return {"new.1": value}


def f_upsert_where(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', ?) ON CONFLICT(name) "
            "DO UPDATE SET value = excluded.value WHERE setting.value IS NOT excluded.value",
            value)
    return {"theme": value}


def f_upsert_no_target(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', ?) "
            "ON CONFLICT DO UPDATE SET value = excluded.value", value)
    return {"theme": value}


def f_upsert_on_id(dev, value, r):
    rid = setting_id(dev, "theme")
    dev.sql("INSERT INTO setting (id, name, value) VALUES (?, 'theme', ?) "
            "ON CONFLICT(id) DO UPDATE SET value = excluded.value", rid, value)
    return {"theme": value}


def f_upsert_multirow(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', ?), ('font', ?), ('theme', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            f"{value}.tmp", f"{value}.font", value)
    return {"theme": value, "font": f"{value}.font"}


def f_upsert_executemany(dev, value, r):
    dev.cc.executemany(UPSERT, [("theme", f"{value}.tmp"), ("font", f"{value}.font"),
                                ("theme", value), (f"new.{r}", "x"), (f"new.{r}", value)])
    return {"theme": value, "font": f"{value}.font", f"new.{r}": value}


def f_upsert_do_nothing(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', 'ignored') "
            "ON CONFLICT(name) DO NOTHING")
    dev.sql("INSERT INTO setting (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
            f"new.{r}", value)
    dev.sql("INSERT INTO setting (name, value) VALUES (?, 'ignored') "
            "ON CONFLICT(name) DO NOTHING", f"new.{r}")
    return {f"new.{r}": value}


def f_insert_select(dev, value, r):
    before = {n: v for n, v in settings(dev).items() if n in ("theme", "font")}
    dev.sql("INSERT INTO setting (name, value) "
            "SELECT 'copy.' || ? || '.' || name, value || ? FROM setting "
            "WHERE name IN ('theme', 'font')", str(r), value)
    return {f"copy.{r}.{n}": v + value for n, v in before.items()}


def f_insert_select_upsert(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) SELECT name, ? || '.' || name FROM setting "
            "WHERE name IN ('theme', 'font') "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value", value)
    return {"theme": f"{value}.theme", "font": f"{value}.font"}


def f_insert(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) VALUES (?, ?)", f"new.{r}", value)
    return {f"new.{r}": value}


def f_insert_then_update(dev, value, r):
    dev.sql("INSERT INTO setting (name, value) VALUES (?, 'first')", f"new.{r}")
    dev.sql("UPDATE setting SET value = ? WHERE name = ?", value, f"new.{r}")
    return {f"new.{r}": value}


def f_delete(dev, value, r):
    dev.sql("DELETE FROM setting WHERE name = ?", f"del.{r}")
    return {f"del.{r}": None}


def f_delete_returning(dev, value, r):
    rows = dev.sql("DELETE FROM setting WHERE name = ? RETURNING id", f"del.{r}")
    assert len(rows) == 1
    return {f"del.{r}": None}


def f_delete_then_insert_same_name(dev, value, r):
    dev.sql("DELETE FROM setting WHERE name = 'theme'")
    dev.sql("INSERT INTO setting (name, value) VALUES ('theme', ?)", value)
    return {"theme": value}


def f_delete_then_insert_same_id(dev, value, r):
    # The freed rowid is taken at once by another row (explicit id).
    rid = setting_id(dev, f"del.{r}")
    dev.sql("DELETE FROM setting WHERE id = ?", rid)
    dev.sql("INSERT INTO setting (id, name, value) VALUES (?, ?, ?)", rid, f"new.{r}", value)
    return {f"del.{r}": None, f"new.{r}": value}


def f_edit_then_change_rowid(dev, value, r):
    # A pending edit, then the row moves to another rowid (UPDATE t SET id = ...).
    dev.sql("UPDATE setting SET value = ? WHERE name = 'theme'", value)
    dev.sql("UPDATE setting SET id = (SELECT max(id) FROM setting) + 100 WHERE name = 'theme'")
    return {"theme": value}


def f_change_rowid_with_value(dev, value, r):
    dev.sql("UPDATE setting SET id = (SELECT max(id) FROM setting) + 100, value = ? "
            "WHERE name = 'theme'", value)
    return {"theme": value}


FORMS = {
    "update": f_update,
    "update_orm_all_fields": f_update_orm,
    "upsert_orm_search_then_write": f_upsert_orm,
    "update_many_rows": f_update_many_rows,
    "update_returning": f_update_returning,
    "update_from": f_update_from,
    "update_or_abort": _update_or("OR ABORT"),
    "update_or_fail": _update_or("OR FAIL"),
    "update_or_ignore": _update_or("OR IGNORE"),
    "update_or_replace": _update_or("OR REPLACE"),
    "update_or_rollback": _update_or("OR ROLLBACK"),
    "insert": f_insert,
    "insert_then_update": f_insert_then_update,
    "insert_or_abort": _insert_or("OR ABORT"),
    "insert_or_fail": _insert_or("OR FAIL"),
    "insert_or_ignore_new": f_insert_or_ignore_new,
    "insert_or_ignore_conflicting": f_insert_or_ignore,
    "insert_or_rollback": _insert_or("OR ROLLBACK"),
    "insert_or_replace": f_insert_or_replace,
    "insert_or_replace_select": f_insert_or_replace_select,
    "replace_into": f_replace_into,
    "upsert": f_upsert,
    "upsert_new_name": f_upsert_new_name,
    "upsert_where": f_upsert_where,
    "upsert_no_target": f_upsert_no_target,
    "upsert_on_id": f_upsert_on_id,
    "upsert_multirow_values": f_upsert_multirow,
    "upsert_executemany_repeated_keys": f_upsert_executemany,
    "upsert_do_nothing": f_upsert_do_nothing,
    "insert_select": f_insert_select,
    "insert_select_upsert": f_insert_select_upsert,
    "delete": f_delete,
    "delete_returning": f_delete_returning,
    "delete_then_insert_same_name": f_delete_then_insert_same_name,
    "delete_then_insert_same_id": f_delete_then_insert_same_id,
    "edit_then_change_rowid": f_edit_then_change_rowid,
    "change_rowid_with_value": f_change_rowid_with_value,
}


def run_rounds(dev, form, rounds, txn: str, tag: str) -> dict:
    """Run ``form`` once per round (each time with a new value); returns the expectation.

    txn: "autocommit" (each statement on its own) or "transaction" (all rounds
    inside one explicit BEGIN ... COMMIT).
    """
    expected = {}

    def go():
        for r in rounds:
            expected.update(form(dev, f"{tag}-{r}", r))

    if txn == "transaction":
        in_transaction(dev, go)
    else:
        go()
    return expected


##### 1. every write form, twice before a sync, before and after syncs #########

# Every form in rollback-journal mode; UPSERT and REPLACE forms in WAL mode too.
WRITE_CASES = [pytest.param(form, txn, journal, id=f"{form}-{txn}-{journal}")
               for form in FORMS for txn in ("autocommit", "transaction")
               for journal in JOURNALS
               if journal == "delete" or "upsert" in form or "replace" in form]


@pytest.mark.parametrize("form,txn,journal", WRITE_CASES)
def test_write_form_run_twice_before_a_sync_is_captured(pair, form, txn):
    a, b = pair
    seed_settings(a, b)
    expected = {}

    for rounds in ((1, 2), (3, 4)):           # twice before a sync, then twice more after it
        expected.update(run_rounds(a, FORMS[form], rounds, txn, form))
        assert_settings(expected, a)          # cc's own write did what it says
        assert_clean(converge(a, b))

        assert_same(a, b)
        assert_settings(expected, a, b)


@pytest.mark.parametrize("form", ["update", "update_or_ignore", "update_or_replace", "upsert",
                                  "insert_or_replace", "delete_then_insert_same_id",
                                  "edit_then_change_rowid"])
def test_edits_on_the_other_device_still_arrive_after_a_write_form(pair, form):
    a, b = pair
    seed_settings(a, b)
    expected = run_rounds(a, FORMS[form], (1, 2), "autocommit", form)
    assert_clean(converge(a, b))

    b.sql("UPDATE setting SET value = 'from-b' WHERE name = 'lang'")
    b.sql("UPDATE setting SET value = 'theme-from-b' WHERE name = 'theme'")
    assert_clean(converge(b, a))

    assert_same(a, b)
    assert_settings({**expected, "lang": "from-b", "theme": "theme-from-b"}, a, b)


##### 2. the edit time is that of the latest edit ##############################

LATEST_FORMS = ["update_or_ignore", "update_or_abort", "update_or_fail", "update_or_rollback",
                "update_or_replace", "update", "upsert", "upsert_where", "upsert_no_target",
                "upsert_executemany_repeated_keys", "insert_or_replace", "replace_into"]


LATEST_CASES = [pytest.param(form, first, journal, id=f"{form}-{first}-{journal}")
                for form in LATEST_FORMS for first in ("a_syncs_first", "b_syncs_first")
                for journal in JOURNALS
                if journal == "delete" or form in ("update_or_ignore", "upsert")]


@pytest.mark.parametrize("form,first,journal", LATEST_CASES)
def test_second_edit_of_a_pending_cell_records_its_own_time(pair, form, first):
    """a edits (t1), b edits the same cell (t2), a edits it again with ``form`` while
    its first edit is still pending (t3): t3 is a's edit time, so a's value wins."""
    a, b = pair
    seed_settings(a, b)

    a.sql("UPDATE setting SET value = 'a-first' WHERE name = 'theme'")       # t1, pending
    time.sleep(TICK)
    b.sql("UPDATE setting SET value = 'b-middle' WHERE name = 'theme'")      # t2
    time.sleep(TICK)
    FORMS[form](a, "a-second", 1)                                            # t3 > t2
    assert settings(a)["theme"] == "a-second"

    assert_clean(converge(*((a, b) if first == "a_syncs_first" else (b, a))))

    assert_settings({"theme": "a-second"}, a, b)
    assert_same(a, b)


@pytest.mark.parametrize("journal", JOURNALS)
def test_update_or_ignore_time_beats_an_older_remote_edit_already_on_the_server(pair):
    a, b = pair
    seed_settings(a, b)

    a.sql("UPDATE setting SET value = 'a-first' WHERE name = 'theme'")       # t1, pending
    time.sleep(TICK)
    b.sql("UPDATE setting SET value = 'b-middle' WHERE name = 'theme'")      # t2
    b.sync()                                                                 # on the server
    time.sleep(TICK)
    a.sql("UPDATE OR IGNORE setting SET value = 'a-second' WHERE name = 'theme'")  # t3

    a.pull()                              # the older remote edit arrives while a's is pending
    assert settings(a)["theme"] == "a-second"
    assert_clean(converge(a, b))

    assert_settings({"theme": "a-second"}, a, b)


##### 3. rows removed by REPLACE sync as deletes ###############################

@pytest.fixture(params=["recursive_triggers_off", "recursive_triggers_on"])
def recursive(request) -> str:
    return "ON" if request.param.endswith("_on") else "OFF"


def seed_k(a, b) -> dict:
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                     [("other", "kept")] + [(f"k{i}", f"v{i}") for i in range(1, 5)])
    assert_clean(converge(a, b))
    assert_same(a, b)
    return {f"k{i}": (setting_id(a, f"k{i}"), setting_sid(a, f"k{i}")) for i in range(1, 5)}


def assert_gone_everywhere(sids, *devs) -> None:
    for dev in devs:
        have = {s for (s,) in dev.sql("SELECT sync_id FROM setting")}
        assert not have & set(sids), (dev.name, sorted(have & set(sids)))


def k_settings(dev) -> dict:
    return {n: v for n, v in settings(dev).items() if n.startswith("k")}


@pytest.mark.parametrize("journal", JOURNALS)
@pytest.mark.parametrize("txn", [False, True], ids=["autocommit", "transaction"])
def test_update_or_replace_onto_an_existing_name_deletes_that_row_everywhere(
        pair, recursive, txn):
    a, b = pair
    k = seed_k(a, b)
    a.sql(f"PRAGMA recursive_triggers = {recursive}")

    def twice():
        a.sql("UPDATE OR REPLACE setting SET name = 'k2' WHERE name = 'k1'")       # k2 goes
        a.sql("UPDATE OR REPLACE setting SET name = 'k3', value = 'v1b' WHERE name = 'k2'")

    in_transaction(a, twice) if txn else twice()
    assert k_settings(a) == {"k3": "v1b", "k4": "v4"}
    assert_clean(converge(a, b))

    assert_same(a, b)
    for dev in (a, b):
        assert k_settings(dev) == {"k3": "v1b", "k4": "v4"}, dev.name
        assert settings(dev)["other"] == "kept"
    # The renamed row takes its new key's id (k3's); the ids of k1 (renamed
    # away) and k2 (replaced) are deleted everywhere.
    assert_gone_everywhere([k["k1"][1], k["k2"][1]], a, b)
    for dev in (a, b):
        assert dev.sql("SELECT sync_id FROM setting WHERE name = 'k3'") == [(k["k3"][1],)]

    # again, after the sync
    a.sql("UPDATE OR REPLACE setting SET name = 'k4', value = 'v1c' WHERE name = 'k3'")
    assert_clean(converge(a, b))
    assert_same(a, b)
    for dev in (a, b):
        assert k_settings(dev) == {"k4": "v1c"}, dev.name
        assert dev.sql("SELECT sync_id FROM setting WHERE name = 'k4'") == [(k["k4"][1],)]
    assert_gone_everywhere([k["k1"][1], k["k2"][1], k["k3"][1]], a, b)


@pytest.mark.parametrize("journal", JOURNALS)
@pytest.mark.parametrize("txn", [False, True], ids=["autocommit", "transaction"])
def test_insert_or_replace_onto_another_rows_id_deletes_that_row_everywhere(
        pair, recursive, txn):
    a, b = pair
    k = seed_k(a, b)
    a.sql(f"PRAGMA recursive_triggers = {recursive}")
    sql = "INSERT OR REPLACE INTO setting (id, name, value) VALUES (?, ?, ?)"

    def twice():
        a.sql(sql, k["k2"][0], "k5", "v5")      # k2 goes (same id)
        a.sql(sql, k["k3"][0], "k5", "v5b")     # k3 goes (same id), the new k5 too (same name)

    in_transaction(a, twice) if txn else twice()
    assert k_settings(a) == {"k1": "v1", "k4": "v4", "k5": "v5b"}
    assert_clean(converge(a, b))

    assert_same(a, b)
    for dev in (a, b):
        assert k_settings(dev) == {"k1": "v1", "k4": "v4", "k5": "v5b"}, dev.name
    assert_gone_everywhere([k["k2"][1], k["k3"][1]], a, b)

    # again, after the sync
    a.sql(sql, k["k4"][0], "k6", "v6")
    assert_clean(converge(a, b))
    assert_same(a, b)
    for dev in (a, b):
        assert k_settings(dev) == {"k1": "v1", "k5": "v5b", "k6": "v6"}, dev.name
    assert_gone_everywhere([k["k2"][1], k["k3"][1], k["k4"][1]], a, b)


@pytest.mark.parametrize("journal", JOURNALS)
@pytest.mark.parametrize("txn", [False, True], ids=["autocommit", "transaction"])
def test_replace_on_a_unique_index_deletes_the_other_row_everywhere(pair, recursive, txn):
    """skill_tag's uniqueness is a unique index (repository_id, commit_sha, tag)."""
    a, b = pair
    a.sql("INSERT INTO repository (name, path, origin_url) "
          "VALUES ('acme', '/src/acme', 'git@example.com:acme.git')")
    rid = one(a, "SELECT id FROM repository")[0]
    a.cc.executemany("INSERT INTO skill_tag (repository_id, commit_sha, tag, weight) "
                     "VALUES (?, 'c1', ?, ?)", [(rid, t, w) for w, t in enumerate(
                         ["py", "js", "go", "css"])])
    assert_clean(converge(a, b))
    gone_go = one(a, "SELECT sync_id FROM skill_tag WHERE tag = 'go'")[0]
    a.sql(f"PRAGMA recursive_triggers = {recursive}")

    def twice():
        a.sql("UPDATE OR REPLACE skill_tag SET tag = 'py' WHERE tag = 'js'")   # py goes
        a.sql("INSERT OR REPLACE INTO skill_tag (repository_id, commit_sha, tag, weight) "
              "VALUES (?, 'c1', 'py', 42)", rid)                                # and again

    in_transaction(a, twice) if txn else twice()
    assert_clean(converge(a, b))

    def tags(dev):
        return dict(dev.sql("SELECT tag, weight FROM skill_tag"))

    assert_same(a, b)
    for dev in (a, b):
        assert tags(dev) == {"py": 42, "go": 2, "css": 3}, dev.name
    gone_py = one(a, "SELECT sync_id FROM skill_tag WHERE tag = 'py'")[0]

    a.sql("UPDATE OR REPLACE skill_tag SET tag = 'go' WHERE tag = 'py'")      # go goes
    assert_clean(converge(a, b))
    assert_same(a, b)
    for dev in (a, b):
        assert tags(dev) == {"go": 42, "css": 3}, dev.name
        # py, renamed onto go, takes go's id (its new key's); py's id is gone.
        have = {s for (s,) in dev.sql("SELECT sync_id FROM skill_tag")}
        assert gone_py not in have and gone_go in have, dev.name


@pytest.mark.parametrize("form", ["insert_or_replace", "replace_into",
                                  "insert_or_replace_select"])
def test_replace_of_the_same_key_syncs_as_an_edit_with_recursive_triggers(pair, recursive,
                                                                          form):
    a, b = pair
    seed_settings(a, b)
    a.sql(f"PRAGMA recursive_triggers = {recursive}")
    expected = run_rounds(a, FORMS[form], (1, 2), "autocommit", form)
    assert_clean(converge(a, b))
    assert_same(a, b)
    assert_settings(expected, a, b)
    expected = run_rounds(a, FORMS[form], (3, 4), "transaction", form)
    assert_clean(converge(a, b))
    assert_same(a, b)
    assert_settings(expected, a, b)
    assert len(a.sql("SELECT 1 FROM setting WHERE name = 'theme'")) == 1


##### 4. cc's own statements after stamp #######################################

@pytest.mark.parametrize("journal", JOURNALS)
@pytest.mark.parametrize("conn_kind", ["autocommit", "cc_connection"])
@pytest.mark.parametrize("existing", [True, False], ids=["existing_name", "new_name"])
def test_cc_setting_upsert_twice_for_one_name_after_stamp(pair, existing, conn_kind):
    a, b = pair
    if existing:
        a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'light')")
    assert a.store.prepare() == (1 if existing else 0)         # `ccsync stamp`

    conn = a.cc if conn_kind == "autocommit" else cc_connection(a)
    try:
        for value in ("dark", "solarized"):                      # the theme picker, twice
            for name, val in (("theme", value), ("accent", f"{value}-accent"),
                              ("contrast", f"{value}-contrast")):
                conn.execute(UPSERT, (name, val))
            conn.commit()
    finally:
        if conn is not a.cc:
            conn.close()
    assert_clean(converge(a, b))

    expected = {"theme": "solarized", "accent": "solarized-accent",
                "contrast": "solarized-contrast"}
    assert_settings(expected, a, b)
    assert_same(a, b)


SKILL_UPSERT = ("INSERT INTO skill_tag (repository_id, commit_sha, tag, weight, raw_loc, "
                "committed_at, top_files) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(repository_id, commit_sha, tag) DO UPDATE SET "
                "top_files = excluded.top_files WHERE skill_tag.top_files IS NULL")


@pytest.mark.parametrize("journal", JOURNALS)
@pytest.mark.parametrize("conn_kind", ["autocommit", "explicit_transaction", "cc_connection"])
def test_indexer_executemany_with_repeated_keys_loses_no_batch(pair, conn_kind):
    a, b = pair
    a.sql("INSERT INTO repository (name, path, origin_url) "
          "VALUES ('acme', '/src/acme', 'git@example.com:acme.git')")
    rid = one(a, "SELECT id FROM repository")[0]
    at = "2025-01-01T00:00:00"
    a.cc.executemany(SKILL_UPSERT, [(rid, "c1", t, 1, 10, at, None) for t in ("py", "js", "css")])
    assert_clean(converge(a, b))

    def batch(n):
        return [(rid, "c1", "py", 1, 10, at, f"py-{n}"),
                (rid, "c1", "py", 1, 10, at, f"py-{n}-late"),      # repeated key: ignored
                (rid, "c1", "js", 1, 10, at, None),
                (rid, "c1", "js", 1, 10, at, f"js-{n}"),
                (rid, "c2", "py", 2, 20, at, f"c2-py-{n}"),         # new row ...
                (rid, "c2", "py", 2, 20, at, f"c2-py-{n}-late")]    # ... repeated at once

    def run(rows):
        if conn_kind == "autocommit":
            a.cc.executemany(SKILL_UPSERT, rows)
        elif conn_kind == "explicit_transaction":
            in_transaction(a, lambda: a.cc.executemany(SKILL_UPSERT, rows))
        else:
            conn = cc_connection(a)
            try:
                conn.executemany(SKILL_UPSERT, rows)
                conn.commit()
            finally:
                conn.close()

    def top_files(dev):
        return {(sha, tag): top for sha, tag, top in dev.sql(
            "SELECT commit_sha, tag, top_files FROM skill_tag")}

    run(batch(1))
    a.sql("UPDATE skill_tag SET top_files = NULL WHERE repository_id = ?", rid)   # re-index
    run(batch(2))                                      # still before a sync
    want = {("c1", "py"): "py-2", ("c1", "js"): "js-2", ("c1", "css"): None,
            ("c2", "py"): "c2-py-2"}
    assert top_files(a) == want
    assert_clean(converge(a, b))
    assert top_files(b) == want
    assert_same(a, b)

    # and again after the sync
    a.sql("UPDATE skill_tag SET top_files = NULL WHERE commit_sha = 'c1'")
    run(batch(3))
    want = {("c1", "py"): "py-3", ("c1", "js"): "js-3", ("c1", "css"): None,
            ("c2", "py"): "c2-py-2"}
    assert_clean(converge(a, b))
    assert top_files(a) == want
    assert top_files(b) == want
    assert_same(a, b)


##### 5. many rows at once #####################################################

@pytest.mark.parametrize("txn,journal", [(False, "delete"), (True, "wal")],
                         ids=["autocommit-delete", "transaction-wal"])
def test_deletes_of_many_rows_sync_as_deletes(pair, txn):
    a, b = pair
    a.sql("INSERT INTO repository (name, path, origin_url) "
          "VALUES ('acme', '/src/acme', 'git@example.com:acme.git')")
    rid = one(a, "SELECT id FROM repository")[0]
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                     [(f"bulk.{i}", str(i)) for i in range(160)] + [("theme", "light")])
    a.cc.executemany("INSERT INTO skill_tag (repository_id, commit_sha, tag) VALUES (?, ?, ?)",
                     [(rid, f"c{i // 10}", f"t{i % 10}") for i in range(120)])
    assert_clean(converge(a, b, batch_size=64))
    assert len(settings(b)) == 161

    def twice():
        a.sql("DELETE FROM setting WHERE name LIKE 'bulk.%' AND id % 2 = 0")
        a.sql("DELETE FROM skill_tag WHERE commit_sha IN ('c0', 'c1', 'c2')")
        a.sql("DELETE FROM setting WHERE name LIKE 'bulk.%'")
        a.sql("DELETE FROM skill_tag")                                # cc's delete_all

    in_transaction(a, twice) if txn else twice()
    assert_clean(converge(a, b, batch_size=64))

    for dev in (a, b):
        assert settings(dev) == {"theme": "light"}, dev.name
        assert dev.sql("SELECT count(*) FROM skill_tag")[0][0] == 0, dev.name
    assert_same(a, b)

    # again after the sync: new rows, then all of them deleted before the next one
    a.cc.executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                     [(f"bulk.{i}", "again") for i in range(40)])
    assert_clean(converge(a, b, batch_size=64))
    assert len(settings(b)) == 41
    a.sql("DELETE FROM setting WHERE name LIKE 'bulk.%'")
    assert_clean(converge(a, b, batch_size=64))
    for dev in (a, b):
        assert settings(dev) == {"theme": "light"}, dev.name
    assert_same(a, b)


def test_rewrite_of_many_rows_twice_before_a_sync(pair):
    """Re-indexing: knowledge_index rows read, counts incremented, written back."""
    a, b = pair
    a.sql("INSERT INTO repository (name, path, origin_url) "
          "VALUES ('acme', '/src/acme', 'git@example.com:acme.git')")
    rid = one(a, "SELECT id FROM repository")[0]
    a.cc.executemany("INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, "
                     "commit_count) VALUES (?, ?, 'def', 0)",
                     [(rid, f"sym{i}") for i in range(150)])
    assert_clean(converge(a, b, batch_size=64))

    for _ in range(2):
        rows = a.sql("SELECT id, commit_count FROM knowledge_index")
        in_transaction(a, lambda: a.cc.executemany(
            "UPDATE knowledge_index SET commit_count = ?, last_touched = ? WHERE id = ?",
            [(n + 1, f"2025-01-0{n + 1}", i) for i, n in rows]))
    assert_clean(converge(a, b, batch_size=64))

    for dev in (a, b):
        assert dev.sql("SELECT DISTINCT commit_count FROM knowledge_index") == [(2,)], dev.name
    assert_same(a, b)


##### 6. schema changes ########################################################

@pytest.mark.parametrize("table,where", [("setting", "name = 'theme'"),
                                         ("project", "name = 'acme'")])
def test_added_column_is_captured_and_arrives_where_the_column_exists(pair, table, where):
    a, b = pair
    seed_settings(a, b)
    seed_project(a, b)
    a.sql("UPDATE setting SET value = 'before-alter' WHERE name = 'lang'")  # pending across it

    for dev in (a, b):                                    # cc's sync_schema on both devices
        dev.sql(f"ALTER TABLE {table} ADD COLUMN scope TEXT")
    a.sql(f"UPDATE {table} SET scope = 'user' WHERE {where}")
    a.sql(f"UPDATE {table} SET scope = 'global' WHERE {where}")           # twice
    assert_clean(converge(a, b))

    assert one(b, f"SELECT scope FROM {table} WHERE {where}")[0] == "global"
    assert settings(b)["lang"] == "before-alter"
    assert_same(a, b)

    # edits after the sync, of the new column and the old ones, both ways
    a.sql(f"UPDATE {table} SET scope = 'site' WHERE {where}")
    b.sql("UPDATE setting SET value = 'from-b' WHERE name = 'font'")
    assert_clean(converge(a, b))
    assert one(b, f"SELECT scope FROM {table} WHERE {where}")[0] == "site"
    assert settings(a)["font"] == "from-b"
    assert_same(a, b)

    b.sql(f"UPDATE {table} SET scope = 'from-b' WHERE {where}")
    assert_clean(converge(b, a))
    assert one(a, f"SELECT scope FROM {table} WHERE {where}")[0] == "from-b"
    assert_same(a, b)


def test_row_inserted_with_an_added_column_arrives_with_it(pair):
    a, b = pair
    seed_settings(a, b)
    for dev in (a, b):
        dev.sql("ALTER TABLE setting ADD COLUMN scope TEXT")
    a.sql("INSERT INTO setting (name, value, scope) VALUES ('editor', 'vim', 'user')")
    a.sql(UPSERT.replace("value = excluded.value", "value = excluded.value, scope = 'site'"),
          "editor", "emacs")
    assert_clean(converge(a, b))

    assert one(b, "SELECT value, scope FROM setting WHERE name = 'editor'") == ("emacs", "site")
    assert_same(a, b)


def test_renamed_column_edits_arrive_under_the_new_name(pair):
    a, b = pair
    seed_project(a, b)
    for dev in (a, b):
        dev.sql("ALTER TABLE environment RENAME COLUMN notes TO remarks")

    a.sql("UPDATE environment SET remarks = 'r1' WHERE name = 'dev'")
    a.sql("UPDATE environment SET remarks = 'r2' WHERE name = 'dev'")
    assert_clean(converge(a, b))

    assert one(b, "SELECT remarks FROM environment WHERE name = 'dev'")[0] == "r2"
    assert_same(a, b)

    b.sql("UPDATE environment SET remarks = 'from-b', branch_name = 'b' WHERE name = 'dev'")
    assert_clean(converge(b, a))
    assert one(a, "SELECT remarks, branch_name FROM environment") == ("from-b", "b")
    assert_same(a, b)


def test_edit_pending_when_a_column_is_renamed_still_arrives(pair):
    a, b = pair
    seed_project(a, b)
    a.sql("UPDATE environment SET notes = 'pending' WHERE name = 'dev'")   # not yet synced
    for dev in (a, b):
        dev.sql("ALTER TABLE environment RENAME COLUMN notes TO remarks")
    assert_clean(converge(a, b))

    assert one(b, "SELECT remarks FROM environment WHERE name = 'dev'")[0] == "pending"
    assert_same(a, b)


@pytest.mark.parametrize("txn", [False, True], ids=["autocommit", "transaction"])
def test_table_renamed_away_recreated_and_copied_keeps_syncing(pair, txn):
    a, b = pair
    seed_settings(a, b)
    a.sql("UPDATE setting SET value = 'pending-before' WHERE name = 'lang'")

    def migrate():
        a.sql("ALTER TABLE setting RENAME TO setting_old")
        a.sql(create_sql("setting"))
        a.sql("INSERT INTO setting SELECT * FROM setting_old")
        a.sql("DROP TABLE setting_old")

    in_transaction(a, migrate) if txn else migrate()
    # edits right after, before any sync
    a.sql("UPDATE setting SET value = 'dark' WHERE name = 'theme'")
    a.sql("UPDATE setting SET value = 'darker' WHERE name = 'theme'")
    a.sql("INSERT INTO setting (name, value) VALUES ('new.1', 'n1')")
    a.sql("DELETE FROM setting WHERE name = 'del.1'")
    assert_clean(converge(a, b))

    expected = {"theme": "darker", "lang": "pending-before", "new.1": "n1", "del.1": None}
    assert_settings(expected, a, b)
    assert_same(a, b)

    # and after the sync
    a.sql("UPDATE setting SET value = 'after' WHERE name = 'theme'")
    a.sql("UPDATE setting SET value = 'serif' WHERE name = 'font'")
    a.sql("UPDATE setting SET value = 'sans' WHERE name = 'font'")
    a.sql("DELETE FROM setting WHERE name = 'del.2'")
    assert_clean(converge(a, b))
    assert_settings({"theme": "after", "font": "sans", "del.2": None}, a, b)
    assert_same(a, b)


@pytest.mark.parametrize("table,txn,where", [
    ("setting", False, "one_device"), ("setting", True, "both_devices"),
    ("environment", True, "one_device"), ("environment", False, "both_devices")],
    ids=["setting-autocommit-one_device", "setting-transaction-both_devices",
         "environment-transaction-one_device", "environment-autocommit-both_devices"])
def test_cc_table_rebuild_keeps_syncing(pair, table, txn, where):
    """cc's sync_schema rebuild: CREATE t_temp_rebuild, copy, DROP t, RENAME back."""
    a, b = pair
    seed_settings(a, b)
    seed_project(a, b)
    cols = [r[1] for r in a.sql(f"PRAGMA table_info({table})")]
    col_list = ", ".join(cols)
    ddl = create_sql(table).replace(f"CREATE TABLE {table} (",
                                    f"CREATE TABLE {table}_temp_rebuild (", 1)
    indexes = [s for (s,) in a.sql("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                   "AND tbl_name = ? AND sql IS NOT NULL "
                                   "AND name NOT LIKE '\\_ccsync\\_%' ESCAPE '\\'", table)]

    def rebuild(dev):
        dev.sql(ddl)
        dev.sql(f"INSERT INTO {table}_temp_rebuild ({col_list}) SELECT {col_list} FROM {table}")
        dev.sql(f"DROP TABLE {table}")
        dev.sql(f"ALTER TABLE {table}_temp_rebuild RENAME TO {table}")
        for sql in indexes:
            dev.sql(sql)

    for dev in ((a, b) if where == "both_devices" else (a,)):
        in_transaction(dev, lambda: rebuild(dev)) if txn else rebuild(dev)

    # edits right after the rebuild, before a sync (twice), on both tables
    if table == "setting":
        a.sql("UPDATE setting SET value = 'r1' WHERE name = 'theme'")
        a.sql("UPDATE setting SET value = 'r2' WHERE name = 'theme'")
        a.sql("DELETE FROM setting WHERE name = 'del.1'")
    else:
        a.sql("UPDATE environment SET notes = 'r1' WHERE name = 'dev'")
        a.sql("UPDATE environment SET notes = 'r2' WHERE name = 'dev'")
    b.sql("UPDATE setting SET value = 'from-b' WHERE name = 'font'")
    assert_clean(converge(a, b))

    assert_same(a, b)
    assert settings(a)["font"] == "from-b"
    if table == "setting":
        assert_settings({"theme": "r2", "del.1": None}, a, b)
    else:
        assert one(b, "SELECT notes FROM environment")[0] == "r2"

    # and after the sync, both ways
    a.sql(f"UPDATE {table} SET name = name || '-x' WHERE name IN ('lang', 'dev')")
    b.sql("INSERT INTO setting (name, value) VALUES ('from-b.1', 'x')")
    assert_clean(converge(a, b))
    assert_same(a, b)
    if table == "setting":
        assert_settings({"lang-x": "en", "lang": None, "from-b.1": "x"}, a, b)
    else:
        assert one(b, "SELECT name FROM environment")[0] == "dev-x"
        assert_settings({"from-b.1": "x"}, a, b)


@pytest.mark.parametrize("journal", JOURNALS)
def test_vacuum_keeps_capture(pair):
    a, b = pair
    seed_settings(a, b)
    a.sql("UPDATE setting SET value = 'before-vacuum' WHERE name = 'theme'")   # pending
    a.sql("DELETE FROM setting WHERE name = 'del.1'")
    a.sql("VACUUM")
    a.sql("UPDATE setting SET value = 'after-vacuum' WHERE name = 'font'")
    a.sql("INSERT INTO setting (name, value) VALUES ('new.1', 'n1')")
    assert_clean(converge(a, b))

    expected = {"theme": "before-vacuum", "font": "after-vacuum", "new.1": "n1", "del.1": None}
    assert_settings(expected, a, b)
    assert_same(a, b)

    for dev in (a, b):
        dev.sql("VACUUM")
    a.sql("UPDATE setting SET value = 'v1' WHERE name = 'theme'")
    a.sql("UPDATE setting SET value = 'v2' WHERE name = 'theme'")
    b.sql("DELETE FROM setting WHERE name = 'del.2'")
    assert_clean(converge(a, b))
    assert_settings({"theme": "v2", "del.2": None}, a, b)
    assert_same(a, b)


BOOKKEEPING = set(ccsync.BOOKKEEPING_TABLES)


@pytest.mark.parametrize("journal", JOURNALS)
def test_remove_triggers_lets_drop_column_run_and_next_sync_reinstalls_capture(pair):
    a, b = pair
    seed_settings(a, b)
    seed_project(a, b)
    assert capture_triggers(a) and capture_triggers(b)
    before = {dev.name: (dev.store.device_id, dev.store.cursor) for dev in (a, b)}
    a.sql("UPDATE setting SET value = 'pending-before' WHERE name = 'theme'")

    for dev in (a, b):
        dev.store.remove_triggers()
        assert capture_triggers(dev) == [], dev.name
        tables = {n for (n,) in dev.sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert BOOKKEEPING <= tables, dev.name                     # only the triggers go
        assert (dev.store.device_id, dev.store.cursor) == before[dev.name]
        dev.sql("ALTER TABLE environment DROP COLUMN ssh_user")
        assert "ssh_user" not in [r[1] for r in dev.sql("PRAGMA table_info(environment)")]

    # an edit made while capture is off is not lost
    a.sql("UPDATE environment SET notes = 'while-off' WHERE name = 'dev'")
    assert_clean(converge(a, b))

    assert capture_triggers(a) and capture_triggers(b)            # re-installed by the sync
    assert one(b, "SELECT notes FROM environment")[0] == "while-off"
    assert settings(b)["theme"] == "pending-before"
    assert_same(a, b)

    # edits after the re-install sync, twice before a sync, both ways
    a.sql("UPDATE environment SET notes = 'after-1' WHERE name = 'dev'")
    a.sql("UPDATE environment SET notes = 'after-2', ssh_host = 'h2' WHERE name = 'dev'")
    b.sql("UPDATE environment SET branch_name = 'from-b' WHERE name = 'dev'")
    a.sql("UPDATE setting SET value = 't1' WHERE name = 'theme'")
    a.sql("UPDATE setting SET value = 't2' WHERE name = 'theme'")
    assert_clean(converge(a, b))
    for dev in (a, b):
        assert one(dev, "SELECT notes, ssh_host, branch_name FROM environment") == (
            "after-2", "h2", "from-b"), dev.name
    assert_settings({"theme": "t2"}, a, b)
    assert_same(a, b)


def test_prepare_after_remove_triggers_reinstalls_capture(pair):
    a, b = pair
    seed_project(a, b)
    a.store.remove_triggers()
    a.sql("ALTER TABLE environment DROP COLUMN ssh_user")
    b.store.remove_triggers()
    b.sql("ALTER TABLE environment DROP COLUMN ssh_user")

    a.store.prepare()
    b.store.prepare()
    assert capture_triggers(a) and capture_triggers(b)

    a.sql("UPDATE environment SET notes = 'x1' WHERE name = 'dev'")
    a.sql("UPDATE OR IGNORE environment SET notes = 'x2' WHERE name = 'dev'")
    assert_clean(converge(a, b))
    assert one(b, "SELECT notes FROM environment")[0] == "x2"
    assert_same(a, b)


def test_cli_stamp_remove_triggers_then_stamp_reinstalls(pair, monkeypatch, tmp_path,
                                                          capsys):
    for name in list(os.environ):
        if name.startswith(("CC_", "CCSYNC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    a, b = pair
    seed_project(a, b)
    db = str(a.path)

    assert ccsync.main(["stamp", "--db", db, "--remove-triggers"]) == 0
    capsys.readouterr()
    assert capture_triggers(a) == []
    assert a.sql("SELECT count(*) FROM _ccsync_shadow")[0][0] > 0     # bookkeeping stays
    a.sql("ALTER TABLE environment DROP COLUMN ssh_user")
    b.store.remove_triggers()
    b.sql("ALTER TABLE environment DROP COLUMN ssh_user")

    assert ccsync.main(["stamp", "--db", db]) == 0
    capsys.readouterr()
    assert capture_triggers(a)

    a.sql("UPDATE environment SET notes = 'after-cli' WHERE name = 'dev'")
    assert_clean(converge(a, b))
    assert one(b, "SELECT notes FROM environment")[0] == "after-cli"
    assert_same(a, b)
