"""Run the kill tests (marker `kill`) again and again while busy loops pin every core.

A kill test lands its fault at a barrier (tests/barrier.py), so whatever the load, the kill
reaches the trial at the epoch the test names. This script is how that claim is checked: it
starts `--busy` processes that spin forever, runs `pytest -m kill` `--runs` times, and prints
how many runs each test passed. The busy loops are killed when it ends, however it ends.

    .venv/bin/python tests/under_load.py [--runs 5] [--busy 2] [-k EXPR] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spin() -> None:
    while True:
        pass


def outcomes(report: Path) -> dict[str, bool]:
    """{test id: passed} from a junit XML report."""
    found = {}
    for case in ElementTree.parse(report).iter("testcase"):
        failed = any(child.tag in ("failure", "error", "skipped") for child in case)
        found[f"{case.get('classname')}::{case.get('name')}"] = not failed
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--busy", type=int, default=2, help="busy loops (2 pin 2 cores)")
    parser.add_argument("-k", default=None, help="pytest -k expression, to run some of the kill tests")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/under_load"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    passed: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[str] = collections.Counter()
    try:
        for run in range(1, args.runs + 1):
            report = args.log_dir / f"run{run}.xml"
            command = [sys.executable, "-m", "pytest", "-q", "-m", "kill", "-p", "no:cacheprovider"]
            command += [f"--junitxml={report}"] + (["-k", args.k] if args.k else [])
            started = time.monotonic()
            with (args.log_dir / f"run{run}.log").open("w") as log:
                subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
            for test, ok in outcomes(report).items():
                seen[test] += 1
                passed[test] += ok
            print(
                f"run {run}/{args.runs}: {time.monotonic() - started:.0f} s, "
                f"{sum(outcomes(report).values())}/{len(outcomes(report))} passed",
                flush=True,
            )
    finally:
        for process in busy:
            process.kill()
    width = max(map(len, seen), default=0)
    for test in sorted(seen):
        print(f"{test:{width}s}  {passed[test]}/{seen[test]}")
    return 0 if seen and passed == seen else 1


if __name__ == "__main__":
    sys.exit(main())
