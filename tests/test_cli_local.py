"""The local command line: ``stamp`` and ``status``, in-process and as a real process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import ccsync
from conftest import REPO, make_cc_db


def cc_db(path: Path, projects=("acme", "beta")) -> Path:
    conn = make_cc_db(path)
    conn.executemany("INSERT INTO project (name) VALUES (?)", [(p,) for p in projects])
    conn.execute("INSERT INTO version (name, path) VALUES ('17.0', '/src/17')")
    conn.close()
    return path


def backup_of(db) -> str:
    """The one backup ccsync made beside ``db`` before its first change (mode 600)."""
    found = list(Path(db).parent.glob(Path(db).name + ".ccsync-backup-*"))
    assert len(found) == 1, found
    assert found[0].stat().st_mode & 0o777 == 0o600
    return str(found[0])


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = ccsync.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv, env_extra=None, home=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CC_", "CCSYNC_"))}
    if home is not None:
        env["HOME"] = str(home)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "ccsync", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def _no_cc_db_env(monkeypatch, tmp_path):
    for name in list(os.environ):               # CC_DB, CC_SERVER, CCSYNC_* ...
        if name.startswith(("CC_", "CCSYNC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))      # never the real ~/.cc-cli


##### stamp ####################################################################

def test_stamp_json_reports_rows_stamped_then_zero(tmp_path, capsys):
    db = str(cc_db(tmp_path / "cc.db"))

    first = run_main(capsys, "stamp", "--db", db, "--json")
    second = run_main(capsys, "stamp", "--db", db, "--json")

    assert first[0] == 0 and json.loads(first[1]) == {"stamped": 3, "backup": backup_of(db)}
    assert second[0] == 0 and json.loads(second[1]) == {"stamped": 0, "backup": None}


def test_stamp_json_as_a_process(tmp_path):
    db = str(cc_db(tmp_path / "cc.db"))

    first = run_process("stamp", "--db", db, "--json")
    second = run_process("stamp", "--db", db, "--json")

    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"stamped": 3, "backup": backup_of(db)}
    assert json.loads(second.stdout) == {"stamped": 0, "backup": None}
    assert first.stderr == "" and second.stderr == ""


def test_stamp_gives_every_row_a_sync_id(tmp_path, capsys):
    db = cc_db(tmp_path / "cc.db")

    run_main(capsys, "stamp", "--db", str(db))

    conn = sqlite3.connect(str(db))
    assert conn.execute("SELECT count(*) FROM project WHERE sync_id IS NULL").fetchone() == (0,)
    conn.close()


def test_stamp_remove_takes_out_ccsync_but_keeps_sync_ids(tmp_path, capsys):
    db = cc_db(tmp_path / "cc.db")
    run_main(capsys, "stamp", "--db", str(db))

    code, out, _ = run_main(capsys, "stamp", "--remove", "--db", str(db), "--json")

    assert code == 0 and json.loads(out) == {"removed": True, "state": f"{db}.ccsync-state"}
    conn = sqlite3.connect(str(db))
    assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '\\_ccsync\\_%' "
                        "ESCAPE '\\'").fetchall() == []
    assert conn.execute("SELECT count(*) FROM project WHERE sync_id IS NOT NULL"
                        ).fetchone() == (2,)
    conn.execute("INSERT INTO project (name) VALUES ('after-remove')")   # cc still works
    conn.commit()
    conn.close()


def test_stamp_remove_as_a_process(tmp_path):
    db = str(cc_db(tmp_path / "cc.db"))
    run_process("stamp", "--db", db)

    result = run_process("stamp", "--remove", "--db", db)

    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout
    status = run_process("status", "--db", db, "--json")
    assert json.loads(status.stdout)["installed"] is False


##### status ###################################################################

def test_status_json_lists_pending_changes_per_table(tmp_path, capsys):
    db = cc_db(tmp_path / "cc.db")
    run_main(capsys, "stamp", "--db", str(db))

    code, out, _ = run_main(capsys, "status", "--db", str(db), "--json")

    data = json.loads(out)
    assert code == 0
    assert data["pending"]["project"] == {"insert": 2, "update": 0, "delete": 0}
    assert data["pending"]["version"] == {"insert": 1, "update": 0, "delete": 0}
    assert data["pending"]["setting"] == {"insert": 0, "update": 0, "delete": 0}
    assert set(data["pending"]) == {s.name for s in ccsync.SPEC}
    assert data["refused"] == [] and data["installed"] is True


def test_status_json_before_stamp_counts_rows_as_inserts(tmp_path, capsys):
    db = cc_db(tmp_path / "cc.db")

    code, out, _ = run_main(capsys, "status", "--db", str(db), "--json")

    data = json.loads(out)
    assert code == 0 and data["installed"] is False
    assert data["pending"]["project"] == {"insert": 2, "update": 0, "delete": 0}


def test_status_does_not_count_secret_settings(tmp_path, capsys):
    db = cc_db(tmp_path / "cc.db")
    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("INSERT INTO setting (name, value) VALUES ('github_pat', 'ghp_x'), "
                 "('theme', 'dark')")
    conn.close()
    run_main(capsys, "stamp", "--db", str(db))

    _, out, _ = run_main(capsys, "status", "--db", str(db), "--json")

    assert json.loads(out)["pending"]["setting"] == {"insert": 1, "update": 0, "delete": 0}


def test_status_json_as_a_process(tmp_path):
    db = str(cc_db(tmp_path / "cc.db"))
    run_process("stamp", "--db", db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE project SET main_branch = 'x' WHERE name = 'acme'")
    conn.close()

    result = run_process("status", "--db", db, "--json")

    assert result.returncode == 0, result.stderr
    pending = json.loads(result.stdout)["pending"]
    assert pending["project"] == {"insert": 2, "update": 0, "delete": 0}   # never synced yet


def test_status_human_output_names_tables(tmp_path, capsys):
    db = cc_db(tmp_path / "cc.db")
    run_main(capsys, "stamp", "--db", str(db))

    code, out, _ = run_main(capsys, "status", "--db", str(db))

    assert code == 0
    assert "project" in out and "version" in out


##### $CC_DB ###################################################################

def test_cc_db_env_var_is_used_without_db_option(tmp_path, capsys, monkeypatch):
    db = cc_db(tmp_path / "cc.db")
    monkeypatch.setenv("CC_DB", str(db))

    code, out, _ = run_main(capsys, "stamp", "--json")

    assert code == 0 and json.loads(out)["stamped"] == 3


def test_cc_db_env_var_is_used_by_a_process(tmp_path):
    db = str(cc_db(tmp_path / "cc.db"))

    result = run_process("status", "--json", env_extra={"CC_DB": db})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending"]["project"]["insert"] == 2


def test_db_option_wins_over_cc_db_env_var(tmp_path, capsys, monkeypatch):
    used = cc_db(tmp_path / "used.db", projects=("one",))
    monkeypatch.setenv("CC_DB", str(tmp_path / "missing.db"))

    code, out, _ = run_main(capsys, "stamp", "--db", str(used), "--json")

    assert code == 0 and json.loads(out)["stamped"] == 2


##### errors ###################################################################

def _one_error_line(err: str) -> None:
    lines = err.splitlines()
    assert "Traceback" not in err
    assert len([l for l in lines if l.startswith("ccsync: error:")]) == 1, err
    assert lines[0].startswith("ccsync: error:")


def test_missing_database_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.db"

    code, out, err = run_main(capsys, "status", "--db", str(missing))

    assert code == 1 and out == ""
    _one_error_line(err)
    assert str(missing) in err
    assert not missing.exists()                 # nothing was created


def test_missing_database_as_a_process(tmp_path):
    result = run_process("stamp", "--db", str(tmp_path / "nope.db"))

    assert result.returncode == 1
    _one_error_line(result.stderr)


def test_missing_default_database_is_a_one_line_error(tmp_path):
    result = run_process("status", home=tmp_path / "home")

    assert result.returncode == 1
    _one_error_line(result.stderr)
    assert ".cc-cli" in result.stderr


def test_unknown_option_exits_2(tmp_path, capsys):
    db = str(cc_db(tmp_path / "cc.db"))

    code, _, err = run_main(capsys, "stamp", "--db", db, "--bogus")

    assert code == 2
    assert "Traceback" not in err and "--bogus" in err


def test_unknown_option_as_a_process_exits_2(tmp_path):
    result = run_process("status", "--no-such-option")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--no-such-option" in result.stderr


def test_unknown_command_exits_2(capsys):
    code, _, err = run_main(capsys, "frobnicate")

    assert code == 2 and "Traceback" not in err


def test_no_command_shows_the_status(capsys, tmp_path, monkeypatch):
    # As `cc sync` alone does; never the real ~/.cc-cli of the machine running the tests.
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("CC_DB", "CC_SERVER", "CC_API_KEY", "CCSYNC_E2E_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".cc-cli").mkdir()
    cc_db(tmp_path / ".cc-cli" / "cc_cli.db")
    code, out, err = run_main(capsys)
    assert code == 0, err
    assert "pending" in out and "server: not configured" in out


@pytest.mark.parametrize("options", [["--json"], ["--debug"], ["--db", "{db}"], ["--json",
                                                                         "--db", "{db}"]])
def test_global_options_alone_show_the_status_too(capsys, tmp_path, monkeypatch, options):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("CC_DB", "CC_SERVER", "CC_API_KEY", "CCSYNC_SERVER", "CCSYNC_API_KEY",
                 "CCSYNC_E2E_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".cc-cli").mkdir()
    cc_db(tmp_path / ".cc-cli" / "cc_cli.db")
    other = cc_db(tmp_path / "other.db", projects=("only",))
    code, out, err = run_main(capsys, *(o.format(db=other) for o in options))
    assert code == 0, err
    if "--json" in options:
        shown = json.loads(out)
        assert shown["pending"]["project"]["insert"] == (1 if "--db" in options else 2)
    else:
        assert "pending" in out and "server: not configured" in out


def test_ccsyncs_own_names_outrank_ccs_wherever_each_is_set(tmp_path, monkeypatch):
    # setup writes CCSYNC_ names to ~/.cc-cli/.env; cc's CC_ names, inherited
    # from cc's environment, must not take the server (and pair it with ccsync's key).
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cc-cli").mkdir()
    env_file = tmp_path / ".cc-cli" / ".env"
    env_file.write_text("CCSYNC_SERVER=http://ours:9100\nCCSYNC_API_KEY=ours-key\n")
    config = ccsync.load_config({"CC_SERVER": "http://cc:8000", "CC_API_KEY": "cc-key"})
    assert (config.server, config.api_key) == ("http://ours:9100", "ours-key")
    assert config.cc_sync == "the environment"          # and status says cc's is set
    config = ccsync.load_config({"CCSYNC_SERVER": "http://elsewhere:9100"})
    assert (config.server, config.api_key) == ("http://elsewhere:9100", "ours-key")
    env_file.write_text("CC_SERVER=http://cc-docs:9100\nCC_API_KEY=docs-key\n")
    config = ccsync.load_config({})                     # cc's names where they are all there is
    assert (config.server, config.api_key) == ("http://cc-docs:9100", "docs-key")
    config = ccsync.load_config({"CCSYNC_API_KEY": "ours-key"})
    assert (config.server, config.api_key) == (None, "ours-key")   # never cc's server with it


ALL_COMMANDS = ("server", "register", "reset-store", "devices", "revoke", "setup", "push",
                "pull", "sync", "status", "stamp", "daemon", "resolve", "link", "install",
                "enable", "demo")


@pytest.mark.parametrize("argv", [["--help"], ["-h", "status"], ["--json", "--help", "sync"]])
def test_help_before_a_command_lists_every_command(capsys, argv):
    # Only the parser of the command run is made; help asked for before it lists them all.
    with pytest.raises(SystemExit) as done:
        ccsync.main(argv)
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in ALL_COMMANDS), shown


@pytest.mark.parametrize("spelled", ["--db", "--db=", "--d", "--dat"])
def test_a_global_option_whose_value_is_a_command_name(tmp_path, capsys, monkeypatch, spelled):
    # `--db devices` (a file named like a command) is a value, in every spelling
    # argparse takes: the command is the word after it.
    monkeypatch.chdir(tmp_path)
    cc_db(tmp_path / "devices")
    if spelled == "--d":
        code, _out, err = run_main(capsys, "--d", "devices", "status")      # ambiguous
        assert code == 2 and "ambiguous" in err
        return
    argv = [spelled + "devices"] if spelled.endswith("=") else [spelled, "devices"]
    if spelled == "--dat":          # --data, the server's file; the cc database follows
        argv += ["--db", "devices"]
    code, out, err = run_main(capsys, *argv, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["installed"] is False


@pytest.mark.parametrize("argv", [["--version", "--json"], ["--json", "--version"]])
def test_version_under_json_is_a_json_object(capsys, argv):
    code, out, err = run_main(capsys, *argv)
    assert code == 0 and json.loads(out) == {"version": ccsync.__version__} and err == ""


def test_version_alone_is_one_line(capsys):
    assert run_main(capsys, "--version") == (0, f"ccsync {ccsync.__version__}\n", "")


def test_install_with_a_python_without_the_crypto_library_says_so(tmp_path, capsys, monkeypatch):
    has_it = ccsync.crypto_available
    monkeypatch.setattr(ccsync, "crypto_available", lambda: False)
    code, out, _ = run_main(capsys, "install", "--dir", str(tmp_path / "bin"))
    assert code == 0 and "has no pycryptodomex" in out and "ccsync enable" in out
    code, out, _ = run_main(capsys, "install", "--dir", str(tmp_path / "bin"), "--json")
    assert code == 0 and json.loads(out)["crypto"] is False
    monkeypatch.setattr(ccsync, "crypto_available", has_it)
    code, out, _ = run_main(capsys, "install", "--dir", str(tmp_path / "bin"))
    assert code == 0 and "pycryptodomex" not in out
