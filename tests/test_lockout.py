"""cc is never locked out: a short run of bench/stress_lockout.py, in both journal modes.

A process writing like cc (its own connection with a 5 s busy timeout, Python's implicit
transactions, a committed write every 2-5 ms) runs against a device's database while the
real ``ccsync sync`` (a subprocess, against a real server subprocess) pushes a few thousand
rows from device A, then pulls them all onto a fresh device B.  Only outcomes are asserted
here; latencies are reported by the full run (``make stress``), never judged.
"""

from __future__ import annotations

import sys

import pytest

from e2e_helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import stress_lockout  # noqa: E402

ROWS = 2000
NOT_SYNCED = 3              # A's secret and device-local settings (github_pat, ide, backup.dir)
PHASES = ("push", "pull")


@pytest.fixture(scope="module", params=stress_lockout.MODES)
def stress_run(request, tmp_path_factory) -> dict:
    """One mode's run: both phases plus the follow-up syncs (shared by this module's tests)."""
    mode = request.param
    return stress_lockout.run_mode(mode, ROWS, tmp_path_factory.mktemp(f"lockout-{mode}"))


def phase_of(run: dict, name: str) -> dict:
    (phase,) = [p for p in run["phases"] if p["phase"] == name]
    return phase


def figures(phase: dict) -> str:
    """The writer's figures, for a failure message (not asserted)."""
    w = phase["writer"]
    return (f"{phase['mode']}/{phase['phase']}: sync {phase['sync']['seconds']:.2f} s, "
            f"{w['writes']} writes, {w['during_sync']} during the sync, "
            f"p50 {w['p50_ms']:.1f} ms, p99 {w['p99_ms']:.1f} ms, max {w['max_ms']:.1f} ms")


@pytest.mark.parametrize("name", PHASES)
def test_sync_succeeds_and_moves_every_row(stress_run, name):
    phase = phase_of(stress_run, name)
    sync = phase["sync"]
    assert sync["rc"] == 0, (name, sync["rc"], sync["stderr"])
    moved = sync["result"]["sent" if name == "push" else "received"]
    assert moved >= ROWS - NOT_SYNCED, (name, sync["result"])
    assert phase["journal_mode"] == stress_run["mode"]


def test_follow_up_commands_succeed(stress_run):
    for command in stress_run["follow_ups"]:
        assert command["rc"] == 0, command


@pytest.mark.parametrize("name", PHASES)
def test_writer_never_sees_database_is_locked(stress_run, name):
    phase = phase_of(stress_run, name)
    assert phase["writer"]["lock_errors"] == 0, figures(phase)


@pytest.mark.parametrize("name", PHASES)
def test_writer_meets_no_other_error(stress_run, name):
    phase = phase_of(stress_run, name)
    assert phase["writer"]["other_errors"] == 0, (phase["writer"]["error_kinds"], figures(phase))


@pytest.mark.parametrize("name", PHASES)
def test_nothing_the_writer_wrote_is_lost(stress_run, name):
    phase = phase_of(stress_run, name)
    assert phase["facts"], "the writer committed nothing"
    assert phase["lost"] == 0, "\n".join(stress_lockout.loss_lines(phase, examples=5))


@pytest.mark.parametrize("name", PHASES)
def test_writer_makes_progress_while_the_sync_runs(stress_run, name):
    """Commits land inside the sync's run, also in its second half (the first part is
    ccsync's interpreter starting), so cc was not shut out for the whole sync."""
    phase = phase_of(stress_run, name)
    assert not phase["writer_timed_out"]
    assert phase["writer"]["during_sync"] > 0, figures(phase)
    assert phase["writer"]["during_second_half"] > 0, figures(phase)
