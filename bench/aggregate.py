"""Aggregation speed: ours vs per-trial pandas reads, side by side on the same synthetic sweep.

Writes N trial directories in the on-disk contract (tests/sweepfactory.py) into a temporary
directory, then times, on the same files in the same process:
  ours:  load_trials (stdlib json, one DataFrame) + summarise; load_epochs (pyarrow, one concat)
  naive: pd.read_json per file + row-by-row pd.concat, then the same summarise;
         pd.read_parquet per file + assign + pd.concat for the epochs.
Both sides must produce the same table before any time is reported.

    .venv/bin/python bench/aggregate.py [--trials 10000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sweepfactory import lottery_trials, write_sweep  # noqa: E402

from bench.common import save  # noqa: E402
from dashboards.stats import TRIAL_COLUMNS, summarise  # noqa: E402
from orchestrator.aggregate import load_epochs, load_trials  # noqa: E402

ARMS = [("baseline", {}), ("batchnorm", {}), ("repr", {})] + [
    ("randomout", {"tau": 10.0**-e, "active_fraction": p})
    for e in (4, 6, 8, 10, 12, 14)
    for p in (0.25, 0.5, 1.0)
]


def naive_load_trials(sweep_dir: Path) -> pd.DataFrame:
    """The loop people write first: pandas per file, one concat per trial."""
    spec = pd.read_json(sweep_dir / "spec.json", typ="series")
    frame = pd.DataFrame()
    for planned in pd.read_json(sweep_dir / "trials.json").to_dict("records"):
        trial_dir = sweep_dir / "trials" / planned["trial_key"]
        row = pd.Series(planned)
        row["sweep"], row["failure_margin"], row["status"] = spec["name"], spec["failure_margin"], "pending"
        if (trial_dir / "config.json").exists():
            config = pd.read_json(trial_dir / "config.json", typ="series")
            for key in ("model", "dataset", "filters"):
                row[key] = config[key]
            row["hparams"] = json.dumps(config["hparams"], sort_keys=True)
            row["status"] = "incomplete"
        if (trial_dir / "result.json").exists():
            result = pd.read_json(trial_dir / "result.json", typ="series")
            row = pd.concat([row, result.drop(["seed", "failure_margin"])])
            row["status"] = "finished"
        frame = pd.concat([frame, row.to_frame().T], ignore_index=True)
    frame = frame.reindex(columns=list(TRIAL_COLUMNS))
    frame[["failed", "diverged"]] = frame[["failed", "diverged"]].fillna(False)
    floats = [c for c, t in TRIAL_COLUMNS.items() if t == "float64"]
    frame[floats] = frame[floats].apply(pd.to_numeric)
    return frame.astype(TRIAL_COLUMNS)


def naive_load_epochs(sweep_dir: Path, trials: pd.DataFrame) -> pd.DataFrame:
    parts = []
    for t in trials.itertuples():
        path = sweep_dir / "trials" / t.trial_key / "metrics.parquet"
        if path.exists():
            parts.append(
                pd.read_parquet(path).assign(trial_key=t.trial_key, scheme=t.scheme, filters=t.filters)
            )
    return pd.concat(parts, ignore_index=True)


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per side")
    args = parser.parse_args()
    seeds_per_arm = math.ceil(args.trials / (2 * len(ARMS)))
    planned = lottery_trials(ARMS, seeds=range(seeds_per_arm), filters=(4, 8))[: args.trials]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sweep_dir = write_sweep(Path(tmp), "bench", planned)
        print(f"wrote {len(planned)} trial directories in {time.perf_counter() - start:.1f} s")

        t_load, trials = best_time(lambda: load_trials(sweep_dir), args.repeat)
        summarise(trials.head(100))  # warm-up: scipy loads its bootstrap/wilcoxon code lazily
        t_sum, summary = best_time(lambda: summarise(trials), args.repeat)
        t_epochs, epochs = best_time(lambda: load_epochs(sweep_dir, trials), args.repeat)
        n_load, naive = best_time(lambda: naive_load_trials(sweep_dir), args.repeat)
        n_sum, _ = best_time(lambda: summarise(naive), args.repeat)
        n_epochs, naive_epochs = best_time(lambda: naive_load_epochs(sweep_dir, trials), args.repeat)

    cols = ["trial_key", "status", "final_test_acc", "failed", "filters", "hparams"]
    pd.testing.assert_frame_equal(naive[cols], trials[cols])
    assert len(naive_epochs) == len(epochs)

    print(f"python {platform.python_version()}, pandas {pd.__version__}, pyarrow {pyarrow.__version__}")
    print(f"{len(trials)} trials, {len(summary)} configs, {len(epochs)} epoch rows; best of {args.repeat}")
    ours, theirs = t_load + t_sum, n_load + n_sum
    print(f"ours : load_trials {t_load:7.2f} s + summarise {t_sum:5.2f} s = {ours:7.2f} s")
    print(f"naive: load        {n_load:7.2f} s + summarise {n_sum:5.2f} s = {theirs:7.2f} s")
    print(f"ratio naive / ours (trials + summary): {theirs / ours:.1f}x")
    print(f"epochs: load_epochs {t_epochs:.2f} s vs per-file pd.read_parquet {n_epochs:.2f} s", end=" ")
    print(f"= {n_epochs / t_epochs:.1f}x")
    save(
        "aggregate",
        {
            "trials": len(trials),
            "ours_s": ours,
            "naive_s": theirs,
            "ratio": theirs / ours,
            "load_trials_s": t_load,
            "summarise_s": t_sum,
            "load_epochs_s": t_epochs,
            "naive_epochs_s": n_epochs,
        },
    )


if __name__ == "__main__":
    main()
