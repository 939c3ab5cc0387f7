"""User mistakes become one line naming the field and the fix, and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import yaml
from pydantic import ValidationError

F = TypeVar("F", bound=Callable[..., Any])
USAGE_EXIT = 2
TRACKING_EXIT = 3  # `lottery sweep`: every trial ended, but some MLflow runs are missing (`lottery sync`)


class UserError(Exception):
    """A problem the user can fix; its message is the whole report."""


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    from trainers.config import SCHEMES

    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-after")]
    # A discriminated union adds its tag to the path (scheme.randomout.tau): users wrote scheme.tau.
    loc = [part for i, part in enumerate(loc) if not (i and loc[i - 1] == "scheme" and part in SCHEMES)]
    field = ".".join(loc)
    field = f"{prefix}{field}" if field else prefix.rstrip(".") or "spec"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field; remove it or check its spelling"
    elif first["type"] == "missing":
        message = "required field is missing"
    extra = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{field}: {message}{extra}"


def fail(message: str) -> NoReturn:
    """One line, always: control characters (a YAML key can hold a newline) are shown escaped."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


def user_errors(func: F) -> F:
    """Turn every known user mistake raised inside a command into `error: ...` and exit 2."""
    from trainers.errors import DataError

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
        except (UserError, DataError) as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]
