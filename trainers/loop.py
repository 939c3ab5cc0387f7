"""The one training loop every scheme shares, for one seed or a pack of seeds.

Data sit on the device; each epoch draws one permutation from the data_seed
generator and slices it, so batches cost no host work. Per-step loss,
accuracy and CGN accumulate in device tensors and reach the host once per
epoch, when the sink gets one `EpochRecord` and `CgnTrace` per seed and a
checkpoint. A pack (K > 1 seeds of one configuration) is the same loop over a
`PackedNet`; K = 1 is an ordinary model, which is also how BatchNorm and
Inception models always run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainers.cgn import CgnMonitor
from trainers.config import TrialConfig
from trainers.data import LoadedData, load_data
from trainers.events import EpochRecord, Sink, TrialResult, failure_rule_text
from trainers.filters import filter_groups
from trainers.models import build_model
from trainers.pack import PACKABLE, PackedNet
from trainers.ranking import ortho_scores, pack_logits, pack_loss
from trainers.schemes import Scheme, TrainContext, build_scheme

EVAL_BATCH = 1024


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def derive_seeds(seed: int) -> tuple[int, int]:
    """Independent streams for initialization and the scheme's draws, both from the trial seed."""
    init_seed, scheme_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return int(init_seed), int(scheme_seed)


def can_pack(config: TrialConfig) -> bool:
    """Packs need a conv/linear stack without BatchNorm (BN statistics would need per-seed handling)."""
    return config.model.name in PACKABLE and not config.uses_batchnorm


def train(
    config: TrialConfig,
    sink: Sink,
    *,
    seeds: list[int] | None = None,
    pack_size: int = 1,
    resume: dict[str, Any] | None = None,
    data: LoadedData | None = None,
) -> list[TrialResult]:
    """Train one configuration for each seed (default: config.seed), `pack_size` seeds at a time."""
    seeds = [config.seed] if seeds is None else list(seeds)
    if pack_size > 1 and not can_pack(config):
        raise ValueError(
            f"pack_size: {config.model.name} with BatchNorm={config.uses_batchnorm} trains one seed per "
            f"process; packs support {', '.join(PACKABLE)} without BatchNorm"
        )
    if resume is not None and len(seeds) > pack_size:
        raise ValueError("resume: a checkpoint belongs to one pack; pass only that pack's seeds")
    device = pick_device(config.device)
    data = data if data is not None else load_data(config.data, config.data_seed, device)
    results: list[TrialResult] = []
    for start in range(0, len(seeds), pack_size):
        chunk = seeds[start : start + pack_size]
        results += train_pack(config, chunk, sink, data=data, device=device, resume=resume)
    return results


def train_one(
    config: TrialConfig, sink: Sink, *, data: LoadedData, device: torch.device, resume: dict | None = None
) -> TrialResult:
    return train_pack(config, [config.seed], sink, data=data, device=device, resume=resume)[0]


@dataclass
class _Progress:
    """Everything besides model/optimizer/scheme that a checkpoint must carry; lists are per seed."""

    seeds: list[int]
    epoch: int = 0  # epochs completed
    steps: int = 0
    wall_s: float = 0.0
    epochs_done: list[int] = field(default_factory=list)
    best_test_acc: list[float] = field(default_factory=list)
    total_resets: list[int] = field(default_factory=list)
    last: list[tuple[float, float, float]] = field(default_factory=list)  # train acc, test acc, test loss
    diverged: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = len(self.seeds)
        self.epochs_done = self.epochs_done or [0] * k
        self.best_test_acc = self.best_test_acc or [0.0] * k
        self.total_resets = self.total_resets or [0] * k
        self.last = self.last or [(math.nan, math.nan, math.nan)] * k
        self.diverged = self.diverged or [False] * k


def _make_optimizer(config: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Elementwise optimizers: one over a pack's stacked tensors equals K independent ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-seed summed loss and correct count as [K] device tensors (divided once on the host)."""
    was_training = model.training
    model.eval()
    loss, correct = None, None
    for i in range(0, len(x), EVAL_BATCH):
        logits = pack_logits(model, x[i : i + EVAL_BATCH])
        target = y[i : i + EVAL_BATCH]
        _, per_seed = pack_loss(logits, target)
        hits = (logits.argmax(-1) == target).sum(dim=1)
        loss = per_seed if loss is None else loss + per_seed
        correct = hits if correct is None else correct + hits
    model.train(was_training)
    return loss, correct


def build_pack(config: TrialConfig, seeds: list[int], data: LoadedData) -> torch.nn.Module:
    """Each seed's model from its own generator (bit-identical to the seed alone), packed if K > 1."""
    models = [
        build_model(
            config.model,
            in_channels=data.in_channels,
            image_size=data.image_size,
            num_classes=data.num_classes,
            batchnorm=config.uses_batchnorm,
            generator=torch.Generator().manual_seed(derive_seeds(seed)[0]),
        )
        for seed in seeds
    ]
    return models[0] if len(models) == 1 else PackedNet(models)


def train_pack(
    config: TrialConfig,
    seeds: list[int],
    sink: Sink,
    *,
    data: LoadedData,
    device: torch.device,
    resume: dict[str, Any] | None = None,
) -> list[TrialResult]:
    model = build_pack(config, seeds, data).to(device)
    optimizer = _make_optimizer(config, model)
    groups = filter_groups(model)
    monitor = CgnMonitor(groups, tau=config.count_tau, trace_every=config.trace_every)
    scheme = build_scheme(config.scheme)
    data_gen = torch.Generator().manual_seed(config.data_seed)
    scheme_gens = [torch.Generator(device=device).manual_seed(derive_seeds(s)[1]) for s in seeds]
    ctx = TrainContext(config, model, groups, optimizer, monitor, data, scheme_gens)
    progress = _Progress(seeds)
    if resume is not None:
        if resume["progress"]["seeds"] != seeds:
            raise ValueError(f"resume: checkpoint is for seeds {resume['progress']['seeds']}, not {seeds}")
        _restore(resume, model, optimizer, scheme, data_gen, scheme_gens, progress)
    ctx.alive = [not d for d in progress.diverged]
    scheme.setup(ctx)

    results: dict[int, TrialResult] = {}
    n_train, n_test = len(data.x_train), len(data.x_test)
    batch = n_train if config.full_batch else min(config.batch_size, n_train)
    for epoch in range(progress.epoch, config.epochs):
        if not any(ctx.alive):
            break
        started = time.perf_counter()
        ctx.epoch = epoch
        loss_sum, correct = _train_epoch(ctx, scheme, data, data_gen, batch, progress)
        test_loss, test_correct = evaluate(model, data.x_test, data.y_test)
        host = torch.stack([loss_sum, correct.float(), test_loss, test_correct.float()]).tolist()
        was_alive = list(ctx.alive)
        for k in range(len(seeds)):
            if was_alive[k] and not math.isfinite(host[0][k]):
                ctx.alive[k] = False  # its own NaNs touch no other seed; it just stops being reported
                progress.diverged[k] = True
        if any(ctx.alive):
            # Drops and re-introductions belong to the epoch that ends here.
            scheme.on_epoch_end(ctx, epoch)
        ortho = [ortho_scores(g.rows(g.weight)).sum(dim=1).tolist() for g in groups]
        dropped = scheme.dropped_counts() or [[0] * len(seeds) for _ in groups]
        per_seed = monitor.epoch_end(epoch, dropped, ortho)
        epoch_wall = time.perf_counter() - started
        progress.epoch, progress.wall_s = epoch + 1, progress.wall_s + epoch_wall
        for k, seed in enumerate(seeds):
            if not was_alive[k]:
                continue
            stats, trace, resets = per_seed[k]
            train_acc, test_acc = host[1][k] / n_train, host[3][k] / n_test
            test_loss_k = host[2][k] / n_test
            progress.epochs_done[k] = epoch + 1
            progress.total_resets[k] += resets
            progress.last[k] = (train_acc, test_acc, test_loss_k)
            progress.best_test_acc[k] = max(progress.best_test_acc[k], test_acc)
            record = EpochRecord(
                seed=seed,
                epoch=epoch,
                steps=progress.steps,
                train_loss=host[0][k] / n_train,
                train_acc=train_acc,
                test_loss=test_loss_k,
                test_acc=test_acc,
                wall_s=epoch_wall,
                layers=stats,
            )
            sink.on_epoch(record, trace)
            if progress.diverged[k]:
                results[k] = _result(config, seed, k, data, progress, scheme)
                sink.on_result(results[k])
        if any(ctx.alive):
            sink.on_checkpoint(epoch, _snapshot(model, optimizer, scheme, data_gen, scheme_gens, progress))

    for k, seed in enumerate(seeds):
        if k not in results:
            results[k] = _result(config, seed, k, data, progress, scheme)
            sink.on_result(results[k])
    return [results[k] for k in range(len(seeds))]


def _train_epoch(
    ctx: TrainContext,
    scheme: Scheme,
    data: LoadedData,
    data_gen: torch.Generator,
    batch: int,
    progress: _Progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    model, optimizer, monitor = ctx.model, ctx.optimizer, ctx.monitor
    device = data.x_train.device
    n_train = len(data.x_train)
    order = torch.randperm(n_train, generator=data_gen).to(device)
    loss_sum = torch.zeros(len(ctx.generators), device=device)
    correct = torch.zeros(len(ctx.generators), device=device, dtype=torch.long)
    model.train()
    for start in range(0, n_train, batch):
        idx = order[start : start + batch]
        size = min(batch, n_train - start)
        x, y = data.x_train[idx], data.y_train[idx]
        logits = pack_logits(model, x)
        loss, per_seed = pack_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.step = progress.steps
        cgns = monitor.observe(progress.steps, size)
        scheme.after_backward(ctx)
        optimizer.step()
        scheme.after_step(ctx, cgns)
        progress.steps += 1
        loss_sum += per_seed.detach()
        correct += (logits.detach().argmax(-1) == y).sum(dim=1)
    return loss_sum, correct


def _result(
    config: TrialConfig, seed: int, k: int, data: LoadedData, progress: _Progress, scheme: Scheme
) -> TrialResult:
    chance = 1.0 / data.num_classes
    train_acc, test_acc, test_loss = progress.last[k]
    diverged = progress.diverged[k]
    return TrialResult(
        seed=seed,
        epochs_done=progress.epochs_done[k],
        final_test_acc=test_acc,
        final_train_acc=train_acc,
        best_test_acc=progress.best_test_acc[k],
        final_test_loss=test_loss,
        chance=chance,
        failure_margin=config.failure_margin,
        failed=diverged or not (test_acc > chance + config.failure_margin),
        diverged=diverged,
        total_resets=progress.total_resets[k],
        reinit_fallbacks=scheme.reinit_fallbacks[k] if scheme.reinit_fallbacks else 0,
        wall_s=progress.wall_s,
        pack_size=len(progress.seeds),
        failure_rule=failure_rule_text(config.failure_margin),
    )


def _snapshot(model, optimizer, scheme, data_gen, scheme_gens, progress: _Progress) -> dict[str, Any]:
    """References to live state: a sink that keeps it must serialize or copy it at once."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheme": scheme.state_dict(),
        "data_gen": data_gen.get_state(),
        "scheme_gens": [g.get_state() for g in scheme_gens],
        "progress": vars(progress).copy(),
    }


def _restore(state, model, optimizer, scheme, data_gen, scheme_gens, progress: _Progress) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheme.load_state_dict(state["scheme"])
    data_gen.set_state(state["data_gen"])
    for gen, saved in zip(scheme_gens, state["scheme_gens"], strict=True):
        gen.set_state(saved)
    for key, value in state["progress"].items():
        setattr(progress, key, value)
