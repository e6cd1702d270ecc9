"""Long form of the kill -9 trials (make stress): $CCSYNC_KILL9_TRIALS trials (30),
modes a, b, c in turn, 3,000-20,000 rows each, a fresh seed per run
($CCSYNC_KILL9_SEED replays one).  See tests/kill9_trials.py."""

from kill9_trials import run_trials, summary
from stress_tools import env_int, pick_seed


def test_kill9_trials_converge(tmp_path):
    seed = pick_seed("CCSYNC_KILL9_SEED")
    outcomes = run_trials(tmp_path, seed, env_int("CCSYNC_KILL9_TRIALS", 30), (3000, 20000))
    print(summary(outcomes))
    failed = [o.line() for o in outcomes if o.error]
    assert not failed, failed
