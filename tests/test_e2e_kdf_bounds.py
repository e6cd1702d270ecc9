"""R12: scrypt parameters that KDF_BOUNDS and valid_params() accept make
`ccsync setup` die with a traceback (ValueError from hashlib.scrypt:
"maxmem must be positive and smaller than 2147483647").

Vault.derive passes maxmem = 256*r*n + 1 MiB, which passes 2**31 - 1 as
soon as r*n >= 2**23 (n = 2**20 with r = 8, n = 2**18 with r = 32, ...),
all inside the bounds.  A registered device without the passphrase can set
such parameters on a store with no records (/v1/e2e, no replace needed), or
with replace on any store (R3); a hostile server can publish them in hello.
Every device's setup then crashes.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r12_kdf_cost_in_bounds_crashes_setup.py
"""

from __future__ import annotations



import pytest

import ccsync
from e2e_helpers import Device, ServerProcess


def test_in_process_opening_raises_a_clean_error():
    vault = ccsync.Vault.derive("whatever1", b"0123456789abcdef", n=2 ** 10)
    params = {**vault.params(), "n": 2 ** 20, "r": 8}
    assert not ccsync.valid_params({**params, "proof": vault.proof.hex()})  # refused: 512 MiB+
    with pytest.raises(ccsync.WireError, match="out of bounds"):
        ccsync.Vault.opening("tests' sync passphrase", params, "the server")


def test_setup_against_such_a_store(tmp_path):
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    try:
        mallory = ccsync.Client(srv.url, srv.register("mallory"))
        vault = ccsync.Vault.derive("mallory1", b"0123456789abcdef", n=2 ** 10)
        with pytest.raises(ccsync.RemoteError, match="malformed end-to-end parameters"):
            mallory.begin_e2e({**vault.params(private=True), "n": 2 ** 20, "r": 8}, 0)
        mallory.close()
        lap = Device(tmp_path, "lap")
        lap.key = srv.register("lap")
        proc = lap.cli("setup", "--server", srv.url, "--api-key", lap.key)
        assert "Traceback" not in proc.stderr, proc.stderr[-600:]
        lap.close()
    finally:
        srv.stop()
