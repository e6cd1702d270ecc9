"""Capture edge cases a reviewer found by attacking the write-form work, kept as
regressions: each in both journal modes, with and without recursive triggers on cc's
connection.
"""

from __future__ import annotations

import pytest

import ccsync
from conftest import content

MODES = [pytest.param((wal, rec), id=f"{'wal' if wal else 'delete'}-"
                      f"{'recursive' if rec else 'plain'}")
         for wal in (False, True) for rec in (False, True)]


@pytest.fixture(params=MODES)
def pair(request, devices):
    wal, rec = request.param
    a, b = devices("a", "b")
    for dev in (a, b):
        if wal:
            dev.cc.execute("PRAGMA journal_mode=WAL")
        if rec:
            dev.cc.execute("PRAGMA recursive_triggers=ON")
    return a, b


def converge(a, b, rounds: int = 2) -> None:
    for _ in range(rounds):
        a.sync()
        b.sync()


def settings(dev) -> list:
    return sorted(dev.sql("SELECT name, value FROM setting"))


def test_update_or_replace_moving_a_rowid_onto_another_row_deletes_it_everywhere(pair):
    a, b = pair
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sql("INSERT INTO setting (name, value) VALUES ('lang', 'en')")
    converge(a, b)
    theme, lang = (a.sql("SELECT id FROM setting WHERE name = ?", n)[0][0]
                   for n in ("theme", "lang"))
    a.sql("UPDATE OR REPLACE setting SET id = ? WHERE id = ?", lang, theme)
    converge(a, b)
    assert settings(a) == settings(b) == [("theme", "dark")]
    assert content(a.cc) == content(b.cc)


def test_a_table_renamed_aside_and_emptied_deletes_nothing_elsewhere(pair):
    a, b = pair
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    a.sql("INSERT INTO setting (name, value) VALUES ('lang', 'en')")
    converge(a, b)
    a.cc.executescript("""
        ALTER TABLE setting RENAME TO setting_old;
        CREATE TABLE setting (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
                              value TEXT, sync_id TEXT, synced_at TEXT);
        INSERT INTO setting (id, name, value, sync_id, synced_at)
            SELECT id, name, value, sync_id, synced_at FROM setting_old;
        DELETE FROM setting_old;
        DROP TABLE setting_old;
    """)
    a.sql("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    converge(a, b)
    assert settings(a) == settings(b) == [("lang", "en"), ("theme", "light")]


def test_a_row_created_and_deleted_never_deletes_a_renamed_row_holding_its_natural_id(pair):
    a, b = pair
    a.sql("INSERT INTO setting (name, value) VALUES ('x', 'keep me')")
    converge(a, b)
    a.sql("UPDATE setting SET name = 'y' WHERE name = 'x'")    # keeps uuid5('x') as its id
    converge(a, b)
    a.sql("INSERT INTO setting (name, value) VALUES ('x', 'temp')")
    a.sql("DELETE FROM setting WHERE name = 'x'")
    converge(a, b)
    assert settings(a) == settings(b) == [("y", "keep me")]


def test_an_orm_write_of_an_id_from_before_a_merge_keeps_the_merged_identity(pair):
    """cc read a row, ccsync then merged it into its natural-key twin's id, and cc
    wrote the record back with the old sync_id: the merged identity stays."""
    a, b = pair
    a.sql("INSERT INTO setting (name, value) VALUES ('x', 'orig')")
    converge(a, b)
    a.sql("UPDATE setting SET name = 'y' WHERE name = 'x'")
    converge(a, b)
    a.sql("INSERT INTO setting (name, value) VALUES ('x', 'from a')")   # random ids:
    b.sql("INSERT INTO setting (name, value) VALUES ('x', 'from b')")   # uuid5('x') is y's
    a.sync()
    ccsync.sync_once(b.store, b.transport, pull=False)
    rid, name, sid, synced = b.sql("SELECT id, name, sync_id, synced_at FROM setting "
                                   "WHERE name = 'x'")[0]          # cc reads its record
    b.sync()                                                       # the twins merge
    merged = b.sql("SELECT sync_id FROM setting WHERE id = ?", rid)[0][0]
    b.sql("UPDATE setting SET name = ?, value = ?, sync_id = ?, synced_at = ? WHERE id = ?",
          name, "b edit", sid, synced, rid)                        # cc's ORM write
    assert b.sql("SELECT sync_id FROM setting WHERE id = ?", rid)[0][0] == merged
    converge(a, b, 3)
    assert settings(a) == settings(b) == [("x", "b edit"), ("y", "orig")]


def test_a_renamed_setting_value_column_does_not_stop_sync(pair):
    a, b = pair
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    converge(a, b)
    a.sql("ALTER TABLE setting RENAME COLUMN value TO val")
    a.sql("UPDATE setting SET val = 'light'")
    a.sync()                                          # must not raise


def test_two_first_installs_at_once_both_back_up(tmp_path):
    from conftest import make_cc_db
    make_cc_db(tmp_path / "cc.db").close()
    stores = [ccsync.open_store(str(tmp_path / "cc.db")) for _ in range(3)]
    paths = [s._backup() for s in stores]
    assert len(set(paths)) == 3 and all(p.startswith(str(tmp_path / "cc.db.ccsync-backup-"))
                                        for p in paths)
    for s in stores:
        s.conn.close()
