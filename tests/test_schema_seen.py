"""A long-lived Store keeps its table layouts while PRAGMA schema_version is
unchanged since its last check of capture.  cc may change the schema at any
moment, also in the middle of that check: a column cc adds then must still be
captured and synced by that Store's next syncs (found by a review: the check
once compared the triggers with layouts read before the version it noted).
"""

from __future__ import annotations

import ccsync
from conftest import Device


def assert_the_new_column_syncs(a, b) -> None:
    """Later syncs, nothing else going on: a's edit of the new column reaches b."""
    for _ in range(2):
        a.sync(), b.sync()
    a.sql("UPDATE setting SET scope = 'user' WHERE name = 'theme'")
    for _ in range(3):
        a.sync(), b.sync()
    assert b.sql("SELECT scope FROM setting WHERE name = 'theme'") == [("user",)]


def test_column_added_during_prepare_is_synced_by_the_next_syncs(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a = Device(tmp_path / "a.db", server, "a")
    b = Device(tmp_path / "b.db", server, "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    for _ in range(2):
        a.sync(), b.sync()
    b.sql("ALTER TABLE setting ADD COLUMN scope TEXT")

    # cc (its own connection) adds a column while a's sync is in prepare():
    # after the check of capture read schema_version, before it reads the layouts.
    real = a.store.installed
    fired = []

    def installed():
        if not fired:
            fired.append(1)
            a.sql("ALTER TABLE setting ADD COLUMN scope TEXT")
        return real()

    a.store.installed = installed
    a.sync()
    del a.store.installed
    assert fired

    assert_the_new_column_syncs(a, b)


def test_column_added_right_after_install_commits_is_synced_later(tmp_path):
    # The same through prepare()'s other path: cc's migration waits for the
    # write lock while ccsync installs capture, and runs as soon as the install
    # commits -- before `self._up_to_date()  # notes the schema it left`.
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a = Device(tmp_path / "a.db", server, "a")
    b = Device(tmp_path / "b.db", server, "b")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'dark')")
    b.sql("ALTER TABLE setting ADD COLUMN scope TEXT")
    real = a.store._install
    fired = []

    def install():
        real()
        if not fired:
            fired.append(1)
            a.sql("ALTER TABLE setting ADD COLUMN scope TEXT")

    a.store._install = install
    a.sync()                       # the first sync installs capture
    del a.store._install
    assert fired
    assert_the_new_column_syncs(a, b)
