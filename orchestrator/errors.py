"""User mistakes become one line naming the field and the fix, and exit code 2."""

from __future__ import annotations

import difflib
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import wraps
from typing import Any, NoReturn, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

F = TypeVar("F", bound=Callable[..., Any])
USAGE_EXIT = 2
TRACKING_EXIT = 3  # `lottery sweep`: every trial ended, but some MLflow runs are missing (`lottery sync`)
ERRORED_EXIT = 4  # `lottery sweep`: every trial ended, but some errored (their error.txt says why)
STORAGE_EXIT = 5  # `lottery sweep`: stopped because the sweep directory is full or read-only
UNKNOWN_ADVICE = "; remove it or check its spelling"


class UserError(Exception):
    """A problem the user can fix; its message is the whole report."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest choice (case-insensitive first, then difflib), else ""."""
    choices = [str(c) for c in choices]
    if word in choices:
        return ""
    folded = [c for c in choices if c.lower() == word.lower()]
    close = folded or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def model_fields_at(model: type[BaseModel], loc: Iterable[Any]) -> list[str] | None:
    """The field names of the model reached by walking `loc` from `model` (None if it leads elsewhere).

    A discriminated union (a trial's scheme) is resolved by the tag pydantic puts in the location."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the same model
        if isinstance(current, list):  # the members of a discriminated union, picked by their tag
            current = next((m for m in current if m.model_fields["name"].default == part), None)
            if current is not None:
                continue
            return None
        field = current.model_fields.get(str(part)) if isinstance(current, type) else None
        if field is None:
            return None
        current = _model_of(field.annotation)
        if current is None:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _model_of(annotation: Any) -> Any:
    """A BaseModel class, a list of them (a union), or None, from a field's annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [m for a in args for m in ([a] if not isinstance(_model_of(a), list) else _model_of(a))]
    models = [m for m in models if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) == 1:
        return models[0]
    return models or None


def unknown_field_message(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """What `extra_forbidden` says: remove it, or the field the user most likely meant."""
    fields = model_fields_at(model, loc[:-1]) or []
    return f"unknown field{did_you_mean(str(loc[-1]), fields) or UNKNOWN_ADVICE}"


def choice_hint(error: Mapping[str, Any]) -> str:
    """ "; did you mean 'x'?" for a wrong name among fixed choices (a Literal or a union's tag)."""
    ctx = error.get("ctx") or {}
    if error["type"] == "union_tag_invalid":
        given, expected = str(ctx.get("tag", "")), str(ctx.get("expected_tags", ""))
    elif error["type"] == "literal_error" and isinstance(error.get("input"), str):
        given, expected = error["input"], str(ctx.get("expected", ""))
    else:
        return ""
    return did_you_mean(given, re.findall(r"'([^']*)'", expected))


def plain_message(error: Mapping[str, Any], message: str) -> str:
    """pydantic's `message` for a field, said plainly: a missing field as such, the value given echoed
    when it is short and not already in the message, a near choice suggested (specs and trial configs)."""
    if error["type"] == "missing":
        return "required field is missing"
    if "input" in error and not isinstance(error["input"], dict | list):
        echo = "" if repr(error["input"]) in message else f" (got {error['input']!r})"
        return f"{message}{echo}{choice_hint(error)}"
    return message + choice_hint(error)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    from trainers.config import SCHEMES, TrialConfig

    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-after")]
    # A discriminated union adds its tag to the path (scheme.randomout.tau): users wrote scheme.tau.
    loc = [part for i, part in enumerate(loc) if not (i and loc[i - 1] == "scheme" and part in SCHEMES)]
    field = ".".join(loc)
    field = f"{prefix}{field}" if field else prefix.rstrip(".") or "spec"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        # TrialConfig is the one model validated outside a spec (`lottery train`).
        model = TrialConfig if error.title == TrialConfig.__name__ else None
        where = tuple(p for p in first["loc"] if not str(p).startswith("function-"))
        message = unknown_field_message(model, where) if model else f"unknown field{UNKNOWN_ADVICE}"
    else:
        message = plain_message(first, message)
    extra = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{field}: {message}{extra}"


def fail(message: str) -> NoReturn:
    """One line, always: control characters (a YAML key can hold a newline) are shown escaped."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


def usage_error_line(error: Any) -> str:
    """A Typer usage error (a bad flag value, an unknown flag) as our one line, the value echoed."""
    import typer

    command = error.ctx.command_path if getattr(error, "ctx", None) else "lottery"
    see = f" (see {command} --help)"
    if hasattr(error, "option_name") and hasattr(error, "possibilities"):  # no such option
        close = did_you_mean(error.option_name, error.possibilities or [])
        return f"{error.option_name}: no such option{close or see}"
    message = error.format_message() if hasattr(error, "format_message") else str(error)
    bad_value = re.fullmatch(r"Invalid value for '([^']+)': (.*)", message, flags=re.S)
    if isinstance(error, typer.BadParameter) and bad_value:  # "--epochs: 'abc' is not ..."
        flag, why = bad_value.groups()
        cause = error.__cause__  # Typer coerces values with pydantic: the input is in its error
        given = cause.errors()[0].get("input") if isinstance(cause, ValidationError) else None
        message = f"{flag}: {why.rstrip('.')}" + (
            f" (got {given!r})" if given and repr(given) not in why else ""
        )
    return f"{' '.join(message.split()).rstrip('.')}{see}"


def user_errors(func: F) -> F:
    """Turn every known user mistake raised inside a command into `error: ...` and exit 2."""
    from orchestrator.storage_fault import StorageFault
    from trainers.errors import DataError, DeviceError, SchemeError

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ValidationError as exc:
            fail(describe_validation_error(exc))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            fail(f"YAML: malformed document{where}: {getattr(exc, 'problem', exc)}")
        except (UserError, DataError, DeviceError, SchemeError) as exc:
            fail(str(exc))
        except StorageFault as exc:  # a full or read-only disk: one line, not a traceback
            print(f"error: {exc.line()}", file=sys.stderr)
            raise SystemExit(STORAGE_EXIT) from None

    return wrapper  # type: ignore[return-value]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: MLflow's connection errors span lines and repeat the URL."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
