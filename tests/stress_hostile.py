"""Long form: 10,000 hostile HTTP cases against the real server process, a fresh seed
each run (make stress; CCSYNC_HOSTILE_CASES, CCSYNC_HOSTILE_SEED to replay a run)."""

from __future__ import annotations

import os
import secrets

from hostile_http import run_hostile

CASES = int(os.environ.get("CCSYNC_HOSTILE_CASES", "10000"))
SEED = int(os.environ.get("CCSYNC_HOSTILE_SEED") or secrets.randbits(32))


def test_hostile_requests_get_a_4xx_or_a_close_never_a_500_or_a_hang(tmp_path):
    """Every case answered with a status line below 500 (a close only where the framing
    is malformed), /health and a signed hello answer after every batch, and the
    server's log holds no traceback."""
    print(f"\nCCSYNC_HOSTILE_SEED={SEED}")
    tally, log = run_hostile(tmp_path, CASES, SEED)
    print(tally.table())
    tally.check(log)
