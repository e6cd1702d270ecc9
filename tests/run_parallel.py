"""Run the test suite as a few pytest processes at once (`make test`).

Most tests wait on a server, a child process or a lock, so a 2-core machine
runs two pytest processes in about 60 % of the time of one.  Test files are
dealt out by size (largest first, each to the least loaded worker); each
worker has its own temporary directory, and its output is printed whole
when it ends.  Exit status: 0 when every worker passed, else the first
failing worker's.  Arguments after the options go to every pytest.

    python tests/run_parallel.py [--workers N] [pytest args...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# The model test starts its own worker processes on the other cores (see
# test_model.py); it goes first so they run while the rest of its worker's
# share does.
FIRST = ("test_model.py",)


def deal(files: list[Path], workers: int) -> list[list[Path]]:
    """Files into ``workers`` groups of about equal size (largest first)."""
    groups: list[list[Path]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for path in sorted(files, key=lambda p: (p.name not in FIRST, -p.stat().st_size)):
        least = loads.index(min(loads))
        groups[least].append(path)
        loads[least] += path.stat().st_size
    return [g for g in groups if g]


def counts(text: str) -> dict[str, int]:
    """The outcome counts of pytest's last summary line."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args, pytest_args = parser.parse_known_args(argv)
    files = sorted(TESTS.glob("test_*.py"))
    started = time.monotonic()
    running = []
    with tempfile.TemporaryDirectory(prefix="ccsync-tests-") as scratch:
        for n, group in enumerate(deal(files, max(1, args.workers))):
            log = open(Path(scratch) / f"worker{n}.log", "w+")
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       f"--basetemp={Path(scratch) / f'tmp{n}'}", *map(str, group),
                       *pytest_args]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=TESTS.parent), log))
        status, total = 0, {}
        for proc, log in running:
            code = proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
            sys.stdout.write(text)
            for word, n in counts(text).items():
                total[word] = total.get(word, 0) + n
            status = status or code
    summary = ", ".join(f"{n} {word}" for word, n in sorted(total.items()))
    print(f"== {summary or 'no tests ran'} in {time.monotonic() - started:.1f} s "
          f"({len(running)} workers) ==")
    return status


if __name__ == "__main__":
    sys.exit(main())
