"""Long form of the fault-proxy rounds (make stress): $CCSYNC_FAULT_ROUNDS rounds per
fault (40), a's and b's sync broken each round after a random number of requests at
a random byte, 20-4,500 new rows a round, a fresh seed per run ($CCSYNC_FAULT_SEED
replays one); then one stall against the CLI's own 60 s timeout.
See tests/fault_proxy.py."""

import random

from fault_proxy import FaultProxy, Plan, run_lanes, summary
from stress_tools import (World, assert_converged, canonical, cli, env_int, error_line, fill,
                         pick_seed, sync)


def test_every_fault_fails_cleanly_and_heals(tmp_path):
    seed = pick_seed("CCSYNC_FAULT_SEED")
    plan = Plan(rounds=env_int("CCSYNC_FAULT_ROUNDS", 40), base_rows=2000,
                round_rows=(20, 4500), both=True, stall_timeout=3.0)
    lanes = run_lanes(tmp_path, seed, plan)
    print(summary(lanes))
    failed = [lane.line() for lane in lanes if lane.failure]
    assert not failed, failed


def test_a_stall_ends_with_the_cli_default_timeout(tmp_path):
    """The unmodified CLI against a proxy that never answers gives up by itself
    (its 60 s client timeout) with one error line; then syncs through the healed proxy."""
    world = World(tmp_path)
    proxy = None
    try:
        world.start_server()
        proxy = FaultProxy(("127.0.0.1", world.server.port), random.Random(0), hold_s=150)
        world.point_at(proxy.url)
        fill(world.a, 500, random.Random(0))
        proxy.arm("stall")
        try:
            line = error_line(cli(world.a, "sync", "--json", timeout=150), proxy.url)
        finally:
            proxy.disarm()
        print(line)
        assert "timed out" in line, line
        written = canonical(world.a.conn)[0]
        sync(world.a)
        sync(world.b)
        assert_converged(world, written)
    finally:
        if proxy is not None:
            proxy.stop()
        world.close()
