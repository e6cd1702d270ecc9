"""R13: (a) fails -- a traceback; (b) holds.  Probes: setup's passphrase input edges (real CLI).

(a) a passphrase file that is not UTF-8 -> UnicodeDecodeError traceback?
(b) --api-key - and --passphrase-file - together (key then passphrase on stdin).

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q -rA review/test_r13_setup_input_edges.py
"""

from __future__ import annotations



import pytest

from e2e_helpers import Device, ServerProcess, TEST_PASSPHRASE, assert_ok


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    s.start()
    yield s
    s.stop()


def test_non_utf8_passphrase_file(srv, tmp_path):
    dev = Device(tmp_path, "lap")
    key = srv.register("lap")
    bad = tmp_path / "pass.bin"
    bad.write_bytes(b"\xff\xfe latin-1 p\xe4ssphrase\n")
    proc = dev.cli("setup", "--server", srv.url, "--api-key", key, "--passphrase-file", bad,
                   env={"CCSYNC_PASSPHRASE": ""})
    assert "Traceback" not in proc.stderr, proc.stderr[-400:]
    assert proc.stderr.startswith("ccsync: error:"), proc.stderr


def test_key_and_passphrase_both_on_stdin(srv, tmp_path):
    dev = Device(tmp_path, "lap")
    key = srv.register("lap")
    assert_ok(dev.cli("setup", "--server", srv.url, "--api-key", "-", "--passphrase-file", "-",
                      env={"CCSYNC_PASSPHRASE": ""}, input=f"{key}\n{TEST_PASSPHRASE}\n"))
