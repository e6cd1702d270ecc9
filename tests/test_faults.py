"""CI form of the fault-proxy rounds (tests/fault_proxy.py; long form
tests/stress_faults.py): one round per fault, all five lanes at once, a fixed seed,
small data, one broken sync per fault (a's or b's in turn)."""

from fault_proxy import Plan, run_lanes, summary
from stress_tools import pick_seed


def test_every_fault_fails_cleanly_and_heals(tmp_path):
    seed = pick_seed("CCSYNC_FAULT_SEED", fixed=20240611)
    plan = Plan(rounds=1, base_rows=300, round_rows=(300, 300), both=False, stall_timeout=1.0,
                quiet=False)
    lanes = run_lanes(tmp_path, seed, plan)
    print(summary(lanes))
    failed = [lane.line() for lane in lanes if lane.failure]
    assert not failed, failed
