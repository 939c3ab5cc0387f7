"""Shared benchmark plumbing: the machine line, a matmul peak, median timing, a results file.

Absolute times on a shared 2-core machine swing by 20-40 %; every benchmark therefore
times both ways in the same run, interleaved, and reports the ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {sys.version.split()[0]}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_times(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    return statistics.median(run_times(fn, device, repeat))


def matmul_peak_flops(device: torch.device, n: int = 2048, repeat: int = 7) -> float:
    """Measured float32 matmul FLOP/s: the roof that compute-bound training is compared with.

    A roof is the best the machine did, so this takes the fastest run, not the median: on a shared
    machine a neighbour's load would otherwise lower the roof and flatter the fraction reached.
    """
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    seconds = min(run_times(lambda: a @ b, device, repeat))
    return 2 * n**3 / seconds


def device_arg(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda: no CUDA device here; run on a GPU machine or use --device cpu"
        )
    return torch.device(name)


def save(name: str, payload: dict) -> Path:
    """bench/out/<name>.json, read by bench/run_all.py to write bench/RESULTS.md."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload | {"machine": machine()}, indent=2))
    return path


def timed_command(argv: list[str], expected_rc: int = 0, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one fresh process run from the repository root; a wrong exit code stops the bench."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != expected_rc:
        raise SystemExit(f"{argv}: exit {done.returncode}, expected {expected_rc}: {done.stderr[-800:]}")
    return elapsed
