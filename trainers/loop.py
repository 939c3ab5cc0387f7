"""The one training loop every scheme shares, for one seed or a pack of seeds.

Data sit on the device; each epoch draws one permutation from the batch-order
generator (order_seed, else data_seed) and slices it, so batches cost no host work. Per-step loss,
accuracy and CGN accumulate in device tensors and reach the host once per
epoch, when the sink gets one `EpochRecord` and `CgnTrace` per seed and a
checkpoint. A pack (K > 1 seeds of one configuration) is the same loop over a
`PackedNet`; K = 1 is an ordinary model, which is also how BatchNorm and
Inception models always run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from trainers.augment import crop_flip, draw_epoch
from trainers.cgn import CgnMonitor
from trainers.config import TrialConfig
from trainers.correctness import NOT_RECORDED, encode
from trainers.data import LoadedData, check_batch_size, load_data
from trainers.errors import DeviceError
from trainers.events import EpochRecord, Sink, TrialResult, failure_rule_text
from trainers.filters import FilterGroup, filter_groups
from trainers.fork import fork_step, leave_parent_streams, seed_weights
from trainers.funcpack import generic_pack_problem
from trainers.models import derive_seeds
from trainers.optim import RowAdam
from trainers.pack import build_pack, can_pack
from trainers.progress import Progress, restore, snapshot
from trainers.ranking import ortho_scores, pack_logits, pack_loss
from trainers.schemes import Scheme, TrainContext, build_scheme
from trainers.streams import source_generators

EVAL_BATCH = 1024


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pack_problem(config: TrialConfig, data: LoadedData, model: torch.nn.Module | None = None) -> str | None:
    """Why seeds of this configuration cannot share a pack (one line), or None: grouped packs for the
    built-in feed-forward nets, else a generic (torch.func) pack when the net batches under vmap.
    `model`: one seed's net of this configuration, if the caller has built it already."""
    if can_pack(config):
        return None
    model = model if model is not None else build_pack(config, [config.seed], data)
    return generic_pack_problem(model, data.x_train[: min(8, len(data.x_train))].cpu())


def train(
    config: TrialConfig,
    sink: Sink,
    *,
    seeds: list[int] | None = None,
    pack_size: int = 1,
    resume: dict[str, Any] | None = None,
    data: LoadedData | None = None,
    generic: bool | None = None,
) -> list[TrialResult]:
    """Train one configuration for each seed (default: config.seed), `pack_size` seeds at a time.

    `generic` picks the kind of pack: None grouped-conv packs where the net has them, else generic
    (torch.func) packs; True generic packs for any net (benchmarks, equivalence checks)."""
    seeds = [config.seed] if seeds is None else list(seeds)
    if pack_size > 1 and config.uses_batchnorm:
        raise ValueError(
            f"pack_size: {config.model.name} with BatchNorm={config.uses_batchnorm} trains one seed per "
            "process; packs support nets without BatchNorm"
        )
    if resume is not None and len(seeds) > pack_size:
        raise ValueError("resume: a checkpoint belongs to one pack; pass only that pack's seeds")
    device = pick_device(config.device)
    data = data if data is not None else load_data(config.data, config.data_seed, device)
    if pack_size > 1 and generic is not True and (problem := pack_problem(config, data)) is not None:
        raise ValueError(f"pack_size: {config.model.name} cannot pack: {problem}")
    results: list[TrialResult] = []
    for start in range(0, len(seeds), pack_size):
        chunk = seeds[start : start + pack_size]
        results += train_pack(config, chunk, sink, data=data, device=device, resume=resume, generic=generic)
    return results


@dataclass(frozen=True)
class _EpochSums:
    """One seed's device-side sums of an epoch, after the one host copy."""

    train_loss: float
    train_correct: float
    test_loss: float
    test_correct: float

    @classmethod
    def to_host(cls, sums: dict[str, torch.Tensor]) -> list[_EpochSums]:
        """[K] device tensors, one per field, to one record per seed in a single transfer."""
        columns = torch.stack([sums[name].float() for name in cls.__dataclass_fields__]).tolist()
        return [cls(*values) for values in zip(*columns, strict=True)]


def _make_optimizer(config: TrialConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Elementwise optimizers: one over a pack's stacked tensors equals K independent ones."""
    o = config.optim
    if o.name == "adam":
        return RowAdam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, hits_out: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-seed summed loss and correct count as [K] device tensors (divided once on the host); with
    `hits_out`, each batch's per-example hits [K, batch] are appended to it (left on the device)."""
    was_training = model.training
    model.eval()
    loss, correct = None, None
    for i in range(0, len(x), EVAL_BATCH):
        logits = pack_logits(model, x[i : i + EVAL_BATCH])
        target = y[i : i + EVAL_BATCH]
        _, per_seed = pack_loss(logits, target)
        example_hits = logits.argmax(-1) == target
        if hits_out is not None:
            hits_out.append(example_hits)
        hits = example_hits.sum(dim=1)
        loss = per_seed if loss is None else loss + per_seed
        correct = hits if correct is None else correct + hits
    model.train(was_training)
    return loss, correct


def train_pack(
    config: TrialConfig,
    seeds: list[int],
    sink: Sink,
    *,
    data: LoadedData,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    generic: bool | None = None,
) -> list[TrialResult]:
    model = build_pack(config, seeds, data, generic).to(device)
    built = _built(config, model, len(seeds))
    scheme = build_scheme(config.scheme)
    data_gen, augment_gen = source_generators(config)
    scheme_gens = [torch.Generator(device=device).manual_seed(derive_seeds(s)[1]) for s in seeds]
    scheme.prepare(model, scheme_gens)
    optimizer = _make_optimizer(config, scheme.parameters(model))
    groups = filter_groups(model)
    monitor = CgnMonitor(
        groups,
        tau=config.count_tau,
        trace_every=config.trace_every,
        seeds=len(seeds),
        reduction=config.count_reduction,
    )
    ctx = TrainContext(
        config,
        model,
        groups,
        optimizer,
        monitor,
        data,
        scheme_gens,
        seeds=list(seeds),
        data_gen=data_gen,
        augment_gen=augment_gen,
    )
    progress = Progress.start(seeds)
    if resume is not None:
        if resume["progress"]["seeds"] != seeds:
            raise ValueError(f"resume: checkpoint is for seeds {resume['progress']['seeds']}, not {seeds}")
        progress = restore(resume, model, optimizer, scheme, ctx.data_gens(), scheme_gens)
    ctx.alive = [not s.diverged for s in progress.seeds]
    scheme.setup(ctx)

    results: dict[int, TrialResult] = {}
    final_hits = None  # [K, n_test] bool after the last epoch (a diverged seed's row is not kept)
    n_train, n_test = len(data.x_train), len(data.x_test)
    check_batch_size(config.batch_size, config.full_batch, data)
    batch = n_train if config.full_batch else config.batch_size
    ctx.fork_step = fork_step(config, n_train, batch)
    steps_per_epoch = math.ceil(n_train / batch)
    for epoch in range(progress.epoch, config.total_epochs):
        if not any(ctx.alive):
            break
        skip = scheme.steps_to_skip(ctx, epoch, steps_per_epoch)
        if skip >= steps_per_epoch:
            continue
        started = time.perf_counter()
        ctx.epoch = epoch
        loss_sum, correct = _train_epoch(ctx, scheme, data, batch, progress, skip)
        n_seen = n_train - skip * batch  # the examples this epoch trained on
        last_hits: list[torch.Tensor] | None = [] if epoch == config.total_epochs - 1 else None
        test_loss, test_correct = evaluate(model, data.x_test, data.y_test, last_hits)
        if last_hits is not None:  # the final model's per-example correctness, to the host once
            final_hits = torch.cat(last_hits, dim=1).cpu().numpy()
        sums = _EpochSums.to_host(
            {
                "train_loss": loss_sum,
                "train_correct": correct,
                "test_loss": test_loss,
                "test_correct": test_correct,
            }
        )
        was_alive = list(ctx.alive)
        for k, seed_progress in enumerate(progress.seeds):
            if was_alive[k] and not math.isfinite(sums[k].train_loss):
                ctx.alive[k] = False  # its own NaNs touch no other seed; it just stops being reported
                seed_progress.diverged = True
        if any(ctx.alive):
            # Drops and re-introductions belong to the epoch that ends here.
            scheme.on_epoch_end(ctx, epoch)
        masks = scheme.dropped_masks()
        ortho = [_live_ortho_sums(g, masks[i] if masks else None) for i, g in enumerate(groups)]
        dropped = [m.sum(dim=1).tolist() for m in masks] if masks else [[0] * len(seeds) for _ in groups]
        per_seed = monitor.epoch_end(epoch, dropped, ortho)
        epoch_wall = time.perf_counter() - started
        progress.epoch, progress.wall_s = epoch + 1, progress.wall_s + epoch_wall
        for k, seed_progress in enumerate(progress.seeds):
            if not was_alive[k]:
                continue
            stats, trace, resets = per_seed[k]
            seed_progress.epochs_done = epoch + 1
            seed_progress.total_resets += resets
            seed_progress.train_acc = sums[k].train_correct / n_seen
            seed_progress.test_acc = sums[k].test_correct / n_test
            seed_progress.test_loss = sums[k].test_loss / n_test
            seed_progress.best_test_acc = max(seed_progress.best_test_acc, seed_progress.test_acc)
            record = EpochRecord(
                seed=seed_progress.seed,
                epoch=epoch,
                steps=progress.steps,
                train_loss=sums[k].train_loss / n_seen,
                train_acc=seed_progress.train_acc,
                test_loss=seed_progress.test_loss,
                test_acc=seed_progress.test_acc,
                wall_s=epoch_wall,
                layers=stats,
                extra=scheme.epoch_metrics(k),
            )
            sink.on_epoch(record, trace)
            if seed_progress.diverged:
                results[k] = _result(config, k, data, progress, scheme, device, built)
                sink.on_result(results[k])
        if any(ctx.alive) and epoch < config.total_epochs - 1:
            # None after the last epoch: the results follow at once (a trial stopped in between trains
            # that epoch again from the one before, to the same numbers).
            sink.on_checkpoint(
                epoch, snapshot(model, optimizer, scheme, ctx.data_gens(), scheme_gens, progress)
            )

    for k in range(len(seeds)):
        if k not in results:
            if config.fork is not None:  # before the result: a finished child always has its weights
                sink_weights = getattr(sink, "on_weights", None)
                if sink_weights is not None:
                    sink_weights(seeds[k], seed_weights(model, k, config, seeds[k], data))
            hits = encode(final_hits[k]) if final_hits is not None else NOT_RECORDED
            results[k] = _result(config, k, data, progress, scheme, device, built, hits)
            sink.on_result(results[k])
    return [results[k] for k in range(len(seeds))]


def _live_ortho_sums(group: FilterGroup, dropped: torch.Tensor | None) -> list[float]:
    """Per seed, the sum of RePr's O^f over the live filters, each scored against live filters only
    (J = live count), as the paper's Fig. 7 reports it. A dropped (zero) filter would otherwise add
    |0 - 1| / J from its own diagonal."""
    rows = group.rows(group.weight)
    if dropped is None or not bool(dropped.any()):
        return ortho_scores(rows).sum(dim=1).tolist()
    out = []
    for k in range(group.seeds):
        live = ~dropped[k]
        out.append(float(ortho_scores(rows[k][live].unsqueeze(0)).sum()) if bool(live.any()) else 0.0)
    return out


def _train_epoch(
    ctx: TrainContext, scheme: Scheme, data: LoadedData, batch: int, progress: Progress, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's summed loss and correct count per seed; the first `skip` batches of its order
    are drawn but not trained (see Scheme.steps_to_skip)."""
    model, optimizer, monitor = ctx.model, ctx.optimizer, ctx.monitor
    device = data.x_train.device
    n_train = len(data.x_train)
    assert ctx.data_gen is not None
    order = torch.randperm(n_train, generator=ctx.data_gen).to(device)
    # None (no draw) for "none"; from the order stream unless the trial has its own augment_seed.
    draws = draw_epoch(ctx.config.data.augment, n_train, ctx.augment_gen or ctx.data_gen, device)
    loss_sum = torch.zeros(len(ctx.generators), device=device)
    correct = torch.zeros(len(ctx.generators), device=device, dtype=torch.long)
    model.train()
    for start in range(skip * batch, n_train, batch):
        if progress.steps == ctx.fork_step:  # a host int: no sync
            order, draws = leave_parent_streams(ctx, order, draws, start)
        idx = order[start : start + batch]
        size = min(batch, n_train - start)
        x, y = data.x_train[idx], data.y_train[idx]
        if draws is not None:
            x = crop_flip(x, draws[start : start + batch])
        ctx.batch = x
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
    config: TrialConfig,
    k: int,
    data: LoadedData,
    progress: Progress,
    scheme: Scheme,
    device: torch.device,
    built: dict[str, Any],
    test_correct: str = NOT_RECORDED,
) -> TrialResult:
    seed = progress.seeds[k]
    chance = data.chance
    return TrialResult(
        seed=seed.seed,
        epochs_done=seed.epochs_done,
        final_test_acc=seed.test_acc,
        final_train_acc=seed.train_acc,
        best_test_acc=seed.best_test_acc,
        final_test_loss=seed.test_loss,
        chance=chance,
        failure_margin=config.failure_margin,
        failed=seed.diverged or not (seed.test_acc > chance + config.failure_margin),
        diverged=seed.diverged,
        total_resets=seed.total_resets,
        sparsity=scheme.sparsity(k),
        reinit_fallbacks=scheme.reinit_fallbacks[k] if scheme.reinit_fallbacks else 0,
        wall_s=progress.wall_s,
        pack_size=len(progress.seeds),
        failure_rule=failure_rule_text(config.failure_margin, chance),
        device=str(device),
        threads=torch.get_num_threads(),
        data_fingerprint=data.fingerprint if data.files else "",
        data_files=data.files,
        test_correct=test_correct,
        **built,
    )


def _built(config: TrialConfig, model: torch.nn.Module, seeds: int) -> dict[str, Any]:
    """What net was trained, for the record: its builder (a custom net's target, else the model name),
    the builder's source hash ("" for built-ins) and one seed's parameter count (before a scheme adds
    any of its own, such as edge-popup's scores)."""
    return {
        "builder": config.model.builder or config.model.name,
        "builder_sha256": getattr(model, "builder_sha256", ""),
        "parameters": sum(p.numel() for p in model.parameters()) // seeds,
    }
