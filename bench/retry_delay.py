"""Retry delay after a training worker is killed: Tune with and without actor reuse.

One spec (4 trials, 2 at a time, 20 epochs each), run as `lottery sweep` in a subprocess per
side, alternating sides; once the first trial has written 3 epochs its worker process gets
SIGKILL. Measured per run:
  delay : from the kill to the start of the trial's next attempt (attempts.jsonl `started`),
          i.e. how long Tune takes to notice the dead actor, clean up and start a new one;
  total : the whole `lottery sweep` command.
With `reuse_actors=True` Tune keeps finished trials' actors for the next trial; after a worker
death it has been seen to start and kill several cached actors in a row before the retry
(ray-project/ray#42951). The side that ships is `orchestrator.run.sweep.REUSE_ACTORS`.

    .venv/bin/python bench/retry_delay.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402
from orchestrator import layout  # noqa: E402
from orchestrator.spec import load_plan  # noqa: E402

DRIVER = (
    "import sys; import orchestrator.run.sweep as s; s.REUSE_ACTORS = sys.argv[1] == 'reuse'; "
    "from orchestrator.cli import app; app(sys.argv[2:])"
)


def write_spec(directory: Path) -> Path:
    doc = {
        "name": "retry",
        "base": {
            "data": {"name": "digits"},
            "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 16},
            "optim": {"name": "adam", "lr": 0.002},
            "epochs": 20,
            "device": "cpu",
        },
        "seeds": [0, 1],
        "schemes": [{"name": "baseline"}, {"name": "randomout", "params": {"tau": 1e-6}}],
        "storage_path": str(directory / "runs"),
        "max_failures": 2,
        "max_concurrent_trials": 2,
        "pack_size": 1,
    }
    path = directory / "retry.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def epochs_written(trial_dir: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(trial_dir / layout.METRICS).num_rows
    except (OSError, ValueError):
        return 0


def attempts(trial_dir: Path) -> list[dict]:
    path = trial_dir / layout.ATTEMPTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def one_run(side: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rd", dir="/tmp") as tmp:
        directory = Path(tmp)
        spec = write_spec(directory)
        trial_dir = layout.trial_dir(directory / "runs" / "retry", load_plan(spec).trials[0].trial_key())
        env = os.environ | {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        start = time.time()
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, side, "sweep", str(spec)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while epochs_written(trial_dir) < 3:
                if driver.poll() is not None or time.time() - start > 300:
                    raise SystemExit(f"{side}: the trial ended before it could be killed")
                time.sleep(0.05)
            killed_at = time.time()
            os.kill(attempts(trial_dir)[0]["pid"], signal.SIGKILL)
            while len(attempts(trial_dir)) < 2:
                if driver.poll() is not None or time.time() - killed_at > 600:
                    raise SystemExit(f"{side}: no retry")
                time.sleep(0.05)
            delay = attempts(trial_dir)[1]["started"] - killed_at
            returncode = driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        if returncode != 0:
            raise SystemExit(f"{side}: lottery sweep exited {returncode}")
        return {"delay_s": delay, "total_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"reuse": [], "fresh": []}
    for _ in range(args.repeat):
        for side in runs:
            runs[side].append(one_run(side))
            print(side, runs[side][-1], flush=True)
    summary = {
        side: {key: statistics.median(r[key] for r in found) for key in ("delay_s", "total_s")}
        for side, found in runs.items()
    }
    for side, found in runs.items():
        delays = ", ".join(f"{r['delay_s']:.1f}" for r in found)
        totals = ", ".join(f"{r['total_s']:.1f}" for r in found)
        print(f"{side:5s}: retry delay {delays} s, sweep {totals} s")
    ratio = summary["reuse"]["delay_s"] / summary["fresh"]["delay_s"]
    print(f"retry delay with actor reuse / without: {ratio:.2f}x (medians)")
    save("retry_delay", {"runs": runs, "median": summary, "delay_ratio_reuse_over_fresh": ratio})


if __name__ == "__main__":
    main()
