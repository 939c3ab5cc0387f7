"""What fixes a row's result besides the seed, as text: the shared setting and every hyperparameter.

A number read without its setting (lr, optimizer, epochs, batch, init, input scale, tau, P) is a
number nobody can compare, and a hyperparameter left out because it equals the default reads as
"none". The aggregated tables carry both as JSON (`setting`, `hparams`); these helpers say them
the same way in the CLI table and the report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pandas as pd

# Short names a researcher reads in the papers (RandomOut's P, RePr's p, N, S1, S2).
SHORT = {"active_fraction": "P", "drop_fraction": "p", "n_iter": "N", "input_scale": "input scale"}


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def loads(doc: object) -> dict[str, Any]:
    """A JSON column cell as a dict ({} for a missing one)."""
    return json.loads(doc) if isinstance(doc, str) and doc else {}


def pairs_text(values: dict[str, Any]) -> str:
    """{"tau": 1e-08, "active_fraction": 1.0} -> 'tau=1e-08 P=1'."""
    return " ".join(f"{SHORT.get(k, k)}={_value(v)}" for k, v in values.items())


def hparams_text(doc: object) -> str:
    """Every scheme hyperparameter of a row, defaults included; 'none' for a scheme without any."""
    return pairs_text(loads(doc)) or "none"


def arm_text(scheme: str, filters: object, hparams: object, axes: dict[str, Any] | None = None) -> str:
    """One arm of a study as text: 'randomout 8f P=1 tau=1e-08'.

    Scheme, width and every scheme hyperparameter, defaults named (a default left out reads as
    "none" and makes two arms of a grid look alike), plus `axes`: other values the sweep's grid
    varies (lr=0.1). `hparams` is a dict or the tables' JSON; keys sorted, so the child runs'
    arm tag and the parent's table name an arm the same way.
    """
    values = hparams if isinstance(hparams, dict) else loads(hparams)
    width = "" if filters is None or pd.isna(filters) else f" {int(filters)}f"  # type: ignore[call-overload]
    parts = (f"{scheme}{width}", pairs_text(dict(sorted(values.items()))), pairs_text(axes or {}))
    return " ".join(part for part in parts if part)


def split_setting(docs: Iterable[object]) -> tuple[dict[str, Any], list[str]]:
    """(values every row shares, keys whose value differs between rows), in the setting's key order."""
    settings = [loads(d) for d in docs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    common: dict[str, Any] = {}
    varying = []
    for key in keys:
        values = {json.dumps(s.get(key)) for s in settings}
        if len(values) == 1:
            common[key] = settings[0][key]
        else:
            varying.append(key)
    return common, varying


def row_setting_text(doc: object, keys: list[str]) -> str:
    """The varying part of one row's setting."""
    values = loads(doc)
    return pairs_text({k: values.get(k) for k in keys})


def setting_line(summary: pd.DataFrame) -> str:
    """'lr=0.01 optimizer=sgd ... tau=1e-08' for what every row shares, plus what varies."""
    common, varying = split_setting(summary["setting"])
    text = pairs_text(common) or "not recorded"
    return text + (f"; varies by row: {', '.join(SHORT.get(k, k) for k in varying)}" if varying else "")


def row_labels(summary: pd.DataFrame) -> dict[str, str]:
    """config_hash -> what tells its row apart besides scheme and hyperparameters: the setting's varying
    part and the width when widths differ ('lr=0.1 filters=2'); all '' when nothing varies. A table keyed
    by config_hash (the decision-grade one) labels its rows with this, as the summary does."""
    if summary.empty:
        return {}
    _, varying = split_setting(summary["setting"])
    widths = summary["filters"].dropna().unique()
    labels = {}
    for r in summary.itertuples(index=False):
        width = f"filters={int(r.filters)}" if len(widths) > 1 and pd.notna(r.filters) else ""
        labels[str(r.config_hash)] = " ".join(p for p in (row_setting_text(r.setting, varying), width) if p)
    return labels
