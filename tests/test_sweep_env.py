"""The driver's environment defaults (loopback Ray, no Tune loggers) yield to a caller's own value."""

from __future__ import annotations

import os

from orchestrator.run.ray_session import TUNE_LOGGERS_ENV, env_default, loopback_only, no_tune_loggers


def test_a_default_applies_for_the_duration_only_and_a_callers_value_wins(monkeypatch):
    monkeypatch.delenv("LOTTERY_TEST_ENV", raising=False)
    with env_default("LOTTERY_TEST_ENV", "1") as applied:
        assert applied and os.environ["LOTTERY_TEST_ENV"] == "1"
    assert "LOTTERY_TEST_ENV" not in os.environ
    monkeypatch.setenv("LOTTERY_TEST_ENV", "mine")
    with env_default("LOTTERY_TEST_ENV", "1") as applied:
        assert not applied and os.environ["LOTTERY_TEST_ENV"] == "mine"
    assert os.environ["LOTTERY_TEST_ENV"] == "mine"


def test_loopback_only_sets_rays_flag_and_restores_it(monkeypatch):
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with loopback_only():
        assert os.environ[name] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert name not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is True
    monkeypatch.setenv(name, "1")  # the caller asked for cluster mode: left alone
    with loopback_only():
        assert ray_constants.ENABLE_RAY_CLUSTER is True


def test_tune_loggers_are_off_inside_a_fit_only(monkeypatch):
    monkeypatch.delenv(TUNE_LOGGERS_ENV, raising=False)
    with no_tune_loggers():
        assert os.environ[TUNE_LOGGERS_ENV] == "1"
    assert TUNE_LOGGERS_ENV not in os.environ
