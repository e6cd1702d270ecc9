"""kill -9 trials: a sync process dies at a random moment, the next syncs must recover.

One trial is a :class:`stress_tools.World` (the real server, devices a and b
with real cc databases) and one SIGKILL at a delay drawn from the trial's
seeded random.Random, in one of three modes:

a. device a's client, during the large first sync of its rows (stamping,
   pushing, or pulling b's rows, wherever the delay lands);
b. device b's client, a fresh (empty) device pulling a's rows for the first time;
c. the server, while device a pushes its first sync; the server is started again
   on the same data file (a new port: the devices' .env is rewritten) and a's
   command must have failed cleanly (exit 1, one error line) or finished.

Then both devices sync until a round moves nothing (bounded) and every command
must exit 0; both hold the same data, every row either wrote is there with its
values, nothing twice, and every database passes integrity_check.

Long form: tests/stress_kill9.py; CI form: tests/test_kill9.py.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from e2e_helpers import COMMAND, clean_env
from stress_tools import (CLI_TIMEOUT, World, assert_converged, canonical, converge, error_line,
                          failure_text, fill, in_parallel, sync)

MODES = ("a", "b", "c")
# Where each mode's delay runs from: a's start (its whole first sync: stamping, then
# pushes), the first pull answered to b, the first push answered to a.
ANCHOR = {"a": "start", "b": "first pull", "c": "first push"}
# Rough length of the phase aimed at on a 2-core laptop: the CLI's start-up, then
# per row.  The kill lands uniformly over it; on a slower machine, earlier in the run.
STARTUP_S, PUSH_S_PER_ROW, PULL_S_PER_ROW = 0.2, 0.00014, 0.00009
EARLIEST_S = 0.15           # past the interpreter's start-up: ccsync is at work
POLL_S = 0.005


@dataclass
class Outcome:
    """What one trial did: where the kill landed and how recovery went."""

    trial: int
    mode: str
    rows: int
    delay: float            # seconds from ANCHOR[mode] to the kill
    mid_run: bool = False   # the command was still running when the kill came
    answered: str = ""      # requests the server had answered for it by then
    client: str = ""        # mode c: how the client's command ended
    rounds: int = 0         # sync rounds until quiet
    error: str | None = None

    def line(self) -> str:
        where = "mid-run" if self.mid_run else "after it finished"
        text = (f"trial {self.trial:>3} mode {self.mode} rows {self.rows:>6} kill "
                f"{self.delay:.3f}s after {ANCHOR[self.mode]} ({where}; answered: "
                f"{self.answered})")
        if self.client:
            text += f", client: {self.client}"
        return text + (f", quiet after {self.rounds} round(s)" if self.error is None
                       else f", FAILED: {self.error}")


def draw_delay(mode: str, rows: int, rng: random.Random) -> float:
    """Seconds from the anchor to the kill, uniform over the phase the mode aims at."""
    if mode == "a":
        return rng.uniform(EARLIEST_S, STARTUP_S + rows * PUSH_S_PER_ROW)
    return rng.uniform(0.0, rows * (PULL_S_PER_ROW if mode == "b" else PUSH_S_PER_ROW))


def run_trials(root: Path, seed: int, trials: int, rows: tuple[int, int], *,
               modes: tuple[str, ...] = MODES, workers: int = 1) -> list[Outcome]:
    """``trials`` trials (mode i cycles through ``modes``), ``workers`` at a time."""
    def one(i: int) -> Outcome:
        rng = random.Random(f"{seed}:{i}")
        return run_trial(root / f"trial{i}", i, modes[i % len(modes)], rng,
                         rng.randint(*rows))
    return in_parallel(one, range(trials), workers)


def summary(outcomes: list[Outcome]) -> str:
    """E.g. ``kill9: 30/30 converged, modes a=10 b=10 c=10, 27 killed mid-run``."""
    good = sum(o.error is None for o in outcomes)
    modes = " ".join(f"{m}={sum(o.mode == m for o in outcomes)}" for m in MODES)
    mid = sum(o.mid_run for o in outcomes)
    return f"kill9: {good}/{len(outcomes)} converged, modes {modes}, {mid} killed mid-run"


def run_trial(root: Path, trial: int, mode: str, rng: random.Random, rows: int) -> Outcome:
    """One trial; an assertion that fails is kept in ``Outcome.error``."""
    outcome = Outcome(trial, mode, rows, draw_delay(mode, rows, rng))
    root.mkdir(parents=True)
    world = World(root)
    try:
        world.start_server()
        written = _write(world, mode, rows, rng)
        _kill(world, outcome)
        outcome.rounds = converge(world)
        assert_converged(world, *written)
    except Exception:                       # noqa: BLE001 - reported with the others
        outcome.error = failure_text()
    finally:
        world.close()
    return outcome


def _write(world: World, mode: str, rows: int, rng: random.Random) -> list[dict]:
    """a's rows (and b's few, synced first, unless b is the fresh device of mode b);
    returns what each device wrote, as canonical tables."""
    fill(world.a, rows, rng)
    if mode != "b":
        fill(world.b, max(50, rows // 20), rng, settings=False)
        sync(world.b)
    written = [canonical(dev.conn)[0] for dev in world.devices]
    if mode == "b":
        sync(world.a)
    return written


def _kill(world: World, outcome: Outcome) -> None:
    """Start the sync, SIGKILL the mode's victim after the delay, restart a killed server."""
    dev = world.b if outcome.mode == "b" else world.a
    log = world.server.lines
    before = len(log)
    proc = subprocess.Popen([*COMMAND, "sync", "--json"], env=clean_env(dev.home),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if outcome.mode != "a":
            anchor = " POST /v1/pull " if outcome.mode == "b" else " POST /v1/push "
            _wait_until(proc, lambda: any(anchor in line for line in log[before:]))
        try:
            proc.wait(outcome.delay)
        except subprocess.TimeoutExpired:
            outcome.mid_run = True
        outcome.answered = ", ".join(
            f"{sum(f' POST /v1/{path} ' in line for line in log[before:])} {path}"
            for path in ("push", "pull"))
        if outcome.mode == "c":
            world.server.kill()                     # SIGKILL
        else:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(CLI_TIMEOUT)
    if outcome.mode == "c":
        outcome.client = _client_end(proc, out, err, world.server.url)
        world.start_server()


def _wait_until(proc: subprocess.Popen, ready) -> None:
    """Until ``ready()`` holds or the process ends (at most CLI_TIMEOUT)."""
    deadline = time.monotonic() + CLI_TIMEOUT
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _client_end(proc: subprocess.Popen, out: str, err: str, url: str) -> str:
    """The client whose server died: finished (exit 0), or one clean error line."""
    if proc.returncode == 0:
        return "finished"
    line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), url)
    return "exit 1: " + line.replace(url, "URL")[len("ccsync: error: "):]
