"""Generic (torch.func) seed packs vs grouped-conv packs vs one seed at a time, CraterCNN on craters.

All three ways run the real training loop (`trainers.loop.train`) on the same data slice, in one
process and interleaved per width, so a neighbour's load hits all of them alike; the ratios are
what to read. Targets (CPU): a generic pack >= 0.8x a grouped pack's per-seed throughput, and
>= 3x one seed at 1 filter, batch 32.

    LOTTERY_SHARED_DATA=/path/to/data .venv/bin/python bench/generic_pack.py [--device cpu|cuda]
        [--hidden 500] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import device_arg, machine, save
from bench.pack import crater_slice, trial
from trainers.config import TrialConfig
from trainers.data import LoadedData
from trainers.events import MemorySink
from trainers.loop import train


def seed_steps_per_s(cfg: TrialConfig, data: LoadedData, pack: int, generic: bool) -> float:
    """Steady state from the loop's per-epoch wall times (first epoch left out), as bench/pack.py."""
    steps = -(-len(data.x_train) // cfg.batch_size)
    seeds = max(pack, 4)
    sink = MemorySink()
    run = cfg.model_copy(update={"epochs": 3})
    train(run, sink, seeds=list(range(seeds)), pack_size=pack, data=data, generic=generic)
    leaders = set(range(0, seeds, pack))
    walls = [r.wall_s for r in sink.epochs if r.epoch >= 1 and r.seed in leaders]
    return pack * steps * len(walls) / sum(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=500, help="crater_cnn hidden FC width (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="1 filter only (smoke runs)")
    args = parser.parse_args()
    device = device_arg(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = crater_slice(device, n=1024)
    print(machine())
    rows = []
    for filters in [1] if args.quick else [1, 2, 4]:
        cfg = trial(filters, args.hidden, 32)
        single = seed_steps_per_s(cfg, data, 1, generic=False)
        row = {"filters": filters, "hidden_fc": args.hidden, "batch": 32, "single": single, "packs": {}}
        for k in (8, 32):
            grouped = seed_steps_per_s(cfg, data, k, generic=False)
            generic = seed_steps_per_s(cfg, data, k, generic=True)
            row["packs"][k] = {
                "grouped": grouped,
                "generic": generic,
                "generic_vs_grouped": generic / grouped,
                "generic_vs_single": generic / single,
                "grouped_vs_single": grouped / single,
            }
            print(
                f"filters={filters} fc={args.hidden} batch=32 pack {k:>2}: one seed {single:6.0f}, grouped "
                f"{grouped:6.0f}, generic {generic:6.0f} seed-steps/s; generic/grouped "
                f"{generic / grouped:.2f}x, generic/one seed {generic / single:.2f}x, grouped/one seed "
                f"{grouped / single:.2f}x",
                flush=True,
            )
        rows.append(row)
    save("generic_pack", {"device": str(device), "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
