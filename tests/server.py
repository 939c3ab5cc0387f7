"""The MLflow tracking server exactly as docker-compose.yml starts it.

The compose file is the single source of truth for the server's flags and environment: the `mlflow`
service's `command:` and `environment:` carry `${VAR}` placeholders that compose fills from `.env`.
This module reads that service and fills the same placeholders from a dict, so the test fixture starts
by hand the very argv compose starts, only with other values (a local database, a tmp dir, a free
port). The values the tests change, and the single structural change they may make, are listed with
their reasons in `TEST_DIFFERENCES`; anything else the tests need must go through compose first.

It needs a source checkout (it reads the repository's docker-compose.yml), and it never imports the
rest of the project, so a fixture can use it without pulling in Ray or torch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

COMPOSE_FILE: Final = Path(__file__).resolve().parents[1] / "docker-compose.yml"
SERVICE: Final = "mlflow"
AUTH_FLAGS: Final = ("--app-name", "basic-auth")

TEST_DIFFERENCES: Final[Mapping[str, str]] = {
    "MLFLOW_BACKEND_STORE_URI": "a fresh database per test session on the local PostgreSQL (trust auth)",
    "MLFLOW_ARTIFACTS_DESTINATION": "pytest's tmp dir instead of the named volume",
    "MLFLOW_HOST": "bind to loopback only: a test never listens on other interfaces",
    "MLFLOW_PORT": "a free port, so concurrent sessions do not collide",
    "MLFLOW_WORKERS": "one uvicorn worker instead of two: less memory and start-up on a 2-core test machine",
    "POSTGRES_PASSWORD": "unused by the local trust-auth PostgreSQL; a random value fills the placeholder",
    "MLFLOW_ADMIN_PASSWORD": "random per session instead of the secret in .env",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "random per session instead of the secret in .env",
    "S3_ACCESS_KEY": "unused: artifacts go to the tmp dir, not the object store; a random value fills it",
    "S3_SECRET_KEY": "unused: artifacts go to the tmp dir, not the object store; a random value fills it",
    "basic-auth": (
        "the shared fixture drops `--app-name basic-auth`: headless Chromium cannot send credentials "
        "to the UI's fetch() calls and fixture users get a plain URI; a dedicated test starts the "
        "server with auth on, as compose does"
    ),
}
"""Everything a test may change relative to compose, with the reason: `${VAR}` names and `basic-auth`."""

_PLACEHOLDER = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


@dataclass(frozen=True)
class Placeholder:
    """One `${NAME[op arg]}` or `$NAME` reference, as compose's interpolation grammar defines it."""

    name: str
    operator: str | None
    argument: str

    @property
    def default(self) -> str | None:
        """The value compose uses when the variable is unset (`-`) or also when empty (`:-`)."""
        return self.argument if self.operator in ("-", ":-") else None


def placeholders(text: str) -> list[Placeholder]:
    """Every variable reference in `text`, skipping `$$` escapes; raises on a malformed `$`."""
    found = []
    for match in _PLACEHOLDER.finditer(text):
        if match["invalid"] is not None:
            raise ValueError(f"invalid interpolation at {match.start()} in {text!r}")
        if match["escaped"] is None:
            found.append(Placeholder(match["braced"] or match["bare"], match["op"], match["arg"] or ""))
    return found


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Fill `text`'s placeholders from `env` the way `docker compose` does (no nesting).

    Supports `$$`, `$NAME`, `${NAME}`, `${NAME-default}`, `${NAME:-default}`, `${NAME?err}`,
    `${NAME:?err}`, `${NAME+alt}` and `${NAME:+alt}`; an unset variable without default becomes "".
    """

    def substitute(match: re.Match[str]) -> str:
        if match["invalid"] is not None:
            raise ValueError(f"invalid interpolation at {match.start()} in {text!r}")
        if match["escaped"] is not None:
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"] or ""
        value = env.get(name)
        usable = value is not None and (value != "" or not (op or "").startswith(":"))
        if op in ("?", ":?") and not usable:
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op in ("+", ":+"):
            return arg if usable else ""
        if op in ("-", ":-") and not usable:
            return arg
        return value or ""

    return _PLACEHOLDER.sub(substitute, text)


def load_service(compose_file: Path = COMPOSE_FILE, service: str = SERVICE) -> dict[str, Any]:
    """The raw (uninterpolated) definition of one compose service."""
    document = yaml.safe_load(compose_file.read_text())
    return document["services"][service]


def server_argv(
    env: Mapping[str, str], *, auth: bool | None = None, compose_file: Path = COMPOSE_FILE
) -> list[str]:
    """The `mlflow server ...` argv of the compose `mlflow` service, placeholders filled from `env`.

    `auth=None` keeps compose's choice; `auth=False` drops `--app-name basic-auth` (the one structural
    difference `TEST_DIFFERENCES` allows); `auth=True` insists compose has it.
    """
    argv = [interpolate(str(arg), env) for arg in load_service(compose_file)["command"]]
    has_auth = _find_pair(argv, AUTH_FLAGS) is not None
    if auth is True and not has_auth:
        raise ValueError(f"compose's mlflow command lacks {' '.join(AUTH_FLAGS)}")
    if auth is False and has_auth:
        start = _find_pair(argv, AUTH_FLAGS)
        del argv[start : start + len(AUTH_FLAGS)]
    return argv


def server_env(env: Mapping[str, str], *, compose_file: Path = COMPOSE_FILE) -> dict[str, str]:
    """The `environment:` compose gives the `mlflow` container, placeholders filled from `env`."""
    environment = load_service(compose_file).get("environment", {})
    if not isinstance(environment, dict):
        raise TypeError("the mlflow service's environment must use the mapping form")
    return {key: interpolate(str(value), env) for key, value in environment.items()}


def _find_pair(argv: list[str], pair: tuple[str, str]) -> int | None:
    for index in range(len(argv) - 1):
        if (argv[index], argv[index + 1]) == pair:
            return index
    return None


@dataclass(frozen=True)
class RunningServer:
    """A started server: its base URL and its log file."""

    url: str
    log_path: Path


class ServerStartError(RuntimeError):
    """The server exited or never answered `/health` in time; the message carries the log tail."""


@contextmanager
def start_server(
    argv: list[str],
    service_env: Mapping[str, str],
    *,
    url: str,
    cwd: Path,
    log_path: Path,
    timeout_s: float = 90.0,
) -> Iterator[RunningServer]:
    """Run `argv` in its own process group until `url`/health answers 200; stop the group on exit.

    The child inherits this process's environment minus any `MLFLOW_*` variable (a developer's own
    settings must not change what is tested), plus `service_env`. The directory of the running Python
    goes first on PATH so `mlflow` is the one installed beside it. Stopping signals the whole group
    (the uvicorn workers included): SIGTERM, then SIGKILL after 10 s.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(service_env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_healthy(process, f"{url}/health", log_path, timeout_s)
        yield RunningServer(url=url, log_path=log_path)
    finally:
        stop_process_group(process)


def _wait_healthy(
    process: subprocess.Popen[bytes], health_url: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"mlflow server exited with {process.returncode} before {health_url} answered:\n"
                + _log_tail(log_path)
            )
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise ServerStartError(
        f"{health_url} did not answer 200 within {timeout_s:.0f} s:\n" + _log_tail(log_path)
    )


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by `process`, SIGKILL it if anything is left after `grace_s`."""
    pgid = process.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _log_tail(log_path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log, for error messages that say why a start failed."""
    if not log_path.exists():
        return "(no log written)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
