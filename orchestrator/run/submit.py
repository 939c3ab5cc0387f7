"""`lottery submit / status / logs`: a sweep as a Ray job on a cluster, through the Jobs API.

The spec is validated here first, so a mistake costs nothing on the cluster. The job uploads
this checkout as its working_dir (Ray puts it first on PYTHONPATH, so the cluster runs exactly
this code) and runs `lottery sweep SPEC` on the head, where the job's RAY_ADDRESS attaches the
driver to the cluster. Hence the spec must live inside the checkout, and the results need an
absolute storage path (spec `storage_path` or LOTTERY_HOME): the job's working directory is a
temporary copy.

Only configuration travels in the job's runtime_env: MLFLOW_TRACKING_URI and LOTTERY_*.
Credentials never do (anyone who can read the job's details could read them, and Ray keeps
runtime_envs in its dashboard): the cluster nodes hold their own MLFLOW_TRACKING_USERNAME /
PASSWORD and RAY_AUTH_TOKEN. The client sends the cluster's token (Ray token auth, on by default
since Ray 2.60) as an `Authorization: Bearer` header only: from RAY_AUTH_TOKEN, else the file
RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token, the places Ray itself looks, whatever
RAY_AUTH_MODE says here. A missing or refused token is one line naming the variable to set.

The Jobs API is served by the head's dashboard, which needs `ray[default]` on the cluster (Ray's
images have it; a pip-installed head needs the extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.run.user_code import check_uploaded
from orchestrator.spec import SweepPlan
from orchestrator.tracking.runs import refuse_password

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOKEN_FILE = Path("~/.ray/auth_token")  # Ray's default token file
# Ray also honours .gitignore (which covers .venv, runs and .env); these hold even if that is turned off.
EXCLUDES = [".venv", layout.RESULTS_ROOT, ".git", ".env", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
PASSED_VARIABLES = ("MLFLOW_TRACKING_URI",)
PASSED_PREFIXES = ("LOTTERY_",)
SECRET_MARKERS = ("PASSWORD", "TOKEN", "SECRET", "KEY")  # never forwarded, even under a LOTTERY_ name
CHATTY_LOGGERS = {  # the SDK narrates every upload step at INFO; real problems are still WARNING or worse
    "ray.dashboard.modules.job.sdk": logging.WARNING,
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray._private.runtime_env.packaging": logging.WARNING,
    # Warns once per run that .git and .venv "are now ignored by default": we exclude them anyway.
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


def job_entrypoint(spec: Path, root: Path = PROJECT_ROOT) -> str:
    """`lottery sweep <spec relative to the checkout>`: the path the spec has in the uploaded copy."""
    try:
        relative = spec.resolve().relative_to(root)
    except ValueError:
        raise UserError(
            f"submit: {spec} is outside {root}; the job uploads that checkout, so put the spec in it "
            "(e.g. configs/)"
        ) from None
    if relative.parts[0] in EXCLUDES:
        raise UserError(f"submit: {spec} is under {relative.parts[0]}/, which is not uploaded")
    return f"lottery sweep {relative.as_posix()}"


def job_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's MLFLOW_TRACKING_URI and LOTTERY_* settings; never a credential."""
    passed = {
        name: value
        for name, value in environ.items()
        if (name in PASSED_VARIABLES or name.startswith(PASSED_PREFIXES))
        and not any(marker in name for marker in SECRET_MARKERS)
    }
    refuse_password(passed.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI")
    return passed


def check_storage(plan: SweepPlan, environ: Mapping[str, str]) -> None:
    """Results must outlive the job's temporary working directory: an absolute storage path."""
    storage = layout.location(plan.spec.storage_path or str(layout.results_root(environ)))
    if isinstance(storage, Path) and not storage.is_absolute():  # a store URI is reachable from anywhere
        raise UserError(
            f"storage_path: a cluster job needs an absolute path that every node mounts (got '{storage}'); "
            "set storage_path in the spec or an absolute LOTTERY_HOME"
        )


def submit_sweep(spec: Path, plan: SweepPlan, address: str, environ: Mapping[str, str]) -> str:
    """Submit `lottery sweep SPEC` as a Ray job; returns its submission id."""
    entrypoint = job_entrypoint(spec)
    env = job_env(environ)
    check_storage(plan, environ)
    check_uploaded(plan, PROJECT_ROOT)
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env}
    with jobs_client(address) as client:
        return client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata={"sweep": plan.spec.name, "spec": entrypoint.rsplit(" ", 1)[1]},
        )


def job_status(job_id: str, address: str) -> tuple[str, str]:
    """(status, Ray's message) of a job."""
    with jobs_client(address) as client:
        info = client.get_job_info(job_id)
    return str(info.status), info.message or ""


def print_logs(job_id: str, address: str, *, follow: bool, out: TextIO = sys.stdout) -> str:
    """Write the job's logs to `out` (following them to the end if asked); returns the job's status."""
    with jobs_client(address) as client:
        if follow:
            asyncio.run(_follow(client, job_id, out))
        else:
            out.write(client.get_job_logs(job_id))
        out.flush()
        return str(client.get_job_status(job_id))


async def _follow(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


@contextlib.contextmanager
def jobs_client(address: str) -> Iterator[JobSubmissionClient]:
    """A Jobs API client for exactly `address`; Ray's errors become one line.

    The SDK lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its argument; a command-line
    --address must win, so the variable is set to it for the call.
    """
    from ray.job_submission import JobSubmissionClient

    for name, level in CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    from ray.exceptions import AuthenticationError

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    token = auth_token(os.environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        yield JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise UserError(auth_error(address, str(exc), sent=token is not None)) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"ray jobs at {address}: {' '.join(str(exc).split())[:400]}") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def auth_token(environ: Mapping[str, str]) -> str | None:
    """The cluster token, looked up where Ray looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray."""
    if token := environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else TOKEN_FILE
    with contextlib.suppress(OSError):
        return path.expanduser().read_text().strip() or None
    return None


def auth_error(address: str, message: str, *, sent: bool) -> str:
    """One line for a Jobs API that wants a token we lack (401) or refused ours (403)."""
    fix = "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token (`ray get-auth-token` on the head)"
    if not sent or "Authentication required" in message:
        return f"RAY_AUTH_TOKEN: the Ray cluster at {address} requires a token and none was found; {fix}"
    return f"RAY_AUTH_TOKEN: the Ray cluster at {address} refused the token; {fix}"
