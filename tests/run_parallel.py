"""Run the test suite as a few pytest processes at once (`make test`).

Many tests wait on a server, a child process or a lock, so two pytest
processes share a 2-core machine better than one.  Test files are dealt out
by their time in tests/durations.json (longest first, each to the least
loaded worker; a file not listed counts by its size); each worker has its
own temporary directory, and its output is printed whole when it ends.
Their scratch (pytest's base temp and TMPDIR) is in /dev/shm when it can
be written, as the property and fuzz tests' databases already are: the tests
check what ccsync does, not the disk's fsync; CCSYNC_TEST_SCRATCH names
another place (``make stress`` and ``make bench`` run on the disk).
``--record`` writes the times of this run to tests/durations.json.  Exit
status: 0 when every worker passed (or found nothing to run, while another
ran something), else the first failing worker's.
Arguments after the options go to every pytest.

    python tests/run_parallel.py [--workers N] [--record] [pytest args...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

TESTS = Path(__file__).resolve().parent
DURATIONS = TESTS / "durations.json"
# The model test starts its own worker processes on the other cores when
# its file is collected (see test_model.py) and waits for them in its test:
# it runs last in its worker, and counts as the CPU time they take.
LAST = ("test_model.py",)
MODEL_S = 25.0
BYTES_PER_S = 4000                      # a file not in durations.json: a guess by its size
NO_TESTS = 5                            # pytest's exit status when it collected nothing


def scratch_root() -> str | None:
    """Where the workers' scratch goes (None: the system's temporary directory)."""
    named = os.environ.get("CCSYNC_TEST_SCRATCH")
    if named:
        return named
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def weights(files: list[Path]) -> dict[Path, float]:
    """Each file's expected seconds."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    return {p: float(known.get(p.name, p.stat().st_size / BYTES_PER_S)) for p in files}


def deal(files: list[Path], workers: int) -> list[list[Path]]:
    """Files into ``workers`` groups of about equal time (longest first)."""
    groups: list[list[Path]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    weight = weights(files)
    for path in sorted(files, key=lambda p: (p.name not in LAST, -weight[p])):
        least = loads.index(min(loads))
        groups[least].append(path)
        loads[least] += weight[path]
    return [sorted(g, key=lambda p: p.name in LAST) for g in groups if g]


def record(reports: list[Path]) -> None:
    """Write each file's seconds (from the workers' JUnit reports) to durations.json."""
    seconds: dict[str, float] = {}
    for report in reports:
        for case in ElementTree.parse(report).iter("testcase"):
            name = case.get("classname", "").split(".")[-1] + ".py"
            seconds[name] = seconds.get(name, 0.0) + float(case.get("time") or 0)
    for name in LAST:
        seconds[name] = max(seconds.get(name, 0.0), MODEL_S)
    DURATIONS.write_text(json.dumps({k: round(v, 1) for k, v in sorted(seconds.items())},
                                    indent=1) + "\n")


def counts(text: str) -> dict[str, int]:
    """The outcome counts of pytest's last summary line."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--record", action="store_true", help="write tests/durations.json")
    args, pytest_args = parser.parse_known_args(argv)
    files = sorted(TESTS.glob("test_*.py"))
    started = time.monotonic()
    running = []
    with tempfile.TemporaryDirectory(prefix="ccsync-tests-", dir=scratch_root()) as scratch:
        env = {**os.environ, "TMPDIR": scratch, "CCSYNC_TEST_TMP": scratch}
        for n, group in enumerate(deal(files, max(1, args.workers))):
            log = open(Path(scratch) / f"worker{n}.log", "w+")
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       f"--basetemp={Path(scratch) / f'tmp{n}'}",
                       f"--junitxml={Path(scratch) / f'worker{n}.xml'}", *map(str, group),
                       *pytest_args]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=TESTS.parent, env=env), log))
        codes: list[int] = []
        total: dict[str, int] = {}
        for proc, log in running:
            code = proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
            sys.stdout.write(text)
            for word, n in counts(text).items():
                total[word] = total.get(word, 0) + n
            codes.append(code)
        # A worker whose files hold no test the arguments select exits 5: that
        # is a failure only when no worker ran a test.
        ran = [c for c in codes if c != NO_TESTS] or codes[:1]
        status = next((c for c in ran if c), 0)
        if args.record and status == 0:
            record([Path(scratch) / f"worker{n}.xml" for n in range(len(running))])
    summary = ", ".join(f"{n} {word}" for word, n in sorted(total.items()))
    print(f"== {summary or 'no tests ran'} in {time.monotonic() - started:.1f} s "
          f"({len(running)} workers) ==")
    return status


if __name__ == "__main__":
    sys.exit(main())
