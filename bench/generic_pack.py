"""Generic (torch.func) seed packs vs grouped-conv packs vs one seed at a time.

On CraterCNN (craters; 1, 2 and 4 filters, batch 32, packs of 8 and 32) all three ways, and on the
example net of examples/custom (a depthwise-separable net on the digits, which has no grouped pack)
generic packs vs one seed. Every way runs the real training loop (`trainers.loop.train`) on the same
data slice in one process. The ways take turns step by step and each way's median step is compared
(`step_rates`): on a machine shared with other work, whole-epoch runs taking turns (`--rounds`,
`measure`) gave ratios from 0.4x to 2x for the same code.
Targets (CPU): a generic pack >= 0.8x a grouped pack's per-seed throughput, and >= 3x one seed at 1
filter, batch 32.

    LOTTERY_SHARED_DATA=/path/to/data .venv/bin/python bench/generic_pack.py [--device cpu|cuda]
        [--hidden 500] [--threads N] [--rounds R] [--quick] [--nets crater,example]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml

from bench.common import ROOT, device_arg, machine, save
from bench.pack import crater_slice, trial
from trainers.cgn import CgnMonitor
from trainers.config import TrialConfig
from trainers.data import LoadedData, load_data
from trainers.events import MemorySink
from trainers.filters import filter_groups
from trainers.loop import _make_optimizer, train
from trainers.pack import build_pack
from trainers.ranking import pack_logits, pack_loss

EXAMPLE = ROOT / "examples" / "custom"
PACKS = (8, 32)


def epoch_rates(cfg: TrialConfig, data: LoadedData, pack: int, generic: bool) -> list[float]:
    """Seed-steps/s of every steady epoch (the first left out), from the loop's own per-epoch wall
    times of each pack, as bench/pack.py reads them."""
    steps = -(-len(data.x_train) // cfg.batch_size)
    seeds = max(pack, 4)
    sink = MemorySink()
    run = cfg.model_copy(update={"epochs": 3})
    train(run, sink, seeds=list(range(seeds)), pack_size=pack, data=data, generic=generic)
    leaders = set(range(0, seeds, pack))
    return [pack * steps / r.wall_s for r in sink.epochs if r.epoch >= 1 and r.seed in leaders]


def example_trial(device: torch.device) -> tuple[TrialConfig, LoadedData]:
    """The example's own spec (examples/custom/spec.yaml: width 8, Adam, batch 32) on its digits."""
    base = yaml.safe_load((EXAMPLE / "spec.yaml").read_text())["base"]
    for section in ("model", "data"):
        base[section]["base_dir"] = str(EXAMPLE)
    cfg = TrialConfig.model_validate(base | {"device": device.type})
    return cfg, load_data(cfg.data, cfg.data_seed, device)


def step_rates(ways: dict[str, tuple[TrialConfig, LoadedData, int, bool]], steps: int) -> dict[str, float]:
    """Seed-steps/s of each way from the median of `steps` training steps, the ways taking turns step by
    step, so a neighbour's load falls on all of them alike within milliseconds. A step is the loop's
    own (trainers/loop.py `_train_epoch` under baseline): forward, summed per-seed loss, backward, the
    CGN monitor and the optimizer, on the same batches."""
    runners = {name: _stepper(*way) for name, way in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(steps + 10):  # the first 10: warm-up
        for name, run in runners.items():
            elapsed = run(i)
            if i >= 10:
                times[name].append(elapsed)
    return {name: ways[name][2] / statistics.median(t) for name, t in times.items()}


def _stepper(cfg: TrialConfig, data: LoadedData, pack: int, generic: bool):  # noqa: ANN202
    model = build_pack(cfg, list(range(pack)), data, generic).to(data.x_train.device)
    optimizer = _make_optimizer(cfg, list(model.parameters()))
    monitor = CgnMonitor(
        filter_groups(model), tau=cfg.count_tau, trace_every=0, seeds=pack, reduction=cfg.count_reduction
    )
    batch, n = cfg.batch_size, len(data.x_train)

    def step(i: int) -> float:
        start = (i * batch) % (n - batch + 1)
        x, y = data.x_train[start : start + batch], data.y_train[start : start + batch]
        began = time.perf_counter()
        logits = pack_logits(model, x)
        loss, _ = pack_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        monitor.observe(i, batch)
        optimizer.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    return step


def measure(ways: dict[str, tuple[TrialConfig, LoadedData, int, bool]], rounds: int) -> dict[str, float]:
    """Each way's best steady epoch over `rounds` interleaved repeats, in seed-steps/s (and its median
    under `name + ":median"`). On a machine shared with other work the best epoch is the one least
    slowed by a neighbour: the medians swing with the load (ratios of 0.4-1.1x between two runs of
    the same code were seen at a load average of 10 on 2 cores), the best epochs far less."""
    seen: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, (cfg, data, pack, generic) in ways.items():
            seen[name] += epoch_rates(cfg, data, pack, generic)
    best = {name: max(values) for name, values in seen.items()}
    return best | {f"{name}:median": statistics.median(values) for name, values in seen.items()}


def compare(ways: dict[str, tuple[TrialConfig, LoadedData, int, bool]], args: argparse.Namespace) -> dict:
    """Each way's seed-steps/s: step by step (`step_rates`, compared) and, with --rounds, whole epochs
    of the real loop (`measure`: best and median epoch, kept for reference)."""
    out = {"step": step_rates(ways, args.steps)}
    if args.rounds:
        loop = measure(ways, args.rounds)
        out |= {
            "loop_best": {n: loop[n] for n in ways},
            "loop_median": {n: loop[n + ":median"] for n in ways},
        }
    return out


def ratios(speed: dict, generic: str, other: str) -> dict[str, float]:
    return {kind: rates[generic] / rates[other] for kind, rates in speed.items()}


def crater_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    data = crater_slice(device, n=1024)
    rows = []
    for filters in [1] if args.quick else [1, 2, 4]:
        cfg = trial(filters, args.hidden, 32)
        ways = {"single": (cfg, data, 1, False)}
        for k in PACKS:
            ways[f"grouped{k}"] = (cfg, data, k, False)
            ways[f"generic{k}"] = (cfg, data, k, True)
        speed = compare(ways, args)
        row = {"net": "crater_cnn", "filters": filters, "hidden_fc": args.hidden, "batch": 32}
        row |= {"seed_steps_per_s": speed, "packs": {}}
        for k in PACKS:
            row["packs"][k] = {
                "generic_vs_grouped": ratios(speed, f"generic{k}", f"grouped{k}"),
                "generic_vs_single": ratios(speed, f"generic{k}", "single"),
                "grouped_vs_single": ratios(speed, f"grouped{k}", "single"),
            }
            one, grouped, generic = (speed["step"][n] for n in ("single", f"grouped{k}", f"generic{k}"))
            print(
                f"crater_cnn filters={filters} fc={args.hidden} batch=32 pack {k:>2}, step by step: one seed "
                f"{one:5.0f}, grouped {grouped:5.0f}, generic {generic:5.0f} seed-steps/s; generic/grouped "
                f"{generic / grouped:.2f}x, generic/one seed {generic / one:.2f}x, grouped/one seed "
                f"{grouped / one:.2f}x" + _loop_text(row["packs"][k]),
                flush=True,
            )
        rows.append(row)
    return rows


def _loop_text(pack: dict) -> str:
    if "loop_median" not in pack["generic_vs_single"]:
        return ""
    parts = [f"{name} {pack[name]['loop_median']:.2f}x" for name in pack]
    return "; whole epochs (median): " + ", ".join(parts)


def example_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    cfg, data = example_trial(device)
    data.x_train, data.y_train = data.x_train[:1024], data.y_train[:1024]
    ways = {"single": (cfg, data, 1, False)} | {f"generic{k}": (cfg, data, k, True) for k in PACKS}
    speed = compare(ways, args)
    row = {"net": "examples/custom", "kwargs": cfg.model.kwargs, "batch": cfg.batch_size}
    row |= {"seed_steps_per_s": speed, "packs": {}}
    for k in PACKS:
        row["packs"][k] = {"generic_vs_single": ratios(speed, f"generic{k}", "single")}
        step = speed["step"]
        print(
            f"examples/custom {cfg.model.kwargs} batch={cfg.batch_size} pack {k:>2}, step by step: one seed "
            f"{step['single']:5.0f}, generic {step[f'generic{k}']:5.0f} seed-steps/s; generic/one seed "
            f"{step[f'generic{k}'] / step['single']:.2f}x" + _loop_text(row["packs"][k]),
            flush=True,
        )
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=500, help="crater_cnn hidden FC width (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as a trial; 0: torch's)")
    parser.add_argument("--steps", type=int, default=200, help="steps per way, taking turns step by step")
    parser.add_argument(
        "--rounds", type=int, default=0, help="also whole-epoch runs of the loop, interleaved"
    )
    parser.add_argument("--quick", action="store_true", help="crater_cnn at 1 filter only (smoke runs)")
    parser.add_argument("--nets", default="crater,example", help="comma-separated: crater, example")
    args = parser.parse_args()
    device = device_arg(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    nets = args.nets.split(",")
    rows = (crater_rows(args, device) if "crater" in nets else []) + (
        example_rows(args, device) if "example" in nets else []
    )
    name = "generic_pack" if nets == ["crater", "example"] else "generic_pack_" + "_".join(nets)
    meta = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "rounds": args.rounds,
    }
    save(name, meta | {"rows": rows})


if __name__ == "__main__":
    main()
