"""Short form of tests/stress_clients.py (the same run, 8 devices for 3 s): devices
syncing at once through the real server process, /health polled meanwhile."""

from __future__ import annotations

from many_clients import run_clients


def test_devices_sync_at_once_and_health_answers_throughout(tmp_path):
    """Every round of every device goes through (a 503 retried is fine, a final failure
    is not), every /health is a 200, nothing times out, and all devices converge."""
    figures = run_clients(tmp_path, clients=8, seconds=3.0)
    print("\n" + figures.report())
    figures.check()
