"""Safe YAML in, nested dicts out; dotted `key=value` overrides for the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config: no such file {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        doc = yaml.safe_load(text)
    except OSError as exc:
        raise UserError(f"config: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config: {path} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UserError(f"config: {path} nests collections too deeply") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"config: {path} must hold a mapping of fields, not a {type(doc).__name__}")
    return doc


def set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "scheme":
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set model.filters=4` style overrides; values are parsed as YAML scalars (1e-8, true, 4)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set scheme.tau=1e-8")
        set_dotted(doc, key.strip(), yaml.safe_load(raw))
    return doc
