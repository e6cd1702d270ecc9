"""Tests for the zipapp packaging done by build_zipapp.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build_zipapp.py"


def build(source, output):
    """Run build_zipapp.py on *source*, writing *output*; return the result."""
    result = subprocess.run(
        [sys.executable, str(BUILD), "--source", str(source),
         "--output", str(output)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return result


def copy_source(tmp_path):
    """Copy the real ccsync.py into *tmp_path*, so tests never touch the repo."""
    source = tmp_path / "src" / "ccsync.py"
    source.parent.mkdir()
    shutil.copy2(REPO / "ccsync.py", source)
    return source


def test_build_is_reproducible(tmp_path):
    source = copy_source(tmp_path)
    first, second = tmp_path / "a" / "ccsync.pyz", tmp_path / "b" / "ccsync.pyz"
    build(source, first)
    stat = source.stat()
    os.utime(source, (stat.st_atime + 3600, stat.st_mtime + 3600))
    build(source, second)
    assert first.read_bytes() == second.read_bytes()


def test_pyz_has_shebang(tmp_path):
    output = tmp_path / "ccsync.pyz"
    build(copy_source(tmp_path), output)
    assert output.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def test_pyz_help_runs_from_other_folder(tmp_path):
    output = tmp_path / "dist" / "ccsync.pyz"
    build(copy_source(tmp_path), output)
    result = subprocess.run(
        [sys.executable, str(output), "--help"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_missing_source_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BUILD), "--source", str(tmp_path / "nope.py"),
         "--output", str(tmp_path / "out.pyz")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "source not found" in result.stderr
    assert not (tmp_path / "out.pyz").exists()


def _module_file(pyz, python=sys.executable):
    """Where ccsync is loaded from when ``python`` runs from ``pyz``."""
    result = subprocess.run(
        [python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import ccsync; "
                       "print(ccsync.__file__)", str(pyz)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pyz_carries_bytecode_for_the_python_that_built_it(tmp_path):
    output = tmp_path / "ccsync.pyz"
    build(copy_source(tmp_path), output)
    import zipfile
    with zipfile.ZipFile(output) as zf:
        assert sorted(zf.namelist()) == ["__main__.py", "ccsync.py", "ccsync.pyc"]
    assert _module_file(output).endswith("ccsync.pyz/ccsync.pyc")   # no compile per run


def test_another_python_falls_back_to_the_source(tmp_path):
    # A pyc of another Python has another magic number: written here by hand.
    import zipfile
    output = tmp_path / "ccsync.pyz"
    build(copy_source(tmp_path), output)
    other = tmp_path / "other.pyz"
    with zipfile.ZipFile(output) as src, zipfile.ZipFile(other, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "ccsync.pyc":
                data = b"\x00\x00\r\n" + data[4:]
            dst.writestr(info, data)
    assert _module_file(other).endswith("other.pyz/ccsync.py")
    result = subprocess.run([sys.executable, str(other), "--version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("ccsync ")


def _imported(pyz, *args, env=None):
    """The modules ``python pyz args`` imports (read off ``-X importtime``)."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(pyz), *args],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_small_commands_import_only_what_they_use(tmp_path):
    # Start-up is most of a small command: help and a local status load no
    # server, no network, no crypto, no text wrapping, no terminal probe.
    output = tmp_path / "ccsync.pyz"
    build(copy_source(tmp_path), output)
    env = {**os.environ, "HOME": str(tmp_path), "CCSYNC_SERVER": "", "CC_SERVER": ""}
    db = tmp_path / "cc.db"
    import sqlite3
    sqlite3.connect(db).executescript((REPO / "tests" / "cc-schema.sql").read_text())
    never = {"http.server", "socketserver", "email", "ssl", "http.client", "textwrap",
             "shutil", "Cryptodome", "hashlib", "logging", "subprocess", "threading",
             "base64", "zlib", "locale"}
    for args in (["--help"], ["status", "--help"], ["--db", str(db), "status"]):
        loaded = _imported(output, *args, env=env)
        # (the entry loads ccsync itself: what it imports shows it ran)
        assert "sqlite3" in loaded and not loaded & never, (args, loaded & never)


def test_the_module_is_read_and_unmarshalled_once(tmp_path):
    # zipimport unmarshals a module's code a second time only to tell its
    # file name: 650 KB, a tenth of a small command's time.
    stdout = _run_with_pyz(tmp_path, (
        "import marshal, runpy, sys, zipfile\n"
        "ours = len(zipfile.ZipFile(sys.argv[1]).read('ccsync.pyc')) - 16\n"
        "loads, sizes = marshal.loads, []\n"
        "marshal.loads = lambda data, *a: (sizes.append(len(data)), loads(data, *a))[1]\n"
        "sys.argv = [sys.argv[1], '--version']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import ccsync\n"
        "print(sizes.count(ours), ccsync.__file__)\n"))
    count, where = stdout.split()[-2:]
    assert count == "1" and where.endswith(os.path.join("ccsync.pyz", "ccsync.pyc"))


def _run_with_pyz(tmp_path, code: str) -> str:
    """``code`` run by this Python with a freshly built pyz as ``sys.argv[1]``;
    its stdout (it must succeed)."""
    output = tmp_path / "ccsync.pyz"
    build(copy_source(tmp_path), output)
    result = subprocess.run([sys.executable, "-c", code, str(output)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_collector_stays_on_after_start_up(tmp_path):
    # The entry switches the collector off while the module loads and freezes
    # what it loaded; a daemon or server running for weeks must still collect.
    code = ("import gc, runpy, sys\n"
            "sys.argv = [sys.argv[1], '--version']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "print(gc.isenabled(), gc.get_freeze_count() > 1000)\n")
    out = _run_with_pyz(tmp_path, code)
    assert out.split()[-2:] == ["True", "True"], out


def test_bytecode_keeps_line_numbers(tmp_path):
    # The pyc leaves out column ranges (smaller, read faster); a traceback
    # still names the line.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ccsync, traceback\n"
            "class Bad:\n    def __str__(self): raise ValueError('no')\n"
            "try:\n    ccsync.version_digits(Bad())\nexcept ValueError as exc:\n"
            "    frame = [f for f in traceback.extract_tb(exc.__traceback__)\n"
            "             if f.filename.endswith('ccsync.py')][0]\n"
            "    print(frame.lineno, frame.line)\n")
    out = _run_with_pyz(tmp_path, code)
    line = (REPO / "ccsync.py").read_text().splitlines()[int(out.split()[0]) - 1]
    assert "str(name" in line and out.split(None, 1)[1].strip() == line.strip()
