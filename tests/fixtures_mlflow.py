"""Fixtures for a real PostgreSQL database and the MLflow server as docker-compose.yml defines it.

Registered in conftest.py. The server is started from the compose service's own command and
environment (tests/server.py), so these tests exercise the deployed configuration, with only
the values `TEST_DIFFERENCES` lists swapped for local ones. Nothing here skips: a missing PostgreSQL
fails loudly, because a skipped integration suite looks green.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql
from server import TEST_DIFFERENCES, server_argv, server_env, start_server

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_CONNECT_WAIT_S = 20.0


@dataclass(frozen=True)
class PostgresDatabase:
    """A throwaway database on the local PostgreSQL (trust auth, no password)."""

    name: str
    host: str = PG_HOST
    port: int = PG_PORT
    user: str = PG_USER

    @property
    def sqlalchemy_uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{self.name}"

    def connect(self) -> psycopg2.extensions.connection:
        return psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=self.name)


@dataclass(frozen=True)
class MlflowUnderTest:
    """A running compose-configured MLflow server and the admin password it was started with."""

    url: str
    admin_password: str
    log_path: Path


def _admin_connection() -> psycopg2.extensions.connection:
    """Connect to the `postgres` database, starting the local cluster once if it is down."""
    try:
        return _connect_admin()
    except psycopg2.OperationalError:
        _start_local_cluster()
    deadline = time.monotonic() + PG_CONNECT_WAIT_S
    while True:
        try:
            return _connect_admin()
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} as {PG_USER} even after "
                    f"pg_ctlcluster start: {error}".strip()
                )
            time.sleep(0.5)


def _connect_admin() -> psycopg2.extensions.connection:
    connection = psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
    )
    connection.autocommit = True
    return connection


def _start_local_cluster() -> None:
    versions = sorted(path.name for path in Path("/etc/postgresql").glob("*")) or ["(none installed)"]
    for version in versions:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True,
            check=False,
            timeout=60,
        )


def _admin_execute(statement: sql.Composable) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE refuse to run inside one)."""
    connection = _admin_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@contextmanager
def fresh_database() -> Iterator[PostgresDatabase]:
    """A new `lottery_test_<random>` database, dropped (connections forced) on exit."""
    database = PostgresDatabase(name=f"lottery_test_{secrets.token_hex(6)}")
    _admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database.name)))
    try:
        yield database
    finally:
        _admin_execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database.name))
        )


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[PostgresDatabase]:
    """A fresh database for the session."""
    with fresh_database() as database:
        yield database


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it right after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def compose_mlflow_server(
    database: PostgresDatabase, workdir: Path, *, auth: bool, port: int | None = None
) -> Iterator[MlflowUnderTest]:
    """Start compose's `mlflow` service command on loopback, backed by `database`, files in `workdir`.

    `workdir` is also the working directory, so basic auth's sqlite user store lands there as it
    lands on the volume in compose. Only the variables `TEST_DIFFERENCES` names are set. A given
    `port` (default: a free one) lets a test restart the same server where clients expect it.
    """
    port = port or free_port()
    admin_password = secrets.token_urlsafe(16)
    values = {
        "MLFLOW_BACKEND_STORE_URI": database.sqlalchemy_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(workdir / "artifacts"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
        "S3_ACCESS_KEY": secrets.token_urlsafe(12),
        "S3_SECRET_KEY": secrets.token_urlsafe(24),
    }
    assert set(values) | {"basic-auth"} == set(TEST_DIFFERENCES), "update TEST_DIFFERENCES with its reason"
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with start_server(
        server_argv(values, auth=auth),
        server_env(values),
        url=url,
        cwd=workdir,
        log_path=workdir / "server.log",
    ) as server:
        yield MlflowUnderTest(url=server.url, admin_password=admin_password, log_path=server.log_path)


@pytest.fixture(scope="session")
def mlflow_server(postgres_db: PostgresDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI `http://127.0.0.1:<port>` of compose's MLflow server, auth off (TEST_DIFFERENCES)."""
    with compose_mlflow_server(postgres_db, tmp_path_factory.mktemp("mlflow_server"), auth=False) as server:
        yield server.url
