"""The fate clock's tables from a sweep directory: children apart from the lottery's trials, the
instability of each family from its children's stored weights, and the printed table.

A sweep with `fork:` holds parents (ordinary trials) and their children (trainers/fork.py). The
summary and every other table describe the parents only; the children feed the "Fate clock"
table (dashboards/fate.py) and `aggregate/children.parquet`. The instability needs torch, the
children's `final_weights.pt` and the test split, so it is computed here, once per family (the first
two finished children of a parent at a fork point), on the CPU.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.table import Table

from dashboards.fate import PARENT, fate_table
from orchestrator import layout


def split_children(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the lottery's trials, the fate-clock children), each with its own fresh index."""
    child = trials["fork_at"].notna()
    return trials[~child].reset_index(drop=True), trials[child].reset_index(drop=True)


def barriers(sweep_dir: layout.Location, children: pd.DataFrame) -> pd.DataFrame:
    """PARENT columns, fork_at and the instability (test-error fraction) per family with two
    finished children that kept their weights (a diverged child has none worth a line)."""
    import torch

    from trainers.config import TrialConfig
    from trainers.data import load_data
    from trainers.instability import instability, path_errors

    done = children[(children["status"] == "finished") & ~children["diverged"]]
    rows, data_cache = [], {}
    for _, family in done.groupby([*PARENT, "fork_at"], sort=False, dropna=False):
        pair = family.sort_values("fork_child").head(2)
        if len(pair) < 2:
            continue
        states, config = [], None
        for key in pair["trial_key"]:
            trial_dir = layout.trial_dir(sweep_dir, key)
            raw = layout.read_checkpoint_bytes(trial_dir / layout.FINAL_WEIGHTS)
            if raw is None:
                break
            states.append(torch.load(raw, weights_only=True, map_location="cpu"))
            config = config or TrialConfig.model_validate(
                layout.read_json(trial_dir / layout.CONFIG)["trial"]
            )
        if len(states) < 2 or config is None:
            continue
        config = config.model_copy(update={"device": "cpu"})
        data_key = (config.data.model_dump_json(), config.data_seed)
        if data_key not in data_cache:
            data_cache[data_key] = load_data(config.data, config.data_seed, torch.device("cpu"))
        errors = path_errors(config, states[0], states[1], data_cache[data_key])
        first = pair.iloc[0]
        rows.append(
            {**{c: first[c] for c in PARENT}, "fork_at": first["fork_at"], "instability": instability(errors)}
        )
    return pd.DataFrame(rows, columns=[*PARENT, "fork_at", "instability"])


def fate_tables(
    sweep_dir: layout.Location, trials: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(the lottery's trials, the children, the fate table); the last two empty without `fork:`."""
    parents, children = split_children(trials)
    if children.empty:
        return parents, children, fate_table(parents, children)
    return parents, children, fate_table(parents, children, barriers(sweep_dir, children))


def _pct(value: Any, low: Any = None, high: Any = None) -> str:
    if pd.isna(value):
        return "-"
    text = f"{100 * value:.0f}"
    return text + (f" [{100 * low:.0f}, {100 * high:.0f}]" if low is not None and pd.notna(low) else "")


def format_fate_table(fate: pd.DataFrame) -> Table:
    """The fate clock per arm and fork point, as `lottery aggregate` prints it."""
    table = Table(
        title="Fate clock (children forked from each parent at a fraction of training, own batches after)",
        caption=(
            "unanimous: parents whose children all agree on failed / not. P(fail | parent ...): share of "
            "children failing, Wilson 95% CI over children. SD: children around their family's mean vs "
            "parents. Instability: test-error barrier on the straight line between two children "
            "(Frankle et al. 2020), median / max over parents, in points."
        ),
        caption_justify="left",
    )
    columns = ("scheme", "hparams", "fork at", "parents (failed)", "children", "unanimous %")
    columns += ("P(fail | parent failed) %", "P(fail | parent ok) %", "SD children / parents pts")
    columns += ("instability pts (median / max, n)",)
    for column in columns:
        table.add_column(column, justify="left" if column in ("scheme", "hparams") else "right")
    for r in fate.itertuples(index=False):
        table.add_row(
            str(r.scheme),
            str(r.hparam_label) if isinstance(r.hparam_label, str) and r.hparam_label else "-",
            f"{r.fork_at:g}",
            f"{r.n_parents} ({r.n_parents_failed})",
            str(r.n_children),
            _pct(r.unanimous),
            _pct(r.p_fail_after_failed, r.p_fail_after_failed_low, r.p_fail_after_failed_high),
            _pct(r.p_fail_after_ok, r.p_fail_after_ok_low, r.p_fail_after_ok_high),
            "-" if pd.isna(r.child_sd_pts) else f"{r.child_sd_pts:.1f} / {r.parent_sd_pts:.1f}",
            "-"
            if not r.n_barriers
            else f"{r.instability_median_pts:.1f} / {r.instability_max_pts:.1f} (n={r.n_barriers})",
        )
    return table
