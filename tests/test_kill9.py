"""CI form of the kill -9 trials (tests/kill9_trials.py; long form tests/stress_kill9.py):
a fresh device killed mid-pull and the server killed mid-push, a fixed seed,
small data, both trials at once."""

from kill9_trials import run_trials, summary
from stress_tools import pick_seed


def test_kill9_trials_converge(tmp_path):
    seed = pick_seed("CCSYNC_KILL9_SEED", fixed=20240611)
    outcomes = run_trials(tmp_path, seed, 2, (2100, 2600), modes=("b", "c"), workers=2)
    print(summary(outcomes))
    failed = [o.line() for o in outcomes if o.error]
    assert not failed, failed
