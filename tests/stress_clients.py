"""Long form: 50 devices sync for 60 s through the real server process while /health
is polled every ~50 ms (make stress).  CCSYNC_CLIENTS and CCSYNC_CLIENTS_SECONDS size
the run; CCSYNC_CLIENTS_MAX_CONNECTIONS (e.g. 16) starts the server with fewer slots
than devices, so they meet its 503s and back off."""

from __future__ import annotations

import os

from many_clients import run_clients

CLIENTS = int(os.environ.get("CCSYNC_CLIENTS", "50"))
SECONDS = float(os.environ.get("CCSYNC_CLIENTS_SECONDS", "60"))
SLOTS = os.environ.get("CCSYNC_CLIENTS_MAX_CONNECTIONS")


def test_many_devices_sync_at_once_and_health_answers_throughout(tmp_path):
    """Every round of every device goes through (a 503 retried is fine, a final failure
    is not), every /health is a 200, nothing times out, and all devices converge."""
    figures = run_clients(tmp_path, CLIENTS, SECONDS,
                          *(("--max-connections", SLOTS) if SLOTS else ()))
    print("\n" + figures.report())
    figures.check()
