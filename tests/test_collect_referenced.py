"""Collection of deleted rows that other rows may name (projects, environments,
versions, databases, repositories).

The server cannot see which live rows name a deleted one (under end-to-end
encryption it sees no values), so it asks: each report a device makes is
answered with deleted rows to ask about, and the device's next report says
which of them it still holds (the row, or a live row, an unsent edit or a
record kept for later that names it).  A row goes once every device seen
lately has said it holds nothing of it; a device joining later never meets
a reference to a row it cannot learn about.
"""

from __future__ import annotations

import time

import pytest

import ccsync
from conftest import Device, content, make_cc_db
from model_sim import E2E_VAULT
from test_collect import Clock, devices, sync_all
from test_transport import register, server_sql, signed, start_server  # noqa: F401


def stored(server, table: str) -> int:
    """How many records of ``table`` the server holds."""
    return server.conn.execute("SELECT count(*) FROM change WHERE tbl = ?",
                               (table,)).fetchone()[0]


def settle(server, *devs, cycles: int = 3) -> None:
    """Rounds of syncs with a collection after each: reports, asks, answers."""
    for _ in range(cycles):
        sync_all(*devs)
        server.collect()


def newcomer(tmp_path, server, name: str = "n", vault=None):
    """A device joining after the collection; it must end with nothing waiting."""
    (dev,) = devices(tmp_path, server, name)
    dev.transport.vault = vault
    dev.sync()
    assert dev.store.pending_references() == 0
    return dev


def acme(device) -> None:
    """A project with an environment (a version, a database) on ``device``."""
    device.sql("INSERT INTO version (name, path) VALUES ('17.0', '/odoo/17.0')")
    device.sql("INSERT INTO database (name) VALUES ('acme_db')")
    device.sql("INSERT INTO project (name, main_branch) VALUES ('acme', 'main')")
    device.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
               "project_path) VALUES ('main', 1, 1, 1, '/x')")


def acme_on_two(tmp_path, statement: str):
    """A server and devices a and b, synced, with acme and ``statement`` run on a."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    acme(a)
    a.sql(statement)
    sync_all(a, b)
    return server, a, b


def drop_acme(device) -> None:
    device.sql("DELETE FROM environment WHERE name = 'main'")
    device.sql("DELETE FROM project WHERE name = 'acme'")
    device.sql("DELETE FROM database")
    device.sql("DELETE FROM version")


def test_deleted_rows_no_live_row_names_go_once_every_device_says_so(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    acme(a)
    sync_all(a, b)
    drop_acme(b)
    sync_all(a, b)
    assert server.collect() == 0        # candidates now; no device has answered yet
    assert stored(server, "project") >= 1
    settle(server, a, b)
    for table in ("environment", "project", "database", "version"):
        assert stored(server, table) == 0, table
    n = newcomer(tmp_path, server)
    assert content(n.cc) == content(a.cc) == content(b.cc)
    assert not content(n.cc)["project"]
    # Nothing is left to ask about: an idle sync's report gets an empty ask.
    assert server.conn.execute("SELECT count(*) FROM candidate").fetchone()[0] == 0
    assert a.store.meta("pin_ask") is None


def test_a_deleted_environment_a_time_entry_made_elsewhere_needs_stays_until_it_goes(tmp_path):
    """b logs time on 'main' while a deletes it: 'main' comes back everywhere
    (a time entry needs its environment), the server still reads it as
    deleted, and b and a say they hold it: it stays.  Once the time entry
    is deleted too, the environment goes."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b = devices(tmp_path, server, "a", "b")
    acme(a)
    sync_all(a, b)
    a.sql("DELETE FROM environment")
    b.sql("INSERT INTO switch_log (environment_id, switched_at, flagged, source) "
          "VALUES (1, '2026-12-01T10:00:00', 0, 'cli')")
    settle(server, a, b)
    assert stored(server, "environment") >= 1
    assert [r[0] for r in a.sql("SELECT name FROM environment")] == ["main"]
    late = newcomer(tmp_path, server, "late")
    assert content(late.cc) == content(a.cc) == content(b.cc)
    b.sql("DELETE FROM switch_log")
    settle(server, a, b, late)
    assert stored(server, "environment") >= 1       # held: asked again only after a while
    clock.now += ccsync.PIN_RECHECK_S
    settle(server, a, b, late)
    assert stored(server, "environment") == 0
    assert not a.sql("SELECT name FROM environment")
    n = newcomer(tmp_path, server)
    assert content(n.cc) == content(a.cc) == content(b.cc) == content(late.cc)


def test_a_device_that_never_answers_holds_the_collection_back(tmp_path):
    """A device whose ccsync does not answer asks (an older version) is still
    counted: nothing of a referenced table goes while it is seen."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    b.store.pins = lambda row_id=None: None     # reports its cursor, never answers
    acme(a)
    sync_all(a, b)
    drop_acme(a)
    settle(server, a, b)
    assert stored(server, "project") >= 1
    del b.store.pins
    settle(server, a, b)
    assert stored(server, "project") == 0


def test_end_to_end_devices_answer_for_the_keyed_ids_the_server_knows(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    server.begin_e2e(E2E_VAULT.params(private=True), 0)
    a, b = devices(tmp_path, server, "a", "b")
    for dev in (a, b):
        dev.transport.vault = E2E_VAULT
    acme(a)
    a.sql("INSERT INTO project (name) VALUES ('globex')")
    a.sql("INSERT INTO environment (name, project_id, project_path) VALUES ('prod', 2, '/y')")
    sync_all(a, b)
    ids = {name: E2E_VAULT.row_id("project", sid)
           for name, sid in a.sql("SELECT name, sync_id FROM project")}
    drop_acme(b)
    b.sql("DELETE FROM project WHERE name = 'globex'")     # prod (still live) names it
    settle(server, a, b)
    assert stored(server, "version") == stored(server, "database") == 0
    projects = {sid for (sid,) in server.conn.execute("SELECT sid FROM change "
                                                      "WHERE tbl = 'project'")}
    assert projects == {ids["globex"]}              # acme went; prod names globex
    keyed = {sid for (sid,) in server.conn.execute("SELECT sid FROM change")}
    assert all(sid.startswith("e") and len(sid) == 41 for sid in keyed)
    n = newcomer(tmp_path, server, vault=E2E_VAULT)
    assert content(n.cc) == content(a.cc) == content(b.cc)


def test_answers_to_another_ask_and_malformed_pins_change_nothing(tmp_path):
    """Only an answer to the ask the device got last counts; whatever a
    report's pins hold, the server answers 200 and collects nothing a device
    did not say it no longer holds."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, b = devices(tmp_path, server, "a", "b")
    acme(a)
    sync_all(a, b)
    drop_acme(a)
    settle(server, a, b, cycles=1)
    report = dict(dev=b.store.device_id, merged=b.store.cursor)
    lines: list[str] = []
    http = ccsync.SyncServer(("127.0.0.1", 0), str(tmp_path / "server.db"), log=lines.append,
                             collect_every=3600)
    try:
        answer_badly(server, b, http, lines, report)
    finally:
        http.server_close()
    # a has not answered yet: nothing goes, whatever b said.
    assert server.collect() == 0 and stored(server, "project") >= 1


def answer_badly(server, b, http, lines, report):
    # Answers to another ask, or not an answer; the last is an answer whose
    # junk entries name nothing (so it says b holds none of the rows).
    for bad in ({"n": "N+1", "held": []}, {"n": True, "held": []}, {"n": "N", "held": "x"},
                [1], "x", None, 7, {"held": []},
                {"n": "N", "held": [["project", [1]], [1, 2], {}, None, ["a"], "x"]}):
        asked = server.note_reader("b", b.transport.author, **report)
        assert asked["rows"], "b has not answered yet"
        if isinstance(bad, dict) and bad.get("n") in ("N", "N+1"):
            bad = {**bad, "n": asked["n"] + (bad["n"] == "N+1")}
        headers, body = signed(b.key, "/v1/pull", {"cursor": b.store.cursor, "limit": 10,
                                                   **report, "pins": bad})
        status, _headers, answer = ccsync.dispatch(http, "POST", "/v1/pull", headers, body)
        assert status == 200, (bad, answer, lines[-3:])


def test_a_fresh_device_starting_from_nothing_is_asked_nothing(tmp_path):
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    a, = devices(tmp_path, server, "a")
    acme(a)
    a.sync()
    drop_acme(a)
    a.sync()
    server.collect()
    fresh = Device(tmp_path / "fresh.db", server, "fresh")
    assert server.note_reader("a", a.transport.author, a.store.device_id, 0) == \
        {"n": 0, "rows": []}
    assert fresh.store.pins() is None


def test_the_running_server_collects_a_deleted_project_end_to_end(tmp_path, start_server):
    """Over HTTP with encryption on, as users run it: reports, asks and
    answers travel in the pull requests, and the server's own collector
    drops the project once both devices have answered."""
    srv = start_server(collect_every=0.1)
    store = ccsync.ServerStore.open(srv.data_path)
    store.begin_e2e(E2E_VAULT.params(private=True), 0)
    store.conn.close()
    a = Device(tmp_path / "a.db", None, "a")
    b = Device(tmp_path / "b.db", None, "b")
    a.transport = ccsync.Client(srv.url, register(srv, "a"), vault=E2E_VAULT)
    b.transport = ccsync.Client(srv.url, register(srv, "b"), vault=E2E_VAULT)
    acme(a)
    sync_all(a, b)
    drop_acme(a)
    gone = 0
    for _ in range(50):                 # syncs, each followed by a collection or more
        sync_all(a, b, rounds=1)
        time.sleep(0.25)
        gone = server_sql(srv, "SELECT count(*) FROM change WHERE tbl IN "
                               "('project', 'environment', 'version', 'database')")[0][0]
        if not gone:
            break
    assert not gone, srv.lines
    assert not content(a.cc)["project"] and content(a.cc) == content(b.cc)
    a.transport.close()
    b.transport.close()


def test_a_record_kept_aside_for_a_table_cc_lacks_holds_the_row_it_names(tmp_path):
    """'lap' runs an older cc without the code index: it keeps the index
    entry aside.  The repository is deleted while the entry still names it,
    then the only other device retires.  lap's kept record holds the
    repository, so a newcomer still gets it (and brings it back for the
    entry) instead of an entry waiting for a parent that is gone."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, = devices(tmp_path, server, "a")
    a.sql("INSERT INTO repository (name, path) VALUES ('r', '/src/r')")
    a.sql("INSERT INTO knowledge_index (repository_id, symbol) VALUES (1, 'ledger')")
    a.sync()
    lap_path = tmp_path / "lap.db"
    make_cc_db(lap_path).executescript("DROP TABLE knowledge_index;")
    lap, = devices(tmp_path, server, "lap")
    lap.sync()
    assert lap.store.conn.execute("SELECT count(*) FROM _ccsync_held").fetchone()[0] == 1
    a.sql("DELETE FROM repository")     # the entry (NOT NULL) keeps it alive on a
    sync_all(a, lap)
    server.revoke("a")
    clock.now += ccsync.PIN_RECHECK_S
    settle(server, lap)
    assert stored(server, "repository") >= 1
    n = newcomer(tmp_path, server)
    assert [r[0] for r in n.sql("SELECT symbol FROM knowledge_index")] == ["ledger"]
    assert [r[0] for r in n.sql("SELECT name FROM repository")] == ["r"]


def log_time(device, when: str) -> None:
    device.sql("INSERT INTO switch_log (environment_id, switched_at, flagged, source) VALUES "
               "((SELECT id FROM environment WHERE name = 'main'), ?, 0, 'auto')", when)


@pytest.mark.parametrize("vault", [None, E2E_VAULT], ids=["plaintext", "e2e"])
def test_a_device_that_let_the_row_go_and_got_it_back_is_asked_again(tmp_path, vault):
    """A review's case: b says it holds nothing of the deleted 'main'; then a
    time entry a made on it arrives and brings 'main' back on b, which logs
    time on it too before a's entry is deleted.  b's old answer must not
    let 'main' go: a record that may name it is newer than that answer."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    if vault:
        server.begin_e2e(vault.params(private=True), 0)
    a, b = devices(tmp_path, server, "a", "b")
    a.transport.vault = b.transport.vault = vault
    acme(a)
    sync_all(a, b)
    a.sql("DELETE FROM environment")            # a deletes main while b logs time on it
    log_time(b, "2026-12-01T10:00:00")
    settle(server, a, b)
    log_time(a, "2026-12-01T11:00:00")          # not sent yet
    b.sql("DELETE FROM switch_log")
    b.sync()
    clock.now += ccsync.PIN_RECHECK_S + 1
    b.sync()
    b.sync()
    server.collect()
    assert not b.sql("SELECT 1 FROM environment")   # b let main go, and said so
    a.sync()
    b.sync()                                        # a's entry brings main back on b
    log_time(b, "2026-12-01T12:00:00")              # not sent yet
    a.sql("DELETE FROM switch_log")
    a.sync()
    clock.now += ccsync.PIN_RECHECK_S + 1
    a.sync()
    a.sync()                                        # a holds nothing of main now
    b.sync()                                        # b's entry goes out
    server.collect()
    assert stored(server, "environment") >= 1
    settle(server, a, b)
    n = newcomer(tmp_path, server, vault=vault)
    assert content(n.cc) == content(a.cc) == content(b.cc)
    assert [r[0] for r in n.sql("SELECT name FROM environment")] == ["main"]


def test_a_deleted_version_goes_while_one_machine_logs_time_at_every_sync(tmp_path):
    """The machine in use logs time at every sync; the other is idle.  A time
    entry may bring a deleted row back on a device that merges it, so an
    answer older than another device's newest entry does not count: the idle
    device answers again once its pull is merged, and a device's own entries
    never void its answer.  The version goes all the same."""
    server, a, b = acme_on_two(tmp_path, "INSERT INTO version (name, path) "
                                         "VALUES ('16.0', '/odoo/16.0')")
    a.sql("DELETE FROM version WHERE name = '16.0'")
    for i in range(6):
        log_time(a, f"2026-12-01T10:{i:02d}:00")
        a.sync()
        b.sync()
        server.collect()
    assert stored(server, "version") == 1          # 17.0, which 'main' names
    assert content(newcomer(tmp_path, server).cc) == content(a.cc) == content(b.cc)


def test_an_environment_a_project_lists_is_held(tmp_path):
    """project.environment_ids (an id list) names the environment: it stays."""
    server, a, b = acme_on_two(tmp_path, "UPDATE project SET environment_ids = '[1]'")
    b.sql("DELETE FROM environment")
    settle(server, a, b)
    assert stored(server, "environment") >= 1


def test_an_answer_to_an_earlier_ask_is_ignored_after_an_empty_one(tmp_path):
    """b said it holds the deleted version; the server then had nothing to ask
    it, and asked again an hour later.  An answer b gave to the first ask,
    arriving now (a lost response, or a copy of b's database restored), must
    not count for the new one: b's last word is that it holds the row."""
    clock = Clock()
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), clock=clock)
    a, b = devices(tmp_path, server, "a", "b")
    acme(a)
    a.sql("INSERT INTO version (name, path) VALUES ('16.0', '/odoo/16.0')")
    sync_all(a, b)
    a.sql("DELETE FROM version WHERE name = '16.0'")
    settle(server, a, b, cycles=1)
    report = dict(dev=b.store.device_id, merged=b.store.cursor)
    first = server.note_reader("b", b.transport.author, **report)
    assert first["rows"]
    holds = {"n": first["n"], "held": first["rows"]}
    assert server.note_reader("b", b.transport.author, **report, pins=holds)["rows"] == []
    clock.now += ccsync.PIN_RECHECK_S + 1
    again = server.note_reader("b", b.transport.author, **report)
    assert again["rows"] == first["rows"]
    late = {"n": first["n"], "held": []}               # b's answer to the first ask
    server.note_reader("b", b.transport.author, **report, pins=late)
    for _ in range(3):
        a.sync()
        server.collect()
    assert stored(server, "version") >= 2              # 16.0 (b holds it) and 17.0


def staging_deleted_then_newcomer(tmp_path):
    """acme listing environments main and staging on a and b; b deletes
    staging (cc leaves its id in the list); then a device joins."""
    server, a, b = acme_on_two(tmp_path, "UPDATE project SET environment_ids = '[1]'")
    a.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('staging', 1, 1, 1, '/y')")
    a.sql("UPDATE project SET environment_ids = '[1,2]'")
    sync_all(a, b)
    b.sql("DELETE FROM environment WHERE name = 'staging'")
    settle(server, a, b)
    late = newcomer(tmp_path, server)
    return server, a, b, late


def test_a_newcomer_takes_a_project_whose_list_names_a_deleted_environment(tmp_path):
    """cc deletes an environment and leaves its id in the project's
    environment_ids.  A device joining later learns the environment only as
    deleted: the project must arrive (its list without that id, as on a
    device where the id no longer resolves), not wait for it for good."""
    server, a, b, late = staging_deleted_then_newcomer(tmp_path)
    assert late.cc.execute("SELECT name FROM project").fetchall() == [("acme",)]
    ids = late.cc.execute("SELECT environment_ids FROM project").fetchone()[0]
    main = late.cc.execute("SELECT id FROM environment WHERE name = 'main'").fetchone()[0]
    assert ids == f"[{main}]"


def test_an_environment_back_from_the_dead_returns_to_the_list(tmp_path):
    """The newcomer left the deleted environment out of the project's list;
    cc on a creates it again (same project, same name: the same row): the
    list on the newcomer names it again, without an edit of the project."""
    server, a, b, late = staging_deleted_then_newcomer(tmp_path)
    a.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('staging', 1, 1, 1, '/y')")
    sync_all(a, b, late)
    late.sync()
    assert late.store.pending_references() == 0
    envs = dict(late.cc.execute("SELECT name, id FROM environment").fetchall())
    ids = late.cc.execute("SELECT environment_ids FROM project").fetchone()[0]
    assert sorted(ccsync.json.loads(ids)) == sorted([envs["main"], envs["staging"]])


@pytest.mark.parametrize("who, delete", [("late", True), ("a", True), ("late", False)])
def test_a_full_diff_leaves_a_list_that_lost_only_deleted_ids_as_it_was(tmp_path, who, delete):
    """Capture went off on a device (a cc migration rebuilt project): the
    diff finds its environment_ids without the deleted environment's id
    (merged from elsewhere, or never known) while the synced state still
    names it.  That is no edit: timing it now would beat a real, earlier
    edit of the list made on another device."""
    server, a, b = acme_on_two(tmp_path, "UPDATE project SET environment_ids = '[1]'")
    a.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('staging', 1, 1, 1, '/y')")
    a.sql("UPDATE project SET environment_ids = '[1,2]'")
    sync_all(a, b)
    if delete:
        b.sql("DELETE FROM environment WHERE name = 'staging'")
    settle(server, a, b)
    late = newcomer(tmp_path, server)
    b.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('prod', 1, 1, 1, '/p')")
    prod = b.sql("SELECT id FROM environment WHERE name = 'prod'")[0][0]
    b.sql(f"UPDATE project SET environment_ids = '[1,{prod}]'")     # a real edit, on b
    b.sync()
    dev = {"a": a, "late": late}[who]
    for (trigger,) in dev.sql("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                              "AND tbl_name = 'project'"):
        dev.sql(f'DROP TRIGGER "{trigger}"')
    dev.store = ccsync.open_store(str(dev.path))
    dev.sync()                                          # the diff, then the sync
    sync_all(a, b, late)
    for device in (a, b, late):
        listed = device.sql("SELECT e.name FROM project p, json_each(p.environment_ids) j "
                            "JOIN environment e ON e.id = j.value")
        assert ("prod",) in listed, (device.path.name, listed)


def listed(device) -> list[str]:
    return sorted(n for (n,) in device.sql(
        "SELECT e.name FROM project p, json_each(p.environment_ids) j "
        "JOIN environment e ON e.id = j.value"))


@pytest.mark.parametrize("off", ["'project', 'environment'", "'project'"],
                         ids=["delete-found-by-the-diff", "delete-captured"])
def test_a_full_diff_keeps_a_list_edit_that_left_out_an_environment_deleted_here(tmp_path, off):
    """With capture off (a cc migration), cc on a deletes 'staging' and
    writes the project's list without it; b meanwhile logs time on staging,
    so the delete loses and staging comes back.  The list a wrote is an
    edit all the same: it was once taken for a list that only lost ids of
    rows deleted elsewhere, and went nowhere (a and b listed differently)."""
    server, a, b = acme_on_two(tmp_path, "UPDATE project SET environment_ids = '[1]'")
    a.sql("INSERT INTO environment (name, project_id, version_id, database_id, "
          "project_path) VALUES ('staging', 1, 1, 1, '/y')")
    a.sql("UPDATE project SET environment_ids = '[1,2]'")
    sync_all(a, b)
    for (trigger,) in a.sql("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                            f"AND tbl_name IN ({off})"):
        a.sql(f'DROP TRIGGER "{trigger}"')
    a.sql("DELETE FROM environment WHERE name = 'staging'")
    a.sql("UPDATE project SET environment_ids = '[1]'")
    b.sql("INSERT INTO switch_log (environment_id, switched_at, flagged, source) VALUES "
          "((SELECT id FROM environment WHERE name = 'staging'), '2026-12-01T10:00:00', 0, "
          "'cli')")
    b.sync()
    a.store = ccsync.open_store(str(a.path))
    settle(server, a, b)
    assert [n for (n,) in a.sql("SELECT name FROM environment ORDER BY name")] == \
        ["main", "staging"]
    assert listed(a) == listed(b) == ["main"]
    assert content(a.cc) == content(b.cc)
