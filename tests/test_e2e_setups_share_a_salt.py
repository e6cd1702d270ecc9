"""R9: on a plaintext store that holds data, two devices set up with the SAME
passphrase before either syncs get two different keys (each setup draws
its own salt: Vault.new), so the second device's sync fails with "this
device's sync passphrase is not the one the data ... is encrypted with
(changed on another device?)" although the user typed the same one.  It
stays broken (auto-sync too) until setup is run again there.

This is the natural order of the README's own migration text: upgrade every
device, run `setup` on each, then let them sync.

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r9_same_passphrase_two_salts.py
"""

from __future__ import annotations



from e2e_helpers import Device, ServerProcess, assert_ok


def test_two_setups_before_the_first_sync(tmp_path):
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    try:
        old = Device(tmp_path, "old")
        old.key = srv.register("old")
        old.env_file.write_text(f"CC_SERVER={srv.url}\nCC_API_KEY={old.key}\n")   # plaintext
        old.sql("INSERT INTO project (name) VALUES ('from-plaintext-days')")
        assert_ok(old.cli("sync"))

        lap, desk = Device(tmp_path, "lap"), Device(tmp_path, "desk")
        for dev in (lap, desk):                      # the same passphrase on both
            dev.key = srv.register(dev.name)
            assert_ok(dev.cli("setup", "--server", srv.url, "--api-key", dev.key))
        assert_ok(lap.cli("sync"))                   # migrates the store
        proc = desk.cli("sync")
        assert proc.returncode == 0, proc.stderr
        old.close(), lap.close(), desk.close()
    finally:
        srv.stop()
