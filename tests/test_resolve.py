"""``resolve``, ``link`` and ``enable``: making pulled data usable on a new device.

Two simulated devices share one in-process server.  Device A has version
'17.0' and project 'acme' whose environment 'dev' lives in A's folders; device
B has its own version 'v17' in B's folders and pulls A's data.  Every path is
a real temporary directory.  Both "devices" share this machine's filesystem,
so once the sync is done A's home folder is moved away: from then on A's paths
do not exist "here", exactly as on a second machine.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import ccsync
from conftest import REPO

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")

PROJECT_DIR_NAME = "acme-addons"      # basename of A's project_path: not 'acme', not 'dev'


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for name in list(os.environ):               # CC_DB, CC_SERVER, CCSYNC_* ...
        if name.startswith(("CC_", "CCSYNC_", "GIT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))      # never the real ~/.cc-cli
    (tmp_path / "home").mkdir()


##### helpers ##################################################################

@dataclass
class World:
    a: object
    b: object
    tmp: Path
    a_version_dir: Path          # A's '17.0' (moved away after the sync)
    a_project_dir: Path          # A's project_path for acme/dev (moved away too)
    b_version_dir: Path | None   # B's own version folder (exists)
    clone_dir: Path              # B's sync.clone_dir, when a test sets it

    def set_clone_dir(self) -> Path:
        self.b.sql("INSERT INTO setting (name, value) VALUES ('sync.clone_dir', ?)",
                   str(self.clone_dir))
        return self.clone_dir


def make_world(devices, tmp_path, *, github_url=None, b_version=("v17", "v17"),
               b_version_dir_exists=True) -> World:
    a, b = devices("a", "b")
    a_home = tmp_path / "a_home"
    a_version_dir = a_home / "odoo17"
    a_project_dir = a_home / "work" / PROJECT_DIR_NAME
    a_version_dir.mkdir(parents=True)
    a_project_dir.mkdir(parents=True)
    a.sql("INSERT INTO version (name, path) VALUES ('17.0', ?)", str(a_version_dir))
    a.sql("INSERT INTO project (name) VALUES ('acme')")
    a.sql("INSERT INTO environment (name, project_path, github_url, project_id, version_id) "
          "VALUES ('dev', ?, ?, (SELECT id FROM project WHERE name = 'acme'), "
          "(SELECT id FROM version WHERE name = '17.0'))", str(a_project_dir), github_url)
    a.sync()

    b_version_dir = None
    if b_version is not None:
        name, folder = b_version
        b_version_dir = tmp_path / "b_home" / folder
        if b_version_dir_exists:
            b_version_dir.mkdir(parents=True)
        b.sql("INSERT INTO version (name, path) VALUES (?, ?)", name, str(b_version_dir))
    b.sync()
    # A's folders are on the other machine.
    a_home.rename(tmp_path / "a_home.on-the-other-machine")
    assert env_of(b) == {"version": "17.0", "project_path": str(a_project_dir),
                         "github_url": github_url}, "precondition: B pulled A's environment"
    return World(a, b, tmp_path, a_version_dir, a_project_dir, b_version_dir,
                 tmp_path / "b_home" / "clones")


def env_of(device) -> dict:
    rows = device.sql("SELECT v.name, e.project_path, e.github_url FROM environment e "
                      "JOIN project p ON p.id = e.project_id "
                      "LEFT JOIN version v ON v.id = e.version_id "
                      "WHERE p.name = 'acme' AND e.name = 'dev'")
    assert len(rows) == 1
    return dict(zip(("version", "project_path", "github_url"), rows[0]))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = ccsync.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def resolve(capsys, device, *flags) -> dict:
    code, out, err = run_cli(capsys, "resolve", "--db", str(device.path), "--json", *flags)
    assert code == 0, err
    return json.loads(out)


def path_changes(data: dict) -> list[dict]:
    return [c for c in data["changes"] if c["field"] == "project_path"]


def version_changes(data: dict) -> list[dict]:
    return [c for c in data["changes"] if c["field"] == "version_id"]


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(str(path))
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def git(*args, cwd=None) -> str:
    done = subprocess.run([GIT, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def bare_repo(tmp_path) -> tuple[str, str]:
    """A local bare repository with one commit: (file URL, commit sha)."""
    if GIT is None:
        pytest.skip("git is not installed")
    bare = tmp_path / "remote" / f"{PROJECT_DIR_NAME}.git"
    work = tmp_path / "remote" / "work"
    bare.parent.mkdir()
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git("init", "--quiet", "--initial-branch=main", str(work))
    (work / "__manifest__.py").write_text("{'name': 'acme'}\n")
    git("add", ".", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "first",
        cwd=work)
    git("push", "--quiet", str(bare), "main", cwd=work)
    return bare.as_uri(), git("rev-parse", "HEAD", cwd=work)


class _Silent(http.server.BaseHTTPRequestHandler):
    def log_message(self, *_args):
        pass


class _AskForPassword(_Silent):
    def do_GET(self):                       # noqa: N802
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="private"')
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def password_server():
    """An HTTP server that answers every request with 401 (git would ask for a password)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AskForPassword)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/acme/{PROJECT_DIR_NAME}.git"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a hung remote)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except (socket.timeout, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/acme/{PROJECT_DIR_NAME}.git"
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    listener.close()


##### version_digits ###########################################################

@pytest.mark.parametrize("name, digits", [
    ("v17", (17,)), ("17.0", (17,)), ("odoo-17", (17,)), ("17", (17,)),
    ("saas-17.2", (17, 2)), ("17.2", (17, 2)), ("", ()), (None, ()), ("master", ()),
])
def test_version_digits(name, digits):
    assert ccsync.version_digits(name) == digits


def test_version_digits_same_version_spelled_differently():
    assert ccsync.version_digits("v17") == ccsync.version_digits("17.0") \
        == ccsync.version_digits("odoo-17")
    assert ccsync.version_digits("saas-17.2") != ccsync.version_digits("17.0")


##### versions #################################################################

def test_resolve_repoints_environment_to_local_version_with_same_digits(devices, tmp_path,
                                                                         capsys):
    w = make_world(devices, tmp_path)

    data = resolve(capsys, w.b)

    assert data["dry_run"] is False
    assert version_changes(data) == [{
        "environment": "acme/dev", "id": version_changes(data)[0]["id"],
        "field": "version_id", "old": "17.0", "new": "v17", "how": "same version digits"}]
    assert env_of(w.b)["version"] == "v17"
    assert resolve(capsys, w.b)["changes"] == []


def test_resolve_with_resolver_directly(devices, tmp_path):
    w = make_world(devices, tmp_path)
    resolver = ccsync.Resolver(w.b.store)

    changes = resolver.plan()
    assert env_of(w.b)["version"] == "17.0", "plan() alone changes nothing"
    resolver.apply(changes)

    assert [(c["field"], c["new"]) for c in changes] == \
        [("version_id", "v17"), ("project_path", None)]
    assert env_of(w.b) == {"version": "v17", "project_path": None, "github_url": None}
    assert ccsync.Resolver(w.b.store).plan() == []


def test_resolve_leaves_version_alone_without_a_match_here(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path, b_version=("v16", "v16"))

    data = resolve(capsys, w.b)

    assert version_changes(data) == []
    assert env_of(w.b)["version"] == "17.0"


def test_resolve_ignores_a_matching_version_whose_path_is_missing_here(devices, tmp_path,
                                                                      capsys):
    w = make_world(devices, tmp_path, b_version_dir_exists=False)

    data = resolve(capsys, w.b)

    assert version_changes(data) == []
    assert env_of(w.b)["version"] == "17.0"


def test_same_named_version_keeps_this_devices_path(devices, tmp_path, capsys):
    # B has its own '17.0': the rows merge by name and B's path (device-local) stays.
    w = make_world(devices, tmp_path, b_version=("17.0", "odoo-17.0"))

    data = resolve(capsys, w.b)

    assert w.b.sql("SELECT path FROM version WHERE name = '17.0'") == [(str(w.b_version_dir),)]
    assert version_changes(data) == []
    assert env_of(w.b)["version"] == "17.0"


##### project paths ############################################################

def test_project_path_from_link(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)
    linked = tmp_path / "b_home" / "src" / "acme"
    linked.mkdir(parents=True)
    (w.b_version_dir / PROJECT_DIR_NAME).mkdir()        # a link wins over a folder found

    code, _out, err = run_cli(capsys, "link", "--project", "acme", "--path", str(linked),
                              "--db", str(w.b.path), "--json")
    assert code == 0, err
    data = resolve(capsys, w.b)

    assert path_changes(data) == [{
        "environment": "acme/dev", "id": path_changes(data)[0]["id"], "field": "project_path",
        "old": str(w.a_project_dir), "new": str(linked), "how": "linked path"}]
    assert env_of(w.b)["project_path"] == str(linked)
    assert resolve(capsys, w.b)["changes"] == []


def test_link_to_a_missing_folder_is_not_used(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)
    found = w.b_version_dir / PROJECT_DIR_NAME
    found.mkdir()
    ccsync.link_project(w.b.store, "acme", str(tmp_path / "b_home" / "not-there"))

    data = resolve(capsys, w.b)

    assert [(c["new"], c["how"]) for c in path_changes(data)] == \
        [(str(found), "found under the version's path")]


def test_project_path_found_under_the_local_versions_path(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)
    found = w.b_version_dir / PROJECT_DIR_NAME
    found.mkdir()

    data = resolve(capsys, w.b)

    assert path_changes(data) == [{
        "environment": "acme/dev", "id": path_changes(data)[0]["id"], "field": "project_path",
        "old": str(w.a_project_dir), "new": str(found),
        "how": "found under the version's path"}]
    assert env_of(w.b) == {"version": "v17", "project_path": str(found), "github_url": None}
    assert resolve(capsys, w.b)["changes"] == []


@needs_git
def test_project_path_cloned_from_github_url(devices, tmp_path, capsys, bare_repo):
    url, sha = bare_repo
    w = make_world(devices, tmp_path, github_url=url)
    clone_dir = w.set_clone_dir()
    target = clone_dir / PROJECT_DIR_NAME

    data = resolve(capsys, w.b, "--clone")

    assert [(c["old"], c["new"], c["how"]) for c in path_changes(data)] == \
        [(str(w.a_project_dir), str(target), "cloned")]
    assert (target / ".git").is_dir()
    assert (target / "__manifest__.py").is_file()
    assert git("rev-parse", "HEAD", cwd=target) == sha
    assert env_of(w.b)["project_path"] == str(target)
    assert env_of(w.b)["version"] == "v17"
    assert resolve(capsys, w.b, "--clone")["changes"] == []


@needs_git
def test_without_clone_flag_nothing_is_cloned(devices, tmp_path, capsys, bare_repo):
    url, _sha = bare_repo
    w = make_world(devices, tmp_path, github_url=url)
    clone_dir = w.set_clone_dir()

    data = resolve(capsys, w.b)

    assert [(c["new"], c["how"]) for c in path_changes(data)] == [(None, "cleared")]
    assert not clone_dir.exists()


def test_project_path_cleared_when_nothing_is_found(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)

    data = resolve(capsys, w.b)

    assert path_changes(data) == [{
        "environment": "acme/dev", "id": path_changes(data)[0]["id"], "field": "project_path",
        "old": str(w.a_project_dir), "new": None, "how": "cleared"}]
    assert env_of(w.b)["project_path"] is None
    assert resolve(capsys, w.b)["changes"] == []


def test_human_output_reports_each_change_then_nothing(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)

    code, out, _err = run_cli(capsys, "resolve", "--db", str(w.b.path))
    again = run_cli(capsys, "resolve", "--db", str(w.b.path))

    assert code == 0
    assert "acme/dev" in out and "'17.0' -> 'v17'" in out and "cleared" in out
    assert again[0] == 0 and "nothing to resolve" in again[1]


##### --dry-run ################################################################

def test_dry_run_lists_the_same_changes_and_changes_nothing(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)
    (w.b_version_dir / PROJECT_DIR_NAME).mkdir()
    before = dump(w.b.path)

    dry = resolve(capsys, w.b, "--dry-run")
    after = dump(w.b.path)
    real = resolve(capsys, w.b)

    assert dry["dry_run"] is True and real["dry_run"] is False
    assert after == before
    assert [c["field"] for c in dry["changes"]] == ["version_id", "project_path"]
    assert dry["changes"] == real["changes"]
    assert dump(w.b.path) != before


def test_dry_run_human_output_says_would_change(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)
    before = dump(w.b.path)

    code, out, _err = run_cli(capsys, "resolve", "--db", str(w.b.path), "--dry-run")

    assert code == 0 and "would change acme/dev" in out
    assert dump(w.b.path) == before


@needs_git
def test_dry_run_with_clone_clones_nothing_and_changes_nothing(devices, tmp_path, capsys,
                                                               bare_repo):
    url, _sha = bare_repo
    w = make_world(devices, tmp_path, github_url=url)
    clone_dir = w.set_clone_dir()
    w.b.store.prepare()             # stamp cc's new setting row: any ccsync call does
    before = dump(w.b.path)

    resolve(capsys, w.b, "--dry-run", "--clone")

    assert not clone_dir.exists()
    assert dump(w.b.path) == before


@needs_git
def test_dry_run_with_clone_lists_the_clone_it_would_make(devices, tmp_path, capsys,
                                                          bare_repo):
    # "--dry-run lists the same changes": a dry run must not announce that the
    # path would be cleared when the real run clones it.
    url, _sha = bare_repo
    w = make_world(devices, tmp_path, github_url=url)
    clone_dir = w.set_clone_dir()

    dry = resolve(capsys, w.b, "--dry-run", "--clone")
    assert not clone_dir.exists()
    real = resolve(capsys, w.b, "--clone")

    assert [c["new"] for c in path_changes(real)] == [str(clone_dir / PROJECT_DIR_NAME)]
    assert [c["new"] for c in path_changes(dry)] == [c["new"] for c in path_changes(real)]
    assert all(c["how"] != "cleared" for c in path_changes(dry))


##### device-local: nothing resolve does is synced ############################

def test_resolve_changes_are_not_pushed(devices, tmp_path, capsys):
    w = make_world(devices, tmp_path)
    found = w.b_version_dir / PROJECT_DIR_NAME
    found.mkdir()
    resolve(capsys, w.b)
    assert env_of(w.b) == {"version": "v17", "project_path": str(found), "github_url": None}

    pushed = w.b.push()
    w.a.sync()

    assert pushed.sent == 0
    assert env_of(w.a) == {"version": "17.0", "project_path": str(w.a_project_dir),
                           "github_url": None}
    assert w.b.sync().sent == 0
    assert env_of(w.b) == {"version": "v17", "project_path": str(found), "github_url": None}


def test_resolve_changes_are_not_sent_after_capture_is_reinstalled(devices, tmp_path, capsys):
    # A reinstall diffs every row against the shadow: the re-pointed version
    # must not look like an edit to send.
    w = make_world(devices, tmp_path)
    resolve(capsys, w.b)
    for (name,) in w.b.sql("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                           "AND tbl_name = 'environment'"):
        w.b.sql(f'DROP TRIGGER "{name}"')

    pushed = w.b.push()
    w.a.sync()

    assert pushed.sent == 0
    assert env_of(w.a)["version"] == "17.0"
    assert env_of(w.b)["version"] == "v17"


def test_resolved_version_survives_an_unrelated_edit_from_the_other_device(devices, tmp_path,
                                                                           capsys):
    w = make_world(devices, tmp_path)
    resolve(capsys, w.b)

    w.a.sql("UPDATE environment SET notes = 'from A' WHERE name = 'dev'")
    w.a.sync()
    w.b.sync()

    assert w.b.sql("SELECT notes FROM environment WHERE name = 'dev'") == [("from A",)]
    assert env_of(w.b)["version"] == "v17"
    assert env_of(w.a)["version"] == "17.0"


##### --clone failures: fast, non-interactive, no partial folder ##############

@needs_git
@pytest.mark.parametrize("url", ["missing-path", "https://127.0.0.1:9/x.git"])
def test_clone_failure_is_fast_and_leaves_nothing(devices, tmp_path, capsys, url):
    if url == "missing-path":
        url = str(tmp_path / "nowhere" / f"{PROJECT_DIR_NAME}.git")
    w = make_world(devices, tmp_path, github_url=url)
    clone_dir = w.set_clone_dir()

    started = time.monotonic()
    data = resolve(capsys, w.b, "--clone")
    elapsed = time.monotonic() - started

    assert elapsed < 30
    [change] = path_changes(data)
    assert change["new"] is None and change["how"] == "cleared"
    assert "clone" in change["note"] and "fail" in change["note"]
    assert not (clone_dir / PROJECT_DIR_NAME).exists()
    assert not clone_dir.exists() or list(clone_dir.iterdir()) == []
    assert env_of(w.b)["project_path"] is None
    assert resolve(capsys, w.b, "--clone")["changes"] == []


@needs_git
def test_clone_needing_a_password_fails_without_prompting(devices, tmp_path, capsys,
                                                          password_server):
    w = make_world(devices, tmp_path, github_url=password_server)
    clone_dir = w.set_clone_dir()

    started = time.monotonic()
    data = resolve(capsys, w.b, "--clone")

    assert time.monotonic() - started < 30
    [change] = path_changes(data)
    assert change["how"] == "cleared" and "clone failed" in change["note"]
    assert not (clone_dir / PROJECT_DIR_NAME).exists()


@needs_git
def test_clone_of_a_hung_remote_is_bounded_by_git_timeout(devices, tmp_path, silent_server):
    w = make_world(devices, tmp_path, github_url=silent_server)
    clone_dir = w.set_clone_dir()
    resolver = ccsync.Resolver(w.b.store, clone=True, git_timeout=2)

    started = time.monotonic()
    changes = resolver.plan()

    assert time.monotonic() - started < 20
    [change] = [c for c in changes if c["field"] == "project_path"]
    assert change["how"] == "cleared" and "clone failed" in change["note"]
    assert "timed out" in change["note"]
    assert not (clone_dir / PROJECT_DIR_NAME).exists()


@needs_git
def test_clone_into_an_existing_non_git_folder_is_refused(devices, tmp_path, capsys,
                                                          bare_repo):
    url, _sha = bare_repo
    w = make_world(devices, tmp_path, github_url=url)
    clone_dir = w.set_clone_dir()
    occupied = clone_dir / PROJECT_DIR_NAME
    occupied.mkdir(parents=True)
    (occupied / "mine.txt").write_text("keep me")

    data = resolve(capsys, w.b, "--clone")

    [change] = path_changes(data)
    assert change["how"] == "cleared" and "not a git checkout" in change["note"]
    assert (occupied / "mine.txt").read_text() == "keep me"


##### link #####################################################################

def test_link_records_and_lists(devices, tmp_path, capsys, monkeypatch):
    b = devices("b")
    (tmp_path / "work" / "acme").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")

    code, out, err = run_cli(capsys, "link", "--project", "acme", "--path", "acme",
                             "--db", str(b.path), "--json")
    assert code == 0, err
    assert json.loads(out) == {"project": "acme", "path": str(tmp_path / "work" / "acme")}

    code, out, err = run_cli(capsys, "link", "--db", str(b.path), "--json")
    assert code == 0, err
    listed = json.loads(out)["links"]
    assert [(l["project"], l["path"]) for l in listed] == \
        [("acme", str(tmp_path / "work" / "acme"))]
    assert listed[0]["at"]


def test_link_replaces_and_lists_in_order(devices, tmp_path, capsys):
    b = devices("b")
    db = str(b.path)
    for project, folder in (("zeta", "z"), ("acme", "old"), ("acme", "new")):
        assert run_cli(capsys, "link", "--project", project, "--path",
                       str(tmp_path / folder), "--db", db, "--json")[0] == 0

    code, out, _err = run_cli(capsys, "link", "--db", db, "--json")

    assert code == 0
    assert [(l["project"], l["path"]) for l in json.loads(out)["links"]] == \
        [("acme", str(tmp_path / "new")), ("zeta", str(tmp_path / "z"))]


def test_link_list_on_a_fresh_database_is_empty(devices, capsys):
    b = devices("b")

    code, out, err = run_cli(capsys, "link", "--db", str(b.path), "--json")
    human = run_cli(capsys, "link", "--db", str(b.path))

    assert code == 0, err
    assert json.loads(out) == {"links": []}
    assert human[0] == 0 and "no links" in human[1]


@pytest.mark.parametrize("argv", [["--project", "acme"], ["--path", "/somewhere"]])
def test_link_with_half_the_arguments_is_a_usage_error(devices, capsys, argv):
    b = devices("b")

    code, out, err = run_cli(capsys, "link", *argv, "--db", str(b.path))

    assert code == 2
    assert out == "" and "--project" in err and "--path" in err
    assert b.sql("SELECT name FROM sqlite_master WHERE name = '_ccsync_link'") == [] or \
        b.sql("SELECT * FROM _ccsync_link") == []


def test_links_are_never_synced(devices, tmp_path, server, capsys):
    w = make_world(devices, tmp_path)
    linked = tmp_path / "b_home" / "src" / "acme-linked-on-b"
    linked.mkdir(parents=True)
    assert run_cli(capsys, "link", "--project", "acme", "--path", str(linked),
                   "--db", str(w.b.path))[0] == 0

    pushed = w.b.sync()
    w.a.sync()

    assert pushed.sent == 0
    assert w.b.sql("SELECT project, path FROM _ccsync_link") == [("acme", str(linked))]
    assert w.a.sql("SELECT * FROM _ccsync_link") == []
    assert not any("acme-linked-on-b" in line for line in server.conn.iterdump())
    assert not any("acme-linked-on-b" in line for line in dump(w.a.path))


def test_clone_dir_setting_is_never_synced(devices, tmp_path, server):
    w = make_world(devices, tmp_path)
    w.set_clone_dir()

    assert w.b.sync().sent == 0
    w.a.sync()

    assert w.a.sql("SELECT * FROM setting WHERE name = 'sync.clone_dir'") == []
    assert not any("sync.clone_dir" in line for line in server.conn.iterdump())


##### enable ###################################################################

def test_enable_when_already_installed(capsys):
    code, out, err = run_cli(capsys, "enable", "--json")

    assert code == 0, err
    assert json.loads(out) == {"installed": True, "changed": False}


def test_enable_from_the_zipapp(tmp_path):
    pyz = tmp_path / "ccsync.pyz"
    subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "--output", str(pyz)],
                   check=True, capture_output=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CC_", "CCSYNC_"))}

    done = subprocess.run([sys.executable, str(pyz), "enable"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)

    assert done.returncode == 0, done.stderr
    assert "already installed" in done.stdout


##### enable without the package #############################################

def _bare_python(tmp_path, with_pip):
    """A fresh venv (no pycryptodomex), with or without pip.  Its pip is the
    test venv's own, put on its path by a .pth file (ensurepip would take
    seconds to install a copy)."""
    venv = tmp_path / ("venv_pip" if with_pip else "venv_nopip")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    if with_pip:
        import pip
        only_pip = tmp_path / "only_pip"
        only_pip.mkdir()
        (only_pip / "pip").symlink_to(Path(pip.__file__).parent)
        site = subprocess.run([str(python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"], check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        Path(site, "test_pip.pth").write_text(f"{only_pip}\n")
    return python


def test_enable_without_pip_says_so(tmp_path):
    python = _bare_python(tmp_path, with_pip=False)
    done = subprocess.run([str(python), str(REPO / "ccsync.py"), "enable"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("ccsync: error: pip is not available")
    assert "Traceback" not in done.stderr


def test_enable_offline_says_so(tmp_path):
    python = _bare_python(tmp_path, with_pip=True)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2"}
    env.pop("PIP_FIND_LINKS", None)
    done = subprocess.run([str(python), str(REPO / "ccsync.py"), "enable"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("ccsync: error: pip could not install pycryptodomex")
    assert "offline" in done.stderr and "Traceback" not in done.stderr
