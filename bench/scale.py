"""Scale: many one-epoch tiny trials through `lottery sweep` vs the ideal on the same cluster.

One run, two numbers from it:
  sweep: `python -m orchestrator sweep SPEC` as a subprocess with a fresh $LOTTERY_HOME, N
         one-epoch trials of a 1-filter CraterCNN on generated data, one seed per Tune trial
         (pack_size 1), every trial one CPU: Ray start-up, worker start-up, Tune bookkeeping,
         trial directories, MLflow parent and child runs, shutdown. Wall clock.
  ideal: the trials' own time (result.json wall_s: data ready to result written) summed and
         divided by the number of workers (the CPUs Ray schedules trials on).
Printed: the overhead over ideal in total and per trial, and as a fraction of ideal. The anchor
is Ray's own benchmark, 10,000 one-second trials on 16 CPUs at 14 % over ideal; trials here
train for well under a second, so the same fixed cost per trial weighs far more.

    .venv/bin/python bench/scale.py [--trials 150] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402
from orchestrator import layout  # noqa: E402


def tiny_spec(path: Path, trials: int, epochs: int) -> Path:
    doc = {
        "name": "scale",
        "base": {
            "data": {"name": "synthetic", "synthetic_samples": 200},
            "model": {"name": "crater_cnn", "filters": 1, "hidden_fc": 0},
            "epochs": epochs,
            "device": "cpu",
        },
        "seeds": list(range(trials)),
        "schemes": [{"name": "baseline"}],
        "pack_size": 1,
        "resources": {"cpu": 1},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument(
        "--epochs", type=int, default=1, help="per trial; about 6 make the anchor's one-second trials here"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="CPUs the local Ray schedules on")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        spec = tiny_spec(tmp / "scale.yaml", args.trials, args.epochs)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LOTTERY_"))}
        env |= {"LOTTERY_HOME": str(tmp / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
        start, started_at = time.perf_counter(), time.time()
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        wall, ended_at = time.perf_counter() - start, time.time()
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        sweep_dir = tmp / "home" / "scale"
        dirs = sorted(layout.trials_root(sweep_dir).iterdir())
        results = [layout.read_result(d) for d in dirs]  # every trial finished (the sweep exited 0)
        trial_s = [r["wall_s"] for r in results]
        lines = [[json.loads(x) for x in (d / layout.ATTEMPTS).read_text().splitlines()] for d in dirs]
        attempts = [len(a) for a in lines]
        spans = [  # (worker pid, attempt start, result written)
            (a[-1]["pid"], a[-1]["started"], (d / layout.RESULT).stat().st_mtime)
            for a, d in zip(lines, dirs, strict=True)
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(trial_s)
    ideal = sum(trial_s) / args.workers
    overhead = wall - ideal
    versions = ", ".join(f"{lib} {metadata.version(lib)}" for lib in ("torch", "ray", "mlflow"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, {versions}"
    )
    print(
        f"{n} of {args.trials} trials of {args.epochs} epoch(s) finished, {sum(attempts)} attempts, "
        f"{args.workers} workers"
    )
    print(f"trials' own time: {sum(trial_s):.1f} s in all, median {sorted(trial_s)[n // 2]:.3f} s per trial")
    gaps = []  # on one worker process: previous trial's result written -> next trial's attempt started
    for pid in {p for p, _, _ in spans}:
        mine = sorted((b, e) for p, b, e in spans if p == pid)
        gaps += [b2 - e1 for (_, e1), (b2, _) in zip(mine, mine[1:], strict=False)]
    gaps.sort()
    gap = gaps[len(gaps) // 2] if gaps else 0.0
    gap_mean = sum(gaps) / len(gaps) if gaps else 0.0
    # inside an attempt but outside the trial's own time: status checks, data, drawing, result write
    inside = sorted((e - b) - t for (_, b, e), t in zip(spans, trial_s, strict=True))
    inside_median = inside[len(inside) // 2]
    startup = min(b for _, b, _ in spans) - started_at
    tail = ended_at - max(e for _, _, e in spans)
    print(f"ideal (own time / workers): {ideal:7.1f} s")
    print(
        f"where the rest goes: start-up to the first trial {startup:.1f} s, last result to exit "
        f"{tail:.1f} s, {len({p for p, _, _ in spans})} worker processes, between two trials on one "
        f"worker median {gap:.2f} s (mean {gap_mean:.2f} s); inside an attempt beyond the trial's own "
        f"time median {inside_median:.2f} s"
    )
    print(f"lottery sweep wall clock:   {wall:7.1f} s")
    print(
        f"overhead: {overhead:.1f} s in all, {overhead / n:.2f} s per trial "
        f"({overhead / n * args.workers:.2f} worker-s per trial), {wall / ideal - 1:.0%} over ideal"
    )
    save(
        "scale",
        {
            "trials": n,
            "workers": args.workers,
            "trial_s_sum": sum(trial_s),
            "ideal_s": ideal,
            "sweep_s": wall,
            "overhead_s": overhead,
            "overhead_per_trial_s": overhead / n,
            "over_ideal": wall / ideal - 1,
            "startup_s": startup,
            "tail_s": tail,
            "gap_median_s": gap,
            "gap_mean_s": gap_mean,
            "inside_attempt_median_s": inside_median,
        },
    )
    print(json.dumps({"over_ideal": round(wall / ideal - 1, 3)}))


if __name__ == "__main__":
    main()
