"""R11: after the migration, the store holds only the migrating device's own
edits: its re-seed of every other device's rows is refused ("edits under
device id ... are device 'old''s: only it sends them") and the refusal is
ignored (reseed_server never reads the results), yet the device adopts
the new store.  A device set up afterwards gets none of 'old''s data until
'old' itself gets the passphrase and syncs -- never, if it is switched off
or was retired without `revoke`.  lap holds the rows and never sends them
again; `status --verify` on lap and pi at the same cursor: "differs".

README: "Its next sync first pulls everything the server holds, then the
server empties its store ...; the device re-seeds it from what it holds."

Run: cd /tmp/r1 && CI=true .venv/bin/python -m pytest -q review/test_r11_migration_reseed_refused_for_other_devices.py
"""

from __future__ import annotations



from e2e_helpers import Device, ServerProcess, assert_ok


def test_a_device_set_up_after_the_migration_gets_what_the_store_held(tmp_path):
    srv = ServerProcess(tmp_path / "server.db", tmp_path / "server_home")
    srv.start()
    try:
        old = Device(tmp_path, "old")                # plaintext days; then switched off
        old.key = srv.register("old")
        old.env_file.write_text(f"CC_SERVER={srv.url}\nCC_API_KEY={old.key}\n")
        old.sql("INSERT INTO project (name) VALUES ('written-on-old')")
        assert_ok(old.cli("sync"))

        lap = Device(tmp_path, "lap")
        lap.key = srv.register("lap")
        assert_ok(lap.cli("setup", "--server", srv.url, "--api-key", lap.key))
        out = lap.json("sync")
        assert lap.sql("SELECT name FROM project") == [("written-on-old",)]
        assert out.get("reseeded", 0) >= 1, out      # it says it re-seeded

        pi = Device(tmp_path, "pi")
        pi.key = srv.register("pi")
        assert_ok(pi.cli("setup", "--server", srv.url, "--api-key", pi.key))
        assert_ok(pi.cli("sync"))
        assert_ok(lap.cli("sync"))
        import json
        verify = json.loads(lap.cli("status", "--verify", "--json").stdout)["verify"]["devices"]
        assert pi.sql("SELECT name FROM project") == [("written-on-old",)], \
            ("the store lost old's data at the migration", verify)
        for dev in (old, lap, pi):
            dev.close()
    finally:
        srv.stop()
