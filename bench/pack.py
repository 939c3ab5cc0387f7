"""Seed packs vs one seed at a time: seed-steps per second for CraterCNN on the crater patches.

Both ways run the real training loop (`trainers.loop.train`) on the same data slice in one
process: one seed at a time (several seeds, sequentially) and packs of K seeds. Also reports
achieved FLOP/s (counted with torch's FlopCounterMode) against a measured matmul peak.

    .venv/bin/python bench/pack.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import device_arg, machine, matmul_peak_flops, save
from trainers.config import TrialConfig
from trainers.data import LoadedData, load_data
from trainers.events import MemorySink
from trainers.loop import build_pack, train
from trainers.pack import auto_pack_size
from trainers.ranking import pack_logits, pack_loss

CRATERS = Path(os.environ.get("LOTTERY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def crater_slice(device: torch.device, n: int, image_size: int = 15) -> LoadedData:
    """The real crater patches (resized as in the paper), cut to n training images to bound run time."""
    doc = {"data": {"name": "craters", "data_dir": str(CRATERS), "image_size": image_size}}
    data = load_data(TrialConfig.model_validate(doc).data, 0, device)
    data.x_train, data.y_train = data.x_train[:n], data.y_train[:n]
    data.x_test, data.y_test = data.x_test[:128], data.y_test[:128]
    return data


def trial(filters: int, hidden: int, batch: int, full_batch: bool = False) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "model": {"name": "crater_cnn", "filters": filters, "hidden_fc": hidden, "init": "xavier"},
            "optim": {"name": "sgd", "lr": 0.01},
            "epochs": 1,
            "batch_size": batch,
            "full_batch": full_batch,
        }
    )


def seed_steps_per_s(cfg: TrialConfig, data: LoadedData, seeds: int, pack: int, device) -> float:
    """Steady state from the loop's own per-epoch wall times, first epoch (warm-up) left out.

    Model building and data setup are outside those times, so no subtraction of noisy totals is
    needed. Records of one pack share their epoch's wall time: count it once per pack.
    """
    steps = -(-len(data.x_train) // cfg.batch_size)
    sink = MemorySink()
    train(cfg.model_copy(update={"epochs": 3}), sink, seeds=list(range(seeds)), pack_size=pack, data=data)
    leaders = set(range(0, seeds, pack))  # the first seed of every pack
    walls = [r.wall_s for r in sink.epochs if r.epoch >= 1 and r.seed in leaders]
    return pack * steps * len(walls) / sum(walls)


def step_flops(cfg: TrialConfig, data: LoadedData, pack: int) -> float:
    model = build_pack(cfg, list(range(pack)), data)
    x, y = data.x_train[: cfg.batch_size], data.y_train[: cfg.batch_size]
    with FlopCounterMode(display=False) as counter:
        loss, _ = pack_loss(pack_logits(model.to(x.device), x), y)
        loss.backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer widths and packs (for CI smoke runs)")
    args = parser.parse_args()
    device = device_arg(args.device)
    peaks = [matmul_peak_flops(device)]  # measured again after every width; the highest is the roof
    data = crater_slice(device, n=1024)
    widths = [(1, 500, 32), (4, 500, 32), (1, 0, 32), (4, 0, 32), (20, 500, 128)]
    packs = [8, 32] if args.quick else [8, 32, 64, 128]
    if args.quick:
        widths = widths[:2] + widths[-1:]
    rows = []
    print(machine())
    for filters, hidden, batch in widths:
        cfg = trial(filters, hidden, batch)
        single = seed_steps_per_s(cfg, data, seeds=4, pack=1, device=device)
        flops1 = step_flops(cfg, data, 1)
        row = {
            "filters": filters,
            "hidden_fc": hidden,
            "batch": batch,
            "single_seed_steps_per_s": single,
            "single_gflops": single * flops1 / 1e9,
            "packs": {},
        }
        for k in packs:
            rate = seed_steps_per_s(cfg, data, seeds=k, pack=k, device=device)
            row["packs"][k] = {
                "seed_steps_per_s": rate,
                "ratio": rate / single,
                "gflops": rate * flops1 / 1e9,
            }
        best = max(row["packs"].items(), key=lambda kv: kv[1]["ratio"])
        print(
            f"filters={filters:>2} fc={hidden:>3} batch={batch:>3}: one seed {single:7.0f} seed-steps/s "
            f"({row['single_gflops']:.1f} GFLOP/s); "
            + ", ".join(f"pack {k}: {v['ratio']:.2f}x" for k, v in row["packs"].items())
            + f"; best pack {best[0]}"
        )
        rows.append(row)
        peaks.append(matmul_peak_flops(device))
    large = large_steps(data, device, quick=args.quick)
    peak = max(peaks)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (best of {len(peaks)} measurements through the run)")
    for row in rows:
        row["single_peak_fraction"] = row["single_gflops"] * 1e9 / peak
        print(
            f"filters={row['filters']:>2} fc={row['hidden_fc']:>3}: one seed reaches "
            f"{100 * row['single_peak_fraction']:.0f}% of the matmul peak"
        )
    save(
        "pack",
        {
            "device": str(device),
            "matmul_peak_gflops": peak / 1e9,
            "matmul_peaks_gflops": [p / 1e9 for p in peaks],
            "rows": rows,
            "large_steps": large,
        },
    )


def large_steps(data: LoadedData, device: torch.device, *, quick: bool) -> list[dict]:
    """Packs at big steps (up to full batch), one thread as a trial runs: where `auto` stops packing.

    Each row also times the pack `pack_size: auto` picks, so the rule is checked where it matters:
    never slower per seed than a seed alone.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = len(data.x_train)
    cases = [(1, None), (2, 256), (2, None), (4, 64), (4, 128), (4, None)]
    if quick:
        cases = [(1, None), (4, None)]
    rows = []
    try:
        for filters, batch in cases:
            cfg = trial(filters, 0, batch or n, full_batch=batch is None)
            auto = auto_pack_size("crater_cnn", filters, False, 0, images_per_step=batch, device=device.type)
            single = seed_steps_per_s(cfg, data, seeds=3, pack=1, device=device)
            ratios = {k: seed_steps_per_s(cfg, data, k, k, device) / single for k in (8, 32)}
            if auto not in ratios:
                ratios[auto] = 1.0 if auto == 1 else seed_steps_per_s(cfg, data, auto, auto, device) / single
            row = {"filters": filters, "batch": batch or f"full ({n})", "auto": auto, "ratios": ratios}
            print(
                f"one thread, filters={filters} batch={row['batch']}: "
                + ", ".join(f"pack {k}: {r:.2f}x" for k, r in sorted(ratios.items()))
                + f"; auto packs {auto} ({ratios[auto]:.2f}x)"
            )
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
