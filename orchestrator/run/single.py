"""`lottery train`: one trial from flags or YAML, a progress bar, the trial directory, one MLflow run.

It trains with the thread count a sweep trial gets at the default resources (`Resources.threads`:
1 CPU, 1 thread), so the same trial gives the same numbers here and in a sweep. A trial that
already has a result in `--out` is not trained again: its stored result is reported and logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from orchestrator import layout
from orchestrator.errors import TRACKING_EXIT, UserError, model_fields_at, one_line
from orchestrator.run.preflight_model import DataShape, model_problem
from orchestrator.spec import Resources, apply_overrides, load_yaml, set_dotted
from trainers.config import SCHEMES, TrialConfig
from trainers.events import EpochRecord

console = Console(stderr=True)
SWEEP_KEYS = {"seeds", "schemes", "grid", "resources"}  # a sweep spec's fields that no trial has


def build_trial_config(path: Path | None, flags: dict[str, Any], overrides: list[str]) -> TrialConfig:
    """YAML, then explicit flags, then --set overrides; validated once, before any work."""
    doc = load_yaml(path) if path else {}
    if path and not doc:
        raise UserError(
            f"--config: {path} is empty; give TrialConfig fields (e.g. epochs: 5), or leave out --config "
            "to train the defaults"
        )
    if path and SWEEP_KEYS & set(doc):
        raise UserError(
            f"--config: {path} is a sweep spec (it has {', '.join(sorted(SWEEP_KEYS & set(doc)))}), not a "
            f"trial; run it with: lottery sweep {path}"
        )
    for key, value in flags.items():
        if value is not None:
            set_dotted(doc, key, value)
    apply_overrides(doc, overrides)
    _check_scheme_named(doc)
    return TrialConfig.model_validate(doc)  # a randomout trial's `tau` lands in scheme.tau (TrialConfig)


def _check_scheme_named(doc: dict[str, Any]) -> None:
    """`--set scheme.tau=1e-6` without `--scheme`: name the scheme that has the field (pydantic would
    only say it cannot find the union's discriminator)."""
    scheme = doc.get("scheme")
    if not isinstance(scheme, dict) or "name" in scheme or not scheme:
        return
    field = sorted(scheme, key=str)[0]
    owners = [name for name in SCHEMES if field in (model_fields_at(TrialConfig, ("scheme", name)) or [])]
    if owners:
        raise UserError(
            f"scheme.{field}: no scheme is named; add --scheme {owners[0]} "
            f"({field} belongs to {' and '.join(owners)})"
        )
    raise UserError(
        f"scheme.{field}: no scheme is named and none has {field}; add --scheme, one of {', '.join(SCHEMES)}"
    )


def run_single(
    config: TrialConfig,
    *,
    root: Path,
    tracking_uri: str | None,
    experiment: str,
    log: bool = True,
    retrain_changed: bool = False,
) -> bool:
    """Train (or reuse) the trial, then log it; False when its MLflow run could not be logged (the
    result is on disk, and running the same command again logs it without training)."""
    import torch

    from orchestrator.run.policy import before_training, set_aside_changed
    from orchestrator.run.trial import data_fingerprint, run_trial
    from trainers.data import check_batch_size, load_data
    from trainers.loop import pick_device

    device = pick_device(config.device)
    data = load_data(config.data, config.data_seed, device)  # a missing data dir fails here, before training
    check_batch_size(config.batch_size, config.full_batch, data)
    if problem := model_problem(config, DataShape.of(data)):  # before a trial directory exists
        raise UserError(problem)
    trial_dir = layout.trial_dir(layout.train_dir(root), config.trial_key())
    # The one pre-training policy (orchestrator/run/policy.py), as a sweep applies it.
    before = before_training(
        [trial_dir],
        data_fingerprint(data),
        retrain_changed=retrain_changed,
        damaged_to=layout.train_dir(root),
    )
    if before.changed_aside:
        console.print(f"set aside the result trained on other data: {before.changed_aside[0]}")
    from orchestrator.run.preflight_custom import check_custom_trials

    if changed := check_custom_trials(
        [config], layout.train_dir(root), local=True, retrain_changed=retrain_changed
    ):
        console.print(f"set aside the result trained by other code: {set_aside_changed(changed)[0]}")
    console.print(f"[bold]trial[/] {config.trial_key()}  {config.scheme.name} seed={config.seed} on {device}")
    console.print(f"data: {data.variant}")
    for _, problem, aside in before.damaged:
        console.print(f"[yellow]stored trial damaged ({problem}); moved to {aside}, training again[/]")
    stored = before.statuses[0]
    if stored.finished:
        result = stored.result
        console.print(
            f"reused the stored result in {trial_dir} (nothing trained); to retrain, remove that "
            "directory or pass another --out",
            highlight=False,
            soft_wrap=True,
        )
    else:
        torch.set_num_threads(Resources().threads)  # a sweep trial's rule, at a sweep's default resources
        with _progress() as bar:
            task = bar.add_task("epochs", total=config.total_epochs)

            def on_epoch(record: EpochRecord) -> None:
                bar.update(
                    task,
                    completed=record.epoch + 1,
                    description=f"epoch {record.epoch + 1}: test acc {record.test_acc:.3f}",
                )

            result = run_trial(
                config, trial_dir, sweep=layout.TRAIN, data=data, on_epoch=on_epoch, status=stored
            )
    verdict = "FAILED (lottery loss)" if result["failed"] else "ok"
    console.print(
        f"final test acc {result['final_test_acc']:.4f} ({verdict}; {result['failure_rule']}), "
        f"resets {result['total_resets']}; results in {trial_dir}"
    )
    return _log(trial_dir, root, tracking_uri, experiment) if log else True


def _log(trial_dir: Path, root: Path, tracking_uri: str | None, experiment: str) -> bool:
    from orchestrator.tracking.runs import client_for, default_tracking_uri, ensure_experiment, log_trial
    from orchestrator.tracking.store import prepare_store

    uri = tracking_uri or default_tracking_uri(root)
    try:
        prepare_store(uri, console)  # built whole, or rebuilt if a kill left it half-migrated
        client = client_for(uri)
        run_id = log_trial(
            client, ensure_experiment(client, experiment, layout.artifacts_dir(root)), trial_dir
        )
    except Exception as exc:  # an outage must not lose the result: it is already on disk
        console.print(
            f"[yellow]tracking incomplete (exit {TRACKING_EXIT}): MLflow at {uri} is unavailable "
            f"({one_line(exc)}); the result is kept in {trial_dir}; once MLflow is reachable, run the same "
            "command again: it logs the stored result without training[/]",
            highlight=False,
            soft_wrap=True,  # one line however long the URI and the cause
        )
        return False
    console.print(f"MLflow run {run_id} in experiment '{experiment}' at {uri}")
    return True


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
