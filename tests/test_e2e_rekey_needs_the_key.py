"""R3: any registered device, without the passphrase, can empty an end-to-end
store and lock every other device out (real server process, real CLI).

/v1/e2e with ``replace: true`` is honoured for any authenticated key: the
store is wiped and re-keyed under the caller's parameters.  Every device of
the user then fails its sync ("passphrase is not the one ..."), and setup
with the real passphrase says "does not match".  README: a registered device
without the passphrase cannot "push anything the others would take" -- it
can take everything away instead.

The second test: on a plaintext store holding data, the "only a device that
merged all of it" guard trusts the cursor the caller states.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r3_device_without_passphrase_wipes_store.py
"""

from __future__ import annotations



import pytest

import ccsync
from e2e_helpers import Device, ServerProcess, assert_error, assert_ok


@pytest.fixture
def world(tmp_path):
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_replace_from_a_device_without_the_passphrase(world, tmp_path):
    srv = world
    lap = Device(tmp_path, "lap")
    lap.key = srv.register("lap")
    assert_ok(lap.cli("setup", "--server", srv.url, "--api-key", lap.key))
    lap.sql("INSERT INTO project (name) VALUES ('only-on-server-soon')")
    assert_ok(lap.cli("sync"))
    assert srv.devices()["lap"]["records"] > 0

    # A registered device that never had the passphrase (a guest, a stolen key).
    mallory = ccsync.Client(srv.url, srv.register("mallory"))
    evil = ccsync.Vault.new("mallory's own passphrase", n=2 ** 10)
    answer = mallory.begin_e2e(evil.params(private=True), 0, replace=True)
    mallory.close()
    assert not answer.get("emptied"), f"a device without the passphrase emptied the store: {answer}"


def test_sync_after_the_wipe(world, tmp_path):
    srv = world
    lap = Device(tmp_path, "lap")
    lap.key = srv.register("lap")
    assert_ok(lap.cli("setup", "--server", srv.url, "--api-key", lap.key))
    lap.sql("INSERT INTO project (name) VALUES ('p')")
    assert_ok(lap.cli("sync"))
    mallory = ccsync.Client(srv.url, srv.register("mallory"))
    mallory.begin_e2e(ccsync.Vault.new("mallory's own passphrase", n=2 ** 10)
                      .params(private=True), 0, replace=True)
    mallory.close()
    proc = lap.cli("sync")
    assert proc.returncode == 0, ("the user's own device can no longer sync", proc.stderr)


def test_plaintext_store_emptied_by_a_device_that_merged_nothing(world, tmp_path):
    srv = world
    desk = Device(tmp_path, "desk")
    desk.key = srv.register("desk")
    desk.env_file.write_text(f"CC_SERVER={srv.url}\nCC_API_KEY={desk.key}\n")   # plaintext days
    desk.sql("INSERT INTO project (name) VALUES ('desk-data')")
    assert_ok(desk.cli("sync"))
    mallory = ccsync.Client(srv.url, srv.register("mallory"))
    answer = mallory.begin_e2e(ccsync.Vault.new("whatever1", n=2 ** 10).params(private=True),
                               2 ** 62)                        # "I merged everything"
    mallory.close()
    assert "behind" in answer, f"emptied by a device that merged nothing: {answer}"
