"""`lottery sweep --dry-run`: the run's own checks, the plan as a table and its cost; nothing started."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator import layout
from orchestrator.run.preflight import check_cluster_resources, preflight, sweep_dir_for
from orchestrator.run.ray_session import cluster_address, ray_session
from orchestrator.spec import SweepPlan

PLAN_TABLE_ROWS = 20  # configurations the dry run lists one by one; the rest are summed in one row


def dry_run(
    plan: SweepPlan,
    root: layout.Location,
    console: Console,
    *,
    address: str | None = None,
    allow_mixed: bool = False,
    retrain_changed: bool = False,
    estimate_cost: bool = True,
) -> None:
    """The run's own checks (data, device, resources, stored results), the plan and its cost; nothing
    is started or written."""
    sweep_dir = sweep_dir_for(plan, root)
    address = cluster_address(plan, address)
    changed = preflight(plan, sweep_dir, address, allow_mixed=allow_mixed, retrain_changed=retrain_changed)
    if address is not None:
        with ray_session(address):
            check_cluster_resources(plan, address)
    console.print(f"{len(plan.trials)} trials in sweep '{plan.spec.name}' (dry run: nothing started)")
    console.print(pack_text(plan))
    for line in unpacked_nets(plan):
        console.print(line, soft_wrap=True, highlight=False)
    if plan.spec.sequential:
        rule = plan.spec.sequential
        console.print(
            f"sequential study: up to {len(plan.spec.seeds)} seeds per configuration, {rule.batch} per batch "
            f"({plan.n_batches} batches at most), stopping once {rule.describe()}"
        )
    console.print(f"sweep directory: {sweep_dir}")
    if changed:
        console.print(
            f"{len(changed)} stored result(s) trained on other data would be set aside and retrained"
        )
    console.print(plan_table(plan))
    if estimate_cost:
        from orchestrator.run.estimate import estimate
        from trainers.errors import DataError

        try:
            text = estimate(plan, sweep_dir).text()
        except DataError as exc:  # a cluster's data may live on its workers only
            text = f"estimated cost: not measured here ({exc})"
        console.print(text, soft_wrap=True, highlight=False)


def pack_text(plan: SweepPlan) -> str:
    """How the trials are grouped into Tune trials (seed packs train several seeds in one process)."""
    sizes = sorted({len(u) for u in plan.units})
    if sizes == [1]:
        return f"{len(plan.units)} Tune trials, one seed each (pack_size {plan.spec.pack_size})"
    return (
        f"{len(plan.units)} Tune trials: seed packs of {', '.join(map(str, sizes))} "
        f"(pack_size {plan.spec.pack_size}; see trainers/pack.py)"
    )


def unpacked_nets(plan: SweepPlan) -> list[str]:
    """One line per custom net that asked for packs but trains one seed per trial, and why (vmap
    cannot batch it: trainers/packcheck.py, whose verdict the plan's packs already follow)."""
    if plan.spec.pack_size == 1:
        return []
    from trainers.packcheck import custom_pack_check

    schemes: dict[tuple[str, str], list[str]] = {}
    for trial in plan.trials:
        if trial.model.name == "custom" and (problem := custom_pack_check(trial).problem) is not None:
            names = schemes.setdefault((trial.model.builder or "", problem), [])
            names += [] if trial.scheme.name in names else [trial.scheme.name]
    return [
        f"pack_size {plan.spec.pack_size}: {builder} under {', '.join(names)}: {problem}"
        for (builder, problem), names in schemes.items()
    ]


def plan_table(plan: SweepPlan, rows: int = PLAN_TABLE_ROWS) -> Table:
    """One row per configuration (scheme x grid point), with its seeds; not one row per trial. Past
    `rows` configurations the rest are one closing row, so a large plan stays a screenful."""
    table = Table(title=f"{plan.spec.name}: {len(plan.trials)} trials")
    for column in ("#", "scheme", "hyperparameters", "config_hash", "seeds", "trials"):
        table.add_column(column, justify="right" if column in ("#", "trials") else "left")
    groups: dict[str, list] = {}
    for trial in plan.trials:
        groups.setdefault(trial.config_hash(), []).append(trial)
    for i, (config_hash, trials) in enumerate(groups.items()):
        if i == rows and len(groups) > rows + 1:
            rest = sum(len(t) for t in list(groups.values())[rows:])
            table.add_row("...", "", f"{len(groups) - rows} more configurations", "", "", str(rest))
            break
        first = trials[0]
        label = " ".join(
            filter(None, [first.hparam_label(), _axes_label(first.model_dump(mode="json"), plan)])
        )
        table.add_row(
            str(i),
            first.scheme.name,
            label or "defaults",
            config_hash,
            _seed_text(dict.fromkeys(t.seed for t in trials)) + _cells_text(plan),
            str(len(trials)),
        )
    return table


def _axes_label(trial: dict[str, Any], plan: SweepPlan) -> str:
    """Grid axes that are TrialConfig paths (e.g. model.filters), shown with their values."""
    axes = list(plan.spec.grid) + [k for e in plan.spec.schemes for k in e.grid if "." in k]
    parts = []
    for key in dict.fromkeys(axes):
        node: Any = trial
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        parts.append(f"{key}={node}")
    return " ".join(parts)


def _cells_text(plan: SweepPlan) -> str:
    """ " x 10 order seeds x 2 replicates" when the seeds are split by source, else ""."""
    factorial = plan.spec.factorial
    return f" x {factorial.describe()}" if factorial is not None and factorial.describe() else ""


def _seed_text(seeds: Any) -> str:
    seeds = list(seeds)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ",".join(map(str, seeds[:6])) + (",..." if len(seeds) > 6 else "")
