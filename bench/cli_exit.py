"""CLI exit: the same commands ending with the prompt exit vs the interpreter's full teardown.

Two ways, each a fresh `python` process running the same command with the same output, interleaved,
median of --repeat runs:
  prompt  : `python -m orchestrator ...`, as `lottery` runs: the command, its exit work (threads,
            atexit hooks, flushed output), then os._exit (orchestrator/process_exit.py);
  teardown: the Typer app called from `python -c`, so the interpreter tears every module down
            after the command, as the CLI did before.
Commands: `lottery train` of one tiny trial into its own directory and MLflow store (torch,
MLflow, pandas, matplotlib loaded), and `lottery sweep --dry-run` of the demo spec (torch and
the data loaded, no Ray). The ratio is teardown / prompt; the difference is seconds per command.

    .venv/bin/python -m bench.cli_exit [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save, timed_command  # noqa: E402

PROMPT = [sys.executable, "-m", "orchestrator"]
APP_ONLY = "import sys\nfrom orchestrator.cli import app\napp(sys.argv[1:], 'lottery')\n"
TEARDOWN = [sys.executable, "-c", APP_ONLY]
TRAIN = [
    "train",
    "--scheme",
    "baseline",
    "--dataset",
    "synthetic",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--set",
    "model.filters=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    payload: dict[str, float] = {"repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="cli-exit-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LOTTERY_"))}
        env |= {"LOTTERY_HOME": str(Path(tmp) / "home")}
        commands = {
            "train": lambda run: [*TRAIN, "--out", str(Path(tmp) / f"train-{run}")],
            "sweep --dry-run": lambda run: ["sweep", "configs/demo.yaml", "--dry-run"],
        }
        for name, argv_of in commands.items():
            times: dict[str, list[float]] = {"prompt": [], "teardown": []}
            for run in range(args.repeat):
                times["prompt"].append(timed_command(PROMPT + argv_of(f"p{run}"), env=env))
                times["teardown"].append(timed_command(TEARDOWN + argv_of(f"t{run}"), env=env))
            prompt, teardown = (statistics.median(times[k]) for k in ("prompt", "teardown"))
            print(
                f"lottery {name}: prompt exit {prompt:.2f} s, full teardown {teardown:.2f} s "
                f"(median of {args.repeat}): {teardown / prompt:.2f}x, {teardown - prompt:.2f} s saved"
            )
            key = name.split()[0]
            payload |= {f"{key}_prompt_s": prompt, f"{key}_teardown_s": teardown}
            payload[f"{key}_ratio"] = teardown / prompt
    save("cli_exit", payload)


if __name__ == "__main__":
    main()
