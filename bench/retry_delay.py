"""Retry delay after a training worker is killed: Tune with and without actor reuse, lone seeds and packs.

Two specs, each run as `lottery sweep` in a subprocess per side, alternating sides: `alone` (4
trials, one seed each, 2 at a time, 20 epochs) and `pack` (4 packs of 16 seeds, as many at a time
as the CPUs allow, 20 epochs). Once the first trial has written 3 epochs its worker process (for a
pack, the one process training all 16 seeds) gets SIGKILL. Measured per run:
  delay : from the kill to the start of the trial's next attempt (attempts.jsonl `started`),
          i.e. how long Tune takes to notice the dead actor, clean up and start a new one;
  spawn : from the kill to the creation of the process that runs the retry (Tune noticing the dead
          actor, freeing its resources and asking Ray for a new one: what Tune's scheduling costs);
  start : from that process's creation to the retry's start (Python importing Ray, Tune and
          torch and Tune setting up the trial: what the machine's speed costs). With actor reuse
          that process may have been started for another trial, which ran first: then `start`
          holds the wait for it;
  total : the whole `lottery sweep` command.
With `reuse_actors=True` Tune keeps finished trials' actors for the next trial; after a worker
death it has been seen to start and kill several cached actors in a row before the retry
(ray-project/ray#42951). The side that ships is `orchestrator.run.tuner.REUSE_ACTORS`.

    .venv/bin/python bench/retry_delay.py [--repeat 2] [--scenario alone pack] [--side reuse fresh]
        [--epochs 20]
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from specfactory import BASE, TWO_ARMS, spec_doc  # noqa: E402

from bench.common import save  # noqa: E402
from orchestrator import layout  # noqa: E402
from orchestrator.spec import load_plan  # noqa: E402

DRIVER = (
    "import sys; import orchestrator.run.tuner as s; s.REUSE_ACTORS = sys.argv[1] == 'reuse'; "
    "from orchestrator.cli import app; app(sys.argv[2:])"
)


SCENARIOS = {  # name: (seeds, pack_size, max_concurrent_trials)
    "alone": ([0, 1], 1, 2),
    "pack": (list(range(32)), 16, None),  # as many at a time as the CPUs allow, as a spec says by default
}


def write_spec(directory: Path, scenario: str, epochs: int = 20) -> Path:
    seeds, pack_size, concurrent = SCENARIOS[scenario]
    doc = spec_doc(
        "retry",
        base=BASE | {"epochs": epochs},
        seeds=seeds,
        schemes=TWO_ARMS,
        storage_path=str(directory / "runs"),
        max_failures=2,
        max_concurrent_trials=concurrent,
        pack_size=pack_size,
    )
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


def one_run(side: str, scenario: str, epochs: int = 20) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rd", dir="/tmp") as tmp:
        directory = Path(tmp)
        spec = write_spec(directory, scenario, epochs)
        trial_dir = layout.trial_dir(directory / "runs" / "retry", load_plan(spec).trials[0].trial_key())
        env = os.environ | {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        log = directory / "driver.log"
        start = time.time()
        with log.open("w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, side, "sweep", str(spec)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            while epochs_written(trial_dir) < 3:
                if driver.poll() is not None or time.time() - start > 300:
                    raise SystemExit(
                        f"{scenario} {side}: the trial ended before it could be killed\n{tail(log)}"
                    )
                time.sleep(0.05)
            killed_at = time.time()
            os.kill(attempts(trial_dir)[0]["pid"], signal.SIGKILL)
            while len(attempts(trial_dir)) < 2:
                if driver.poll() is not None or time.time() - killed_at > 600:
                    raise SystemExit(f"{scenario} {side}: no retry\n{tail(log)}")
                time.sleep(0.05)
            retry = attempts(trial_dir)[1]
            delay = retry["started"] - killed_at
            spawned = process_started(retry["pid"])
            returncode = driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        if returncode != 0:
            raise SystemExit(f"{scenario} {side}: lottery sweep exited {returncode}\n{tail(log)}")
        spawn = (
            {} if spawned is None else {"spawn_s": spawned - killed_at, "start_s": retry["started"] - spawned}
        )
        return {"delay_s": delay, "total_s": time.time() - start} | spawn


def process_started(pid: int) -> float | None:
    """When process `pid` was created (wall clock, to ~10 ms), from /proc; None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--side", nargs="+", choices=["reuse", "fresh"], default=["reuse", "fresh"])
    parser.add_argument(
        "--epochs", type=int, default=20, help="per trial: a waiting trial's wait for a slot grows with it"
    )
    args = parser.parse_args()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        scenario: {side: [] for side in args.side} for scenario in args.scenario
    }
    for _ in range(args.repeat):
        for scenario, sides in runs.items():
            for side, found in sides.items():
                found.append(one_run(side, scenario, args.epochs))
                print(scenario, side, found[-1], flush=True)
    summary = {
        scenario: {
            side: {key: statistics.median(r[key] for r in found) for key in ("delay_s", "total_s")}
            for side, found in sides.items()
        }
        for scenario, sides in runs.items()
    }
    for scenario, sides in runs.items():
        for side, found in sides.items():
            delays = ", ".join(f"{r['delay_s']:.1f}" for r in found)
            parts = ", ".join(
                f"{r.get('spawn_s', float('nan')):.1f}+{r.get('start_s', float('nan')):.1f}" for r in found
            )
            totals = ", ".join(f"{r['total_s']:.1f}" for r in found)
            median = summary[scenario][side]["delay_s"]
            print(
                f"{scenario:5s} {side:5s}: retry delay {delays} s (median {median:.1f}; "
                f"spawn+start {parts}), sweep {totals} s"
            )
    ratios = {
        scenario: summary[scenario]["reuse"]["delay_s"] / summary[scenario]["fresh"]["delay_s"]
        for scenario, sides in runs.items()
        if set(sides) == {"reuse", "fresh"}
    }
    for scenario, ratio in ratios.items():
        print(f"{scenario}: retry delay with actor reuse / without: {ratio:.2f}x (medians)")
    save("retry_delay", {"runs": runs, "median": summary, "delay_ratio_reuse_over_fresh": ratios})


if __name__ == "__main__":
    main()
