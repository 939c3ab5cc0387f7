"""Scheme overhead: RandomOut and RePr against the baseline, per epoch, on the same data and model.

Every scheme runs the same loop with CGN tracing on (baseline included: the "below tau" counts are
recorded for every scheme), so the differences are the schemes' own work: RandomOut's per-step
draw + masked merge, RePr's ranking, masking during S2 and QR re-initialisation. Runs are
interleaved and the median of the repeats is taken.

    .venv/bin/python -m bench.cgn_overhead [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse

from bench.common import device_arg, machine, median_time, save
from bench.pack import crater_slice
from trainers.config import TrialConfig
from trainers.events import MemorySink
from trainers.loop import train

EPOCHS = 4
SCHEMES = {
    "baseline": "baseline",
    "randomout": {"name": "randomout", "tau": 1e-8},
    "repr": {"name": "repr", "s1": 1, "s2": 1, "n_iter": 2, "metric": "ortho"},  # 2 drops, 2 re-inits
}
MODELS = {
    "crater_cnn": ({"name": "crater_cnn", "filters": 20, "init": "xavier"}, 15, 1024, 32),
    "inception28": ({"name": "inception28", "init": "xavier"}, 28, 256, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = device_arg(args.device)
    print(machine())
    rows = []
    for model_name, (model, size, n_train, batch) in MODELS.items():
        data = crater_slice(device, n=n_train, image_size=size)
        times: dict[str, list[float]] = {name: [] for name in SCHEMES}
        for _ in range(2 if args.quick else 3):
            for name, scheme in SCHEMES.items():
                cfg = TrialConfig.model_validate(
                    {
                        "model": model,
                        "scheme": scheme,
                        "epochs": EPOCHS,
                        "batch_size": batch,
                        "optim": {"name": "adam", "lr": 0.001},
                    }
                )
                times[name].append(
                    median_time(lambda c=cfg, d=data: train(c, MemorySink(), data=d), device, 1)
                )
        per_epoch = {name: sorted(t)[len(t) // 2] / EPOCHS for name, t in times.items()}
        row = {"model": model_name, "train_images": n_train, "batch": batch, "epoch_s": per_epoch}
        row["randomout_overhead"] = per_epoch["randomout"] / per_epoch["baseline"] - 1
        row["repr_overhead"] = per_epoch["repr"] / per_epoch["baseline"] - 1
        print(
            f"{model_name}: epoch of {n_train} images, batch {batch}: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in per_epoch.items())
            + f"; randomout {100 * row['randomout_overhead']:+.1f}%, repr {100 * row['repr_overhead']:+.1f}%"
        )
        rows.append(row)
    save("cgn_overhead", {"device": str(device), "epochs": EPOCHS, "rows": rows})


if __name__ == "__main__":
    main()
