"""Short form of tests/stress_hostile.py (the same cases, 300 of them, a fixed seed):
hostile HTTP against the real server process gets a 4xx or a close, never a 500 or a
hang, and /health and a signed hello keep answering."""

from __future__ import annotations

from hostile_http import run_hostile

SEED = 20261201


def test_hostile_requests_get_a_4xx_or_a_close_never_a_500_or_a_hang(tmp_path):
    """Every case answered with a status line below 500 (a close only where the framing
    is malformed), /health and a signed hello answer after every batch, and the
    server's log holds no traceback."""
    tally, log = run_hostile(tmp_path, 300, SEED)
    print(f"\n{tally.table()}")
    tally.check(log)
