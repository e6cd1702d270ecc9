#!/usr/bin/env python3
"""Hunt for programs the model-based oracle rejects (tests/model_sim.py).

    bench/hunt.py --count 10000              # fresh seeds from a random base (printed)
    bench/hunt.py --start 0 --count 2000     # seeds 0..1999
    bench/hunt.py --seed 42 --verbose        # replay one program, steps and complaints
    bench/hunt.py --renames always|never|seed  (default seed: ~1 in 4 programs rename)

A fifth of the programs reset the server or move to another one (model_sim.generate).

Prints every failing seed with a one-line reason; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import model_sim  # noqa: E402

# ccsync's warnings (a re-seed after a reset, a rejoin) are the programs' own
# events, not the hunt's findings: the oracle judges the end state.
logging.getLogger("ccsync").setLevel(logging.ERROR)

FLAG = {"seed": None, "always": True, "never": False}


def _hunt_one(seed: int, renames, removes) -> tuple:
    out = model_sim.run_seed(seed, renames=renames, removes=removes)
    return seed, ",".join(sorted(out.program.features)) or "-", len(out.program.steps), \
        out.failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--start", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--seed", type=int, default=None, help="replay this one seed")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="programs run in parallel (default: one per core)")
    ap.add_argument("--verbose", action="store_true", help="print steps and every complaint")
    ap.add_argument("--renames", choices=sorted(FLAG), default="seed")
    ap.add_argument("--removes", choices=sorted(FLAG), default="seed",
                    help="programs that may run store.remove() (stamp --remove)")
    args = ap.parse_args(argv)
    renames, removes = FLAG[args.renames], FLAG[args.removes]

    if args.seed is not None:
        program = model_sim.generate(args.seed, renames, removes)
        print(f"seed {args.seed}: {program.n} devices, skews {program.skews}, "
              f"old schema {program.old}, features {sorted(program.features)}")
        out = model_sim.run(program, verbose=args.verbose)
        for note in out.model.notes:
            print(f"  (model) {note}")
        for kind, msg in out.complaints:
            print(f"  [{kind}] {msg}")
        print("FAIL" if out.failures else "ok")
        return 1 if out.failures else 0

    start = args.start if args.start is not None else random.SystemRandom().randrange(10**9)
    print(f"seeds {start}..{start + args.count - 1} (renames={args.renames}, "
          f"removes={args.removes}, {args.jobs} processes)", flush=True)
    kinds = collections.Counter()
    failed = 0
    t0 = last = time.time()
    seeds = range(start, start + args.count)
    job = functools.partial(_hunt_one, renames=renames, removes=removes)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for i, (seed, feats, steps, failures) in enumerate(pool.imap(job, seeds, chunksize=4)):
            if failures:
                failed += 1
                found = sorted({k for k, _ in failures})
                kinds.update(found)
                print(f"FAIL seed {seed} [{' '.join(found)}] ({feats}, {steps} steps): "
                      f"{failures[0][1].splitlines()[0][:220]}", flush=True)
            if time.time() - last > 60:
                last = time.time()
                print(f"... {i + 1}/{args.count}, {failed} failed, "
                      f"{(last - t0) / (i + 1) * 1000:.0f} ms/program", file=sys.stderr,
                      flush=True)
    print(f"{failed} of {args.count} failed in {time.time() - t0:.0f} s; by kind: "
          f"{dict(kinds.most_common())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
