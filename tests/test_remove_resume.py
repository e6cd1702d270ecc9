"""``stamp --remove`` and back: edits and deletes cc made meanwhile are found at the next
stamp, timed when found, and win over edits other devices made before that.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

from conftest import REPO


def converge(*devs, rounds: int = 2) -> None:
    for _ in range(rounds):
        for dev in devs:
            result = dev.sync()
            assert not result.refused and not result.pulled.refused, result.as_dict()


def bookkeeping(dev) -> list:
    return dev.sql("SELECT name FROM sqlite_master WHERE name LIKE '\\_ccsync\\_%' ESCAPE '\\'")


def test_edits_and_deletes_made_while_removed_are_found_at_the_next_stamp(devices):
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('globex', 'master')")
    a.sql("INSERT INTO setting (name, value) VALUES ('theme', 'light')")
    converge(a, b)

    kept = a.store.remove()
    assert bookkeeping(a) == [], "the database is clean after stamp --remove"
    assert kept == f"{a.path}.ccsync-state"
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    b.sql("UPDATE project SET main_branch = 'b-older' WHERE name = 'acme'")   # before a's
    b.sync()
    time.sleep(0.01)
    a.sql("UPDATE project SET main_branch = 'a-while-off' WHERE name = 'acme'")
    a.sql("DELETE FROM project WHERE name = 'globex'")
    a.sql("INSERT INTO setting (name, value) VALUES ('default_version', '17.0')")

    a.store.prepare()                        # `ccsync stamp`: resumes from the kept state
    assert not os.path.exists(kept), "the kept state is used once"
    converge(a, b)
    for dev in (a, b):
        assert dev.sql("SELECT name, main_branch FROM project") == [("acme", "a-while-off")]
        assert dict(dev.sql("SELECT name, value FROM setting")) == {
            "theme": "light", "default_version": "17.0"}


def test_a_fresh_start_after_removing_the_kept_state(devices):
    """Deleting the kept state is starting over: rows count as older than any edit."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    converge(a, b)
    os.unlink(a.store.remove())
    b.sql("UPDATE project SET main_branch = 'b-edit' WHERE name = 'acme'")
    converge(a, b)
    for dev in (a, b):
        assert dev.sql("SELECT main_branch FROM project") == [("b-edit",)]


def test_stamp_remove_on_the_command_line_says_where_the_state_is(devices, tmp_path):
    a = devices("a")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sync()
    env = {**os.environ, "CC_DB": str(a.path)}
    done = subprocess.run([sys.executable, str(REPO / "ccsync.py"), "stamp", "--remove"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{a.path}.ccsync-state" in done.stdout
    done = subprocess.run([sys.executable, str(REPO / "ccsync.py"), "stamp"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(f"{a.path}.ccsync-state")


def test_a_damaged_kept_state_means_a_fresh_start(devices):
    a = devices("a")
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sync()
    kept = a.store.remove()
    with open(kept, "wb") as fh:
        fh.write(b"not a database" * 100)
    a.store.prepare()                      # no traceback: starts afresh, rows at clock 0
    assert a.sql("SELECT name FROM project") == [("acme",)]
    assert a.store.pending()["project"]["insert"] == 1


def test_an_edit_between_two_remove_triggers_is_still_found(devices):
    """Capture off twice in a row: the second time must not take what cc changed
    since the first for values captured before capture went off."""
    a, b = devices("a", "b")
    a.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'master')")
    converge(a, b)
    a.sql("UPDATE project SET main_branch = 'y'")        # captured, not sent
    a.store.remove_triggers()
    a.sql("UPDATE project SET home_repo = 'git@h:acme.git'")   # no trigger sees this one
    a.store.remove_triggers()
    converge(a, b)
    assert b.sql("SELECT main_branch, home_repo FROM project") == [("y", "git@h:acme.git")]
