"""CLI start-up: `lottery --help` and a one-line spec error, as the CLI loads now vs loading torch first.

Two ways, each a fresh `python` process (what a user waits for), interleaved, median of --repeat runs:
  lazy : `python -m orchestrator ...`, the CLI as it is: torch, Ray and MLflow are imported only by
         the commands that train, run or track;
  eager: the same command after importing the modules the CLI used to import at load
         (trainers.schemes for the scheme names, trainers.data for DataError), which pull in torch,
         PIL and numpy: the CLI before its heavy imports moved into the commands.
Both print the same output; the ratio is eager / lazy. Target: each under 1.5 s on this machine.

    .venv/bin/python -m bench.cli_startup [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save, timed_command  # noqa: E402

BAD_SPEC = "name: x\nseeds: [0]\nbase: {epoch: 3}\nschemes: [{name: baseline}]\n"
EAGER = "import trainers.schemes, trainers.data\nfrom orchestrator.cli import app\napp(prog_name='lottery')\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.yaml"
        bad.write_text(BAD_SPEC)
        cases = {"help": (["--help"], 0), "spec_error": (["sweep", str(bad)], 2)}
        ways = {
            "lazy": [sys.executable, "-m", "orchestrator"],
            "eager": [sys.executable, "-c", EAGER],
        }
        times: dict[str, dict[str, list[float]]] = {c: {w: [] for w in ways} for c in cases}
        for case, (extra, rc) in cases.items():
            for way in ways:  # one untimed run each: the first process also warms the file cache
                timed_command([*ways[way], *extra], rc)
            for _ in range(args.repeat):
                for way, argv in ways.items():
                    times[case][way].append(timed_command([*argv, *extra], rc))
    rows = {}
    for case, by_way in times.items():
        lazy, eager = (statistics.median(by_way[w]) for w in ("lazy", "eager"))
        rows[case] = {"lazy_s": lazy, "eager_s": eager, "ratio": eager / lazy, "runs": by_way}
        print(f"{case:10s}  lazy {lazy:.2f} s   eager {eager:.2f} s   eager/lazy {eager / lazy:.2f}x")
    save("cli_startup", {"repeat": args.repeat, "rows": rows})


if __name__ == "__main__":
    main()
