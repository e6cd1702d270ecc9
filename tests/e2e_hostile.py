"""A real SyncServer (in this process, 127.0.0.1) whose ServerStore methods a
test replaces, and a CLI device already synced with it end to end."""

from __future__ import annotations

import contextlib
from pathlib import Path


import ccsync
from e2e_helpers import Device, assert_ok, hand_env


@contextlib.contextmanager
def hostile_world(tmp_path: Path, name: str = "lap"):
    """(server, device): the device set up by hand (the tests' shared vault)
    and synced once, so the store is end to end."""
    data = tmp_path / "server.db"
    srv = ccsync.SyncServer(("127.0.0.1", 0), str(data)).start()
    try:
        admin = ccsync.ServerStore.open(str(data))
        dev = Device(tmp_path, name)
        dev.key = admin.register(name)
        admin.conn.close()
        dev.env_file.write_text(hand_env(srv.url, dev.key))
        dev.sql("INSERT INTO project (name) VALUES ('real-project')")
        assert_ok(dev.cli("sync"))
        yield srv, dev
        dev.close()
    finally:
        srv.stop()
