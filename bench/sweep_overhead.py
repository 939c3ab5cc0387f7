"""Sweep driver overhead: `lottery sweep` (Ray Tune + MLflow) vs a plain loop over run_trial.

Same spec, same trials, one run of each side, fresh directories:
  loop : this process calls run_trials for every planned unit (a trial, or a seed pack: the same
         grouping the sweep uses) in plan order, one at a time, with
         as many torch threads as the spec gives a trial (--loop-threads to change it: on a tiny
         CNN two threads are slower than one), data loaded once; no Ray, no MLflow;
  sweep: `python -m orchestrator sweep SPEC` as a subprocess with a fresh $LOTTERY_HOME: Ray
         start-up, per-epoch Tune checkpoints, experiment-state snapshots, MLflow parent and
         child runs, shutdown; everything a user waits for.
Also printed: the sum of the trials' own training time (result.json wall_s) on each side, so
the gap between orchestration cost and CPU contention is visible. Timings on a shared CPU vary
by +-20-40% between runs; compare the ratio, not the seconds.

    .venv/bin/python bench/sweep_overhead.py [--spec configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402
from orchestrator import layout  # noqa: E402
from orchestrator.run.trial import pack_key, run_trials  # noqa: E402
from orchestrator.spec import load_plan  # noqa: E402
from trainers.data import load_data  # noqa: E402
from trainers.loop import pick_device  # noqa: E402


def trial_seconds(sweep_dir: Path) -> float:
    results = (layout.read_result(d) for d in layout.trials_root(sweep_dir).iterdir())
    return sum(r["wall_s"] for r in results if r is not None)


def plain_loop(spec: Path, out: Path) -> tuple[float, float]:
    plan = load_plan(spec)
    start = time.perf_counter()
    cache = {}
    for unit in plan.units:
        members = [plan.trials[i] for i in unit]
        first = members[0]
        key = (first.data.model_dump_json(), first.data_seed)
        if key not in cache:
            cache[key] = load_data(first.data, first.data_seed, pick_device(first.device))
        dirs = [layout.trial_dir(out, t.trial_key()) for t in members]
        unit_dir = layout.pack_dir(out, pack_key(members))
        run_trials(members, dirs, sweep=plan.spec.name, pack_dir=unit_dir, data=cache[key])
    return time.perf_counter() - start, trial_seconds(out)


def ray_sweep(spec: Path, home: Path) -> tuple[float, float]:
    env = os.environ | {
        "LOTTERY_HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    return elapsed, trial_seconds(home / load_plan(spec).spec.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--loop-threads", type=int, default=None, help="default: the spec's cpu per trial")
    args = parser.parse_args()
    plan = load_plan(args.spec)
    torch.set_num_threads(args.loop_threads or max(1, int(plan.spec.resources.cpu)))
    if plan.spec.storage_path is not None:
        raise SystemExit(f"{args.spec}: storage_path is set; the bench needs fresh directories of its own")

    tmp = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    try:
        loop_s, loop_train = plain_loop(args.spec, tmp / "loop")
        sweep_s, sweep_train = ray_sweep(args.spec, tmp / "home")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    versions = ", ".join(f"{lib} {metadata.version(lib)}" for lib in ("torch", "ray", "mlflow"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"python {platform.python_version()}, {versions}; loop torch threads: {torch.get_num_threads()}")
    res = plan.spec.resources
    print(
        f"spec {args.spec.name}: {len(plan.trials)} trials in {len(plan.units)} units, "
        f"{res.cpu:g} CPU per unit in the sweep"
    )
    print(f"plain loop : {loop_s:7.1f} s wall (trials' own training time {loop_train:6.1f} s)")
    print(f"lottery sweep: {sweep_s:5.1f} s wall (trials' own training time {sweep_train:6.1f} s)")
    print(f"ratio sweep / loop: {sweep_s / loop_s:.2f}x")
    save(
        "sweep_overhead",
        {
            "spec": args.spec.name,
            "trials": len(plan.trials),
            "units": len(plan.units),
            "loop_s": loop_s,
            "sweep_s": sweep_s,
            "ratio": sweep_s / loop_s,
            "loop_train_s": loop_train,
            "sweep_train_s": sweep_train,
        },
    )


if __name__ == "__main__":
    main()
