"""The sweep spec's field reference, generated from the pydantic models, for docs/spec-reference.md.

Every field a spec can set: where it goes (its YAML path), its type, default, constraints, what it
means and an example. Types, defaults and constraints come from the models' own field info; the
meaning is the comment written beside each field in the model's source (the one place it is kept).
`python -m orchestrator.spec_reference --write` rewrites the section between the markers in
docs/spec-reference.md (or in the file named after `--write`); tests/test_spec_reference.py fails when
the two drift apart.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import tokenize
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator.spec import Resources, SchemeEntry, SweepSpec
from orchestrator.spec_seeds import SeedFactorial
from trainers.config import SCHEME_MODELS, TrialConfig

START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"
TARGET = Path(__file__).resolve().parents[1] / "docs" / "spec-reference.md"  # where the reference lives


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """field name -> the comment on its line (or on the comment lines just above it)."""
    source = inspect.getsource(model)
    lines = source.splitlines()
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("# ").strip()
    found = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = by_line.get(node.lineno, "")
            above, line = [], node.lineno - 1
            while not text and line in by_line and lines[line - 1].strip().startswith("#"):
                above.insert(0, by_line[line])
                line -= 1
            found[node.target.id] = text or " ".join(above)
    return found


def _type(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type(a) for a in get_args(annotation))
    if origin is not None and get_args(annotation) and origin.__name__ == "Annotated":
        return _type(get_args(annotation)[0])
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _constraints(metadata: list[Any]) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "pattern": "matches"}
    out = []
    for item in metadata:
        for attr, sign in signs.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(dict.fromkeys(out))


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _example(path: str, value: Any, scheme: str | None = None) -> str:
    """`base.optim.lr`, 0.01 -> `base: {optim: {lr: 0.01}}` (YAML flow style)."""
    text = value if isinstance(value, str) and value else json.dumps(value)
    for part in reversed(path.split(".")):
        if part.endswith("[]"):
            named = f"name: {scheme}, " if scheme and not text.startswith("{name:") else ""
            text = f"{{{part[:-2]}: [{{{named}{text[1:-1]}}}]}}"
        else:
            text = f"{{{part}: {text}}}"
    return text[1:-1]


def _rows(
    model: type[BaseModel], prefix: str, skip: frozenset[str] = frozenset(), scheme: str | None = None
) -> list[list[str]]:
    comments = _comments(model)
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        path = f"{prefix}{name}"
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel) and name != "scheme":
            rows += _rows(nested, f"{path}.")
            continue
        required = field.is_required()
        default = "required" if required else json.dumps(_default(field), default=str)
        if name == "scheme":
            default, kind = '{"name": "baseline"}', "mapping: one of the schemes below"
        else:
            kind = _type(field.annotation)
        sample = _default(field) if not required else {"name": "demo", "seeds": [0, 1, 2]}.get(name, "...")
        rows.append(
            [
                f"`{path}`",
                kind,
                default,
                _constraints(field.metadata),
                comments.get(name, ""),
                f"`{_example(path, sample, scheme)}`",
            ]
        )
    return rows


def _table(rows: list[list[str]]) -> str:
    head = "| field | type | default | constraints | meaning | example |\n|---|---|---|---|---|---|\n"
    cells = ((c if i == 1 else c.replace("|", "\\|") for i, c in enumerate(r)) for r in rows)
    return head + "".join("| " + " | ".join(r) + " |\n" for r in cells)


def reference() -> str:
    """The whole generated section (without the markers)."""
    parts = [
        "Generated from the pydantic models by `python -m orchestrator.spec_reference --write`;"
        " a test keeps it in sync. A spec's `base` is one trial's configuration (everything under"
        " `base.` below; `lottery train --set` takes the same paths without `base.`, `lottery sweep"
        " --set` every path as written here); `grid` crosses any of those paths; each `schemes[]`"
        " entry names a scheme and sets its `params` or crosses them in its own `grid`.",
        "#### The sweep",
        _table(
            _rows(SweepSpec, "", frozenset({"resources", "schemes", "factorial"}))
            + _rows(SeedFactorial, "seeds.")
            + _rows(Resources, "resources.")
        ),
        "#### A scheme entry (`schemes[]`)",
        _table(_rows(SchemeEntry, "schemes[].")),
        "#### One trial (`base`)",
        "`seed`, `scheme` and `failure_margin` come from the sweep (`seeds`, `schemes`, `failure_margin`).",
        _table(_rows(TrialConfig, "base.", frozenset({"seed", "scheme", "failure_margin"}))),
    ]
    for model in SCHEME_MODELS:
        name = model.model_fields["name"].default
        rows = _rows(model, "schemes[].params.", frozenset({"name"}), scheme=name)
        parts += [f"#### Scheme `{name}` (`schemes[].params` / `schemes[].grid`)"]
        parts += [_table(rows) if rows else "No hyperparameters."]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def readme_section(readme: str) -> str:
    """The text between the markers in a document."""
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write(readme_path: Path) -> None:
    text = readme_path.read_text()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme_path.write_text(f"{before}{START}\n{reference()}{END}{after}")


def main() -> None:  # pragma: no cover - a maintenance command
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=TARGET,
        help="file to rewrite between the markers (default docs/spec-reference.md)",
    )
    args = parser.parse_args()
    if args.write:
        write(args.write)
    else:
        print(reference(), end="")


if __name__ == "__main__":  # pragma: no cover
    main()
