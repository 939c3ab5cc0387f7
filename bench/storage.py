"""Trial directories on S3 vs on local disk: seconds per trial that the object store adds.

One process trains the same tiny trials (crater_cnn on digits, `--epochs` epochs, a checkpoint
every epoch) with `run_trial`, alternately into a local directory and into a bucket on a SeaweedFS
S3 server on loopback (tests/s3server.py, the compose command), so both sides see the same machine
load. Every file a trial writes (config, metrics/layers Parquet and a trace part per epoch, the
checkpoint, the consolidated trace, result.json last) goes through orchestrator/layout.py either way.
Printed: median wall seconds per trial on each side, the difference (the S3 write cost per trial)
and the ratio, and the same for reading the sweep back (`aggregate.load_trials` + `load_epochs`).
A loopback server has no network latency: against a remote store add ~(files x round trip).

    .venv/bin/python bench/storage.py [--trials 6] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from s3server import s3_server  # noqa: E402

from bench.common import save  # noqa: E402
from orchestrator import layout, storage  # noqa: E402
from orchestrator.aggregate import load_epochs, load_trials  # noqa: E402
from orchestrator.run.trial import run_trial  # noqa: E402
from trainers.config import TrialConfig  # noqa: E402
from trainers.data import load_data  # noqa: E402

BUCKET = "bench"


def trial(seed: int, epochs: int) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "data": {"name": "digits"},
            "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 16},
            "optim": {"name": "adam", "lr": 0.002},
            "epochs": epochs,
            "seed": seed,
            "device": "cpu",
        }
    )


def write_spec(sweep_dir: layout.Location, keys: list[str]) -> None:
    layout.atomic_write_json(layout.spec_file(sweep_dir), {"name": "bench", "failure_margin": 0.05})
    layout.atomic_write_json(layout.plan_file(sweep_dir), [{"trial_key": k} for k in keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = [trial(seed, args.epochs) for seed in range(args.trials)]
    data = load_data(configs[0].data, configs[0].data_seed, torch.device("cpu"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    with s3_server(tmp / "weed") as server:
        server.create_bucket(BUCKET)
        os.environ.update(server.env)
        storage._filesystem.cache_clear()
        sides: dict[str, layout.Location] = {
            "local": tmp / "local" / "bench",
            "s3": storage.location(f"s3://{BUCKET}/runs/bench"),
        }
        run_trial(configs[0], tmp / "warm", sweep="warm", data=data)  # imports and first-call costs
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for config in configs:
            for side, sweep_dir in sides.items():
                start = time.perf_counter()
                run_trial(config, layout.trial_dir(sweep_dir, config.trial_key()), sweep="bench", data=data)
                seconds[side].append(time.perf_counter() - start)
        keys = [c.trial_key() for c in configs]
        reads: dict[str, float] = {}
        for side, sweep_dir in sides.items():
            write_spec(sweep_dir, keys)
            start = time.perf_counter()
            trials = load_trials(sweep_dir)
            epochs = load_epochs(sweep_dir, trials)
            reads[side] = time.perf_counter() - start
            assert len(trials) == args.trials and len(epochs) == args.trials * args.epochs
        per_trial = len((layout.trial_dir(sides["s3"], keys[0])).files())

    local, s3 = (statistics.median(seconds[s]) for s in ("local", "s3"))
    print(f"{args.trials} trials x {args.epochs} epochs, crater_cnn 2 filters on digits, 1 torch thread")
    print(f"files left per trial directory: {per_trial} (plus one PUT per epoch of parts and checkpoint)")
    print(f"train + write, local disk : {local:6.3f} s per trial (median)")
    print(f"train + write, S3 loopback: {s3:6.3f} s per trial (median)")
    print(f"S3 writes add {s3 - local:+.3f} s per trial ({s3 / local:.2f}x)")
    print(
        f"read back {args.trials} trials: local {reads['local']:.3f} s, S3 {reads['s3']:.3f} s "
        f"({reads['s3'] / reads['local']:.2f}x)"
    )
    save(
        "storage",
        {
            "trials": args.trials,
            "epochs": args.epochs,
            "local_s_per_trial": local,
            "s3_s_per_trial": s3,
            "s3_write_s_per_trial": s3 - local,
            "ratio": s3 / local,
            "read_local_s": reads["local"],
            "read_s3_s": reads["s3"],
        },
    )


if __name__ == "__main__":
    main()
