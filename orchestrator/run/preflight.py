"""Every check a sweep makes before it starts anything (`lottery sweep` and its `--dry-run`).

A mistake found here is one line naming the spec field, exit 2, and nothing started or written.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.run.preflight_model import DataShape, check_models, known_shapes
from orchestrator.sequential import check_design
from orchestrator.spec import SweepPlan


def sweep_dir_for(plan: SweepPlan, root: layout.Location) -> layout.Location:
    try:
        return layout.sweep_location(plan.spec.storage_path, plan.spec.name, root)
    except (OSError, ValueError) as exc:  # e.g. a NUL byte, which YAML's "\0" can put in a path
        raise UserError(f"storage_path: not a usable path ({exc})") from None


def preflight(
    plan: SweepPlan, sweep_dir: Path, address: str | None, *, allow_mixed: bool, retrain_changed: bool
) -> list[tuple[Path, str]]:
    """Every check the run makes before it starts anything (a dry run makes the same ones).

    Returns the finished trials whose stored result was trained on other data than the data here (only
    with `retrain_changed`; otherwise they are refused). For a local Ray: this machine's device, CPUs
    and GPUs against what the trials ask, then each distinct dataset loaded once (files, record
    counts, batch size). On a cluster the data may live on the workers alone and the resources are
    the cluster's: the resources are checked right after connecting (`check_cluster_resources`); the
    data only by the workers, where a unit that still trains refuses its seeds' results of other data
    (run_trials), while a unit whose seeds all finished is reported without loading the data again.
    """
    check_tracking_uri(plan)
    if address is None:
        check_local_resources(plan)
        fingerprints = check_local_data(plan)
    else:
        fingerprints = {}
        check_models(plan, known_shapes(plan))  # the data is the workers': its shape is known
    check_recorded_plan(plan, sweep_dir, allow_mixed=allow_mixed)
    check_device_provenance(plan, sweep_dir, embedded=address is None, allow_mixed=allow_mixed)
    changed = check_stored_data(plan, sweep_dir, fingerprints, retrain_changed=retrain_changed)
    from orchestrator.run.preflight_custom import check_custom_models

    changed += check_custom_models(plan, sweep_dir, local=address is None, retrain_changed=retrain_changed)
    return list(dict(changed).items())  # a trial changed in data and code is set aside once


def check_tracking_uri(plan: SweepPlan) -> None:
    """No password in the tracking URI (tracking.runs.refuse_password says why), MLflow imported only
    when there is one to refuse."""
    uri, source = plan.spec.tracking_uri, "tracking_uri"
    if uri is None:
        uri, source = os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI"
    if urlsplit(uri).password is not None:
        from orchestrator.tracking.runs import refuse_password

        refuse_password(uri, source)


def check_local_resources(plan: SweepPlan) -> None:
    """What the trials ask of an embedded Ray against this machine: a trial that can never be placed
    would wait forever, and `device: cuda` without CUDA would fail every try inside Ray."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if any(t.device == "cuda" for t in plan.trials) and not gpus:
        raise UserError("base.device: 'cuda' but this machine has no CUDA device; use device: auto or cpu")
    _check_resources(plan, cpus=float(os.cpu_count() or 1), gpus=float(gpus), where="this machine")


def check_cluster_resources(plan: SweepPlan, address: str) -> None:
    """The same check against the cluster just connected to (its current resources)."""
    import ray

    offered = ray.cluster_resources()
    gpus = float(offered.get("GPU", 0))
    if any(t.device == "cuda" for t in plan.trials) and not gpus:
        raise UserError(
            f"base.device: 'cuda' but the Ray cluster at {address} has no GPUs; use device: auto or cpu"
        )
    _check_resources(
        plan, cpus=float(offered.get("CPU", 0)), gpus=gpus, where=f"the Ray cluster at {address}"
    )


def _check_resources(plan: SweepPlan, *, cpus: float, gpus: float, where: str) -> None:
    wanted = plan.spec.resources
    if wanted.gpu > gpus:
        raise UserError(
            f"resources.gpu: each trial asks for {wanted.gpu:g} GPU(s) but {where} has {gpus:g}, so no "
            "trial could ever start; lower resources.gpu (0 trains on CPU)"
        )
    if wanted.cpu > cpus:
        raise UserError(
            f"resources.cpu: each trial asks for {wanted.cpu:g} CPUs but {where} has {cpus:g}, so no "
            f"trial could ever start; set resources.cpu to at most {cpus:g}"
        )


def check_stored_data(
    plan: SweepPlan, sweep_dir: Path, fingerprints: dict[str, str], *, retrain_changed: bool
) -> list[tuple[Path, str]]:
    """Finished trials whose result was trained on other data than the data loaded now: refused in one
    line, or (retrain_changed) returned, to be set aside and trained again. Never reported as theirs."""
    if not fingerprints or not layout.trials_root(sweep_dir).exists():
        return []
    from orchestrator.run.policy import before_training

    changed: list[tuple[Path, str]] = []
    by_data: dict[str, list[Path]] = {}
    for trial in plan.trials:
        by_data.setdefault(trial.data.model_dump_json(), []).append(
            layout.trial_dir(sweep_dir, trial.trial_key())
        )
    for key, directories in by_data.items():
        if key not in fingerprints:
            continue
        changed += before_training(
            directories,
            fingerprints[key],
            retrain_changed=retrain_changed,
            where="base.data",
            set_aside=False,
        ).changed
    return changed


def check_recorded_plan(plan: SweepPlan, sweep_dir: Path, *, allow_mixed: bool) -> bool:
    """Refuse a plan that differs from the one recorded in `sweep_dir` (reads only); True when the
    same trials were packed differently and `allow_mixed` lets the run go on with both."""
    spec_path = layout.spec_file(sweep_dir)
    if spec_path.exists():
        old = layout.read_json(spec_path)
        check_design(old, plan)
        # The same trials, in any order (packing orders the plan); trials.json is written second.
        planned = layout.planned_keys(sweep_dir) if layout.plan_file(sweep_dir).exists() else []
        keys = sorted(t.trial_key() for t in plan.trials)
        # a sequential study records its open batches only
        same_trials = set(planned) <= set(keys) if plan.batch_ends else sorted(planned) == keys
        if old.get("fingerprint") != plan.fingerprint and same_trials:
            if not allow_mixed:
                raise UserError(
                    f"pack_size: the trials of sweep '{plan.spec.name}' were packed (pack_size "
                    f"{old.get('pack_size')!r}) or ordered differently from this run's "
                    f"(pack_size {plan.spec.pack_size!r}); "
                    "a trial's exact numbers depend on its pack, so restore that pack_size or pass "
                    "--allow-mixed to continue with both"
                )
            return True
        if old.get("fingerprint") != plan.fingerprint:
            raise UserError(
                f"sweep '{plan.spec.name}': {sweep_dir} holds a different plan "
                f"({old.get('n_trials')} trials, "
                f"fingerprint {old.get('fingerprint')}; this spec: {len(plan.trials)}, {plan.fingerprint}); "
                "rename the sweep or remove that directory"
            )
    return False


def check_device_provenance(
    plan: SweepPlan, sweep_dir: layout.Location, *, embedded: bool, allow_mixed: bool
) -> None:
    """Refuse to resume on another kind of device than the finished trials used, or over trials of an
    earlier trainer version (unless `allow_mixed`): both are outside the trial key but change its
    numbers. On a cluster, `device: auto` resolves on the workers, so only an explicit device can be
    checked there."""
    if allow_mixed or not layout.trials_root(sweep_dir).exists():
        return
    local = None
    if embedded:
        import torch

        local = "cuda" if torch.cuda.is_available() else "cpu"
    for trial in plan.trials:
        wanted = trial.device if trial.device != "auto" else local
        result = layout.read_result(layout.trial_dir(sweep_dir, trial.trial_key()))
        if result is not None and "device" not in result:
            raise UserError(
                f"sweep '{plan.spec.name}': its finished trials were trained by an earlier filter-lottery "
                "(before the majority-class failure rule, the reference input option and per-filter Adam "
                "steps; their results record no device); start a new sweep name, or pass --allow-mixed "
                "to continue with both"
            )
        used = (result or {}).get("device") or ""
        if wanted and used and used.split(":")[0] != wanted:
            raise UserError(
                f"device: finished trials of sweep '{plan.spec.name}' ran on {used} and this run would "
                f"train the rest on {wanted}; a trial's exact numbers depend on the device, so run on "
                f"{used.split(':')[0]} or pass --allow-mixed to continue with both"
            )


def check_local_data(plan: SweepPlan) -> dict[str, str]:
    """Load each distinct dataset once, so a missing or damaged data dir fails before anything starts,
    and run each distinct model on a batch of its data's shape (orchestrator/run/preflight_model.py).

    Returns each file-backed dataset's fingerprint (keyed by its config) for the stored-result check.
    Raises UserError naming the spec field (base.data..., base.batch_size), one line, exit 2.
    """
    import torch

    from orchestrator.run.trial import data_fingerprint
    from trainers.data import check_batch_fits, load_data
    from trainers.errors import DataError

    fingerprints: dict[str, str] = {}
    train_sizes: dict[str, tuple[int, str]] = {}
    shapes: dict[str, DataShape] = {}
    for trial in plan.trials:
        key = trial.data.model_dump_json()
        try:
            if key not in train_sizes:
                data = load_data(trial.data, trial.data_seed, torch.device("cpu"))
                fingerprints[key] = data_fingerprint(data)
                train_sizes[key] = (len(data.y_train), data.variant)
                shapes[key] = DataShape.of(data)
                del data  # one dataset in memory at a time
            check_batch_fits(trial.batch_size, trial.full_batch, *train_sizes[key])
        except DataError as exc:
            raise UserError(_spec_field(str(exc))) from None
    check_models(plan, shapes)  # each distinct model meets its data's shape once (preflight_model.py)
    return {k: v for k, v in fingerprints.items() if v}


def _spec_field(message: str) -> str:
    """A trainer's data message in the spec's terms: its field under base, and no flag the sweep lacks."""
    message = message.replace(
        "pass --data-dir or set LOTTERY_DATA_DIR", "set base.data.data_dir or LOTTERY_DATA_DIR"
    )
    return message if message.startswith("base.") else f"base.{message}"
