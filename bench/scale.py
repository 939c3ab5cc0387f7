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

    .venv/bin/python bench/scale.py [--trials 150] [--epochs 1] [--samples 200]
                                    [--against NAME=VALUE] [--against-spec FIELD=YAML]

`--against TUNE_GLOBAL_CHECKPOINT_S=0` runs the same sweep a second time with Tune's experiment
state saved on every controller step (this project's earlier setting) and prints the ratio;
`--against-spec run_figures=false` runs it without the per-run CGN figures. `--samples 25000`
to `50000` makes a one-epoch trial about one second here, the anchor's trial length (the
machine's speed drifts from day to day: read the printed median).
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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from specfactory import spec_doc  # noqa: E402

from bench.common import save  # noqa: E402
from orchestrator import layout  # noqa: E402


def tiny_spec(path: Path, trials: int, epochs: int, samples: int, fields: dict[str, object]) -> Path:
    base = {
        "data": {"name": "synthetic", "synthetic_samples": samples},
        "model": {"name": "crater_cnn", "filters": 1, "hidden_fc": 0},
        "epochs": epochs,
        "device": "cpu",
    }
    doc = spec_doc("scale", base=base, seeds=list(range(trials)), pack_size=1, resources={"cpu": 1}) | fields
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass(frozen=True)
class Measured:
    """One `lottery sweep` of the tiny spec, and where its wall clock went."""

    trials: int
    attempts: int
    workers: int
    trial_s: list[float]
    wall: float
    startup: float  # driver started -> first attempt started
    tail: float  # last result written -> driver exited (the MLflow queue draining)
    processes: int
    gap_median: float  # on one worker: previous result written -> next attempt started
    gap_mean: float
    inside_median: float  # inside an attempt beyond the trial's own time: status, drawing, result

    @property
    def ideal(self) -> float:
        return sum(self.trial_s) / self.workers

    @property
    def overhead(self) -> float:
        return self.wall - self.ideal

    def payload(self) -> dict[str, float]:
        n = len(self.trial_s)
        return {
            "trials": n,
            "workers": self.workers,
            "trial_s_sum": sum(self.trial_s),
            "ideal_s": self.ideal,
            "sweep_s": self.wall,
            "overhead_s": self.overhead,
            "overhead_per_trial_s": self.overhead / n,
            "over_ideal": self.wall / self.ideal - 1,
            "startup_s": self.startup,
            "tail_s": self.tail,
            "gap_median_s": self.gap_median,
            "gap_mean_s": self.gap_mean,
            "inside_attempt_median_s": self.inside_median,
        }


def run_sweep(
    trials: int, epochs: int, samples: int, workers: int, extra_env: dict[str, str], fields: dict[str, object]
) -> Measured:
    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        spec = tiny_spec(tmp / "scale.yaml", trials, epochs, samples, fields)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LOTTERY_"))}
        env |= {"LOTTERY_HOME": str(tmp / "home"), "RAY_USAGE_STATS_ENABLED": "0"} | extra_env
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
        spans = [  # (worker pid, attempt start, result written)
            (a[-1]["pid"], a[-1]["started"], (d / layout.RESULT).stat().st_mtime)
            for a, d in zip(lines, dirs, strict=True)
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gaps = []
    for pid in {p for p, _, _ in spans}:
        mine = sorted((b, e) for p, b, e in spans if p == pid)
        gaps += [b2 - e1 for (_, e1), (b2, _) in zip(mine, mine[1:], strict=False)]
    gaps.sort()
    inside = sorted((e - b) - t for (_, b, e), t in zip(spans, trial_s, strict=True))
    return Measured(
        trials=trials,
        attempts=sum(len(a) for a in lines),
        workers=workers,
        trial_s=trial_s,
        wall=wall,
        startup=min(b for _, b, _ in spans) - started_at,
        tail=ended_at - max(e for _, _, e in spans),
        processes=len({p for p, _, _ in spans}),
        gap_median=gaps[len(gaps) // 2] if gaps else 0.0,
        gap_mean=sum(gaps) / len(gaps) if gaps else 0.0,
        inside_median=inside[len(inside) // 2],
    )


def report(label: str, m: Measured, epochs: int) -> None:
    n = len(m.trial_s)
    print(
        f"[{label}] {n} of {m.trials} trials of {epochs} epoch(s) finished, {m.attempts} attempts, "
        f"{m.workers} workers"
    )
    print(
        f"  trials' own time: {sum(m.trial_s):.1f} s in all, "
        f"median {sorted(m.trial_s)[n // 2]:.3f} s per trial"
    )
    print(f"  ideal (own time / workers): {m.ideal:7.1f} s")
    print(
        f"  where the rest goes: start-up to the first trial {m.startup:.1f} s, last result to exit "
        f"{m.tail:.1f} s, {m.processes} worker processes, between two trials on one "
        f"worker median {m.gap_median:.2f} s (mean {m.gap_mean:.2f} s); inside an attempt beyond the "
        f"trial's own time median {m.inside_median:.2f} s"
    )
    print(f"  lottery sweep wall clock:   {m.wall:7.1f} s")
    print(
        f"  overhead: {m.overhead:.1f} s in all, {m.overhead / n:.2f} s per trial "
        f"({m.overhead / n * m.workers:.2f} worker-s per trial), {m.wall / m.ideal - 1:.0%} over ideal"
    )


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=1, help="per trial (--samples sets an epoch's length)")
    parser.add_argument(
        "--samples",
        type=int,
        default=200,
        help="generated samples per trial: sets a trial's length (25000-50000: about one second here)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="CPUs the local Ray schedules on")
    parser.add_argument(
        "--against",
        metavar="NAME=VALUE",
        type=_pair,
        action="append",
        default=[],
        help="also run the sweep with this environment variable set (e.g. an earlier default) and print "
        "the ratio of the two wall clocks; repeatable",
    )
    parser.add_argument(
        "--against-spec",
        metavar="FIELD=YAML",
        type=_pair,
        action="append",
        default=[],
        help="also run the sweep with this spec field set (e.g. run_figures=false); repeatable, and "
        "combined with --against into one second run",
    )
    args = parser.parse_args()
    versions = ", ".join(f"{lib} {metadata.version(lib)}" for lib in ("torch", "ray", "mlflow"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, {versions}"
    )
    other = dict(args.against)
    fields = {k: yaml.safe_load(v) for k, v in args.against_spec}
    sizes = (args.trials, args.epochs, args.samples, args.workers)
    ours = run_sweep(*sizes, {}, {})
    report("defaults", ours, args.epochs)
    payload = ours.payload()
    if other or fields:
        theirs = run_sweep(*sizes, other, fields)
        label = " ".join(f"{k}={v}" for k, v in args.against + args.against_spec)
        report(label, theirs, args.epochs)
        print(
            f"wall clock {label} / defaults: {theirs.wall / ours.wall:.2f}x; overhead per trial "
            f"{theirs.overhead / len(theirs.trial_s):.2f} s vs {ours.overhead / len(ours.trial_s):.2f} s"
        )
        payload |= {
            "against": label,
            "against_sweep_s": theirs.wall,
            "against_over_ideal": theirs.wall / theirs.ideal - 1,
        }
    save("scale", payload)
    print(json.dumps({"over_ideal": round(ours.wall / ours.ideal - 1, 3)}))


if __name__ == "__main__":
    main()
