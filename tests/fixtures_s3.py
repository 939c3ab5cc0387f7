"""The session's S3 server (tests/s3server.py: compose's SeaweedFS command on loopback) with one bucket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from s3server import S3Server, s3_server

BUCKET = "lottery"


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3 server with the bucket `lottery`; its client settings are `s3_store.env`."""
    with s3_server(tmp_path_factory.mktemp("s3") / "weed") as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3_store: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """This process talks to the session's S3 server through the usual AWS_* variables."""
    from orchestrator import storage

    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    storage._filesystem.cache_clear()  # filesystems are cached per bucket: none from other settings
    yield s3_store
    storage._filesystem.cache_clear()
