"""The user's builder and loader code on every Ray worker of a cluster.

An embedded Ray needs nothing: its workers run on this machine, where file targets are imported by
absolute path and "package.module" targets from the spec's folder and the working directory (the
driver's sys.path, which Ray gives its local workers). A cluster's workers may not hold the files,
so the driver ships them with the job's runtime_env: each file target as a `py_modules` .py file
and each "package.module" target's top-level package when it is the user's (not installed), and
names the shipped file copies in LOTTERY_SHIPPED_CODE so a worker imports the copy the driver
hashed (trainers/custom.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.spec import SweepPlan


def code_runtime_env(plan: SweepPlan) -> dict[str, Any] | None:
    """The runtime_env that ships the plan's custom code (None when it has none)."""
    from trainers.custom import SHIPPED_ENV, file_path, is_file_target, top_package

    modules: set[str] = set()
    shipped: dict[str, str] = {}
    for trial in plan.trials:
        for cfg, field in ((trial.model, "builder"), (trial.data, "loader")):
            text = getattr(cfg, field)
            if not text:
                continue
            if not is_file_target(text):
                top = top_package(text.split(":", 1)[0], cfg.base_dir)
                if top is not None:
                    modules.add(str(top))
                continue
            path = file_path(text, cfg.base_dir)
            other = next((p for p, name in shipped.items() if name == path.stem and p != str(path)), None)
            if other is not None:
                raise UserError(
                    f"base.{cfg.__class__.__name__.removesuffix('Config').lower()}.{field}: {path} and "
                    f"{other} share the module name {path.stem!r} on the workers; rename one"
                )
            shipped[str(path)] = path.stem
            modules.add(str(path))
    if not modules:
        return None
    env: dict[str, Any] = {"py_modules": sorted(modules)}
    if shipped:
        env["env_vars"] = {SHIPPED_ENV: json.dumps(shipped, sort_keys=True)}
    return env


def check_uploaded(plan: SweepPlan, root: Path) -> None:
    """`lottery submit` uploads the checkout at `root` and runs the sweep from that copy, where a
    file target outside it does not exist: refuse such a target here, in one line."""
    from trainers.custom import file_path, is_file_target

    for trial in plan.trials:
        for cfg, section, field in ((trial.model, "model", "builder"), (trial.data, "data", "loader")):
            text = getattr(cfg, field)
            if text and is_file_target(text) and not file_path(text, cfg.base_dir).is_relative_to(root):
                raise UserError(
                    f"base.{section}.{field}: {file_path(text, cfg.base_dir)} is outside {root}; the job "
                    "uploads that checkout, so put the file in it (beside the spec)"
                )
