"""The driver's Ray session: local or a cluster, its environment, and SIGTERM as Ctrl-C.

The embedded local cluster is secure by default: Ray 2.60's token auth stays on (ray.init
generates a token into ~/.ray/auth_token unless RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH name one;
every GCS, raylet and worker RPC must carry it) and every Ray port listens on loopback only.
Ray binds its servers to all interfaces unless the node's IP is literally 127.0.0.1, and on Linux
it resolves 127.0.0.1 to the machine's routable IP unless its single-machine mode is on
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows), so the embedded cluster
sets that. A cluster (--address, the spec's ray_address, $RAY_ADDRESS) keeps the caller's auth
environment: RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN.

Environment, set here before Ray starts (all `setdefault`, so the caller can override):
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  embedded cluster only: node IP 127.0.0.1, loopback ports
  RAY_USAGE_STATS_ENABLED=0     no usage reporting
  TUNE_GLOBAL_CHECKPOINT_S=auto Tune's own period for saving its experiment state (>= 10 s,
                                at most 5 % of the driver's time). Not on every controller step: that
                                serialised every trial's state and copied it to storage back to back
                                (about half a core on a 130-unit sweep, growing with the trial
                                count). A state a killed driver left behind is then up to one
                                period old, which costs nothing: a unit whose trial directories are
                                finished reports from them without training, an unfinished one
                                resumes from its own checkpoint, and MLflow logging is by trial key.
  TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0  no warning about forced snapshots
  RAY_AIR_NEW_OUTPUT=0          the legacy reporter honours verbose=0; the new one prints a banner
  TUNE_PRINT_ALL_TRIAL_ERRORS=0 one line per trial error (tracebacks stay in the trial's error.txt)
  RAY_CHDIR_TO_TRIAL_DIR=0      trials keep the driver's working directory (relative data paths)
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from orchestrator.spec import SweepPlan

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # trials pass only the plan and small metrics through it
DRIVER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_GLOBAL_CHECKPOINT_S": "auto",  # the trial directories are the record: see the module docstring
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # the new output engine prints its banner even at verbose=0
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # one line per error from ProgressCallback instead
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}
# The embedded cluster only (see the module docstring): node IP 127.0.0.1, so Ray binds loopback.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TUNE_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # "1": Tune adds no logger callbacks


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (`timeout`, a scheduler, `kill`) stops the sweep as Ctrl-C does: Tune saves its state and
    returns, the parent run is marked KILLED and the resume command printed; no C++ stack dump."""
    previous = signal.getsignal(signal.SIGTERM)
    _sigterm_as_ctrl_c()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_as_ctrl_c() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Whatever Ctrl-C does now: Tune's handler while it runs (a graceful stop), else KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def cluster_address(plan: SweepPlan, address: str | None) -> str | None:
    """The Ray cluster to run on: --address, then the spec, then $RAY_ADDRESS; None for a local Ray."""
    return address or plan.spec.ray_address or os.environ.get("RAY_ADDRESS")


@contextlib.contextmanager
def ray_session(address: str | None, runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Use a running Ray if this process has one; else connect to `address` (with `runtime_env`: the
    user's code shipped to its workers, orchestrator/run/user_code.py); else start a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        if address:
            ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
        else:
            stack.enter_context(loopback_only())
            stack.enter_context(ray_processes_in_own_sessions())
            ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                logging_level="WARNING",
                log_to_driver=False,
            )
        try:
            yield
        finally:
            # Tune's objects die in reference cycles; collected after the shutdown (by a GC that may
            # run in any thread, such as the tracking thread that closes the parent run meanwhile),
            # an ObjectRef reaching the stopped core worker makes Ray exit the process with code 1
            # ("The core worker has already been shutdown") before the sweep's last line is written.
            gc.collect()
            ray.shutdown()


@contextlib.contextmanager
def ray_processes_in_own_sessions() -> Iterator[None]:
    """The processes a local ray.init starts (GCS, raylet, log monitor) each lead a session of their
    own, as the logging process does (tracking/log_process.py); the raylet's workers and agents
    share the raylet's.

    A scheduler stops a job by signalling its whole process group (`timeout`, Kubernetes, a shell's
    `kill -- -PGID`). Ray blocks SIGINT in its processes, so Ctrl-C reaches the driver alone, but
    SIGTERM killed the GCS and raylet under a driver that was still saving Tune's state: it hung
    60 s waiting for them, left the parent run RUNNING and finished trials unlogged. In sessions
    of their own they receive only what the driver sends them (ray.shutdown), and they still die
    with the driver: on Linux Ray starts each with the kernel's parent-death signal, and the
    raylet's workers and agents exit once they see it gone. Without that signal (Ray then cleans
    up through a reaper that needs its processes in the driver's group) nothing is changed. Ray
    offers no setting for it, so its Popen is wrapped while ray.init runs.
    """
    from ray._private import services
    from ray._private.utils import detect_fate_sharing_support

    if not (sys.platform.startswith("linux") and detect_fate_sharing_support()):
        yield
        return
    popen = services.ConsolePopen

    class OwnSessionPopen(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextlib.contextmanager
def env_default(name: str, value: str) -> Iterator[bool]:
    """`name=value` in the environment for the duration, unless the caller set `name` (theirs wins).

    Yields whether the default was applied; the variable is removed again afterwards.
    """
    applied = name not in os.environ
    if applied:
        os.environ[name] = value
    try:
        yield applied
    finally:
        if applied:
            os.environ.pop(name, None)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode for a local ray.init: node IP 127.0.0.1, so every port binds loopback.

    The environment variable reaches the processes Ray starts; this process read it when it first
    imported Ray, so its copy of the constant is set too (and both are restored afterwards). A value
    the caller set explicitly wins.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    with env_default(name, LOCAL_RAY_ENV[name]) as applied:
        if applied:
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def no_tune_loggers() -> contextlib.AbstractContextManager[bool]:
    """Without Tune's default JSON, CSV and TensorBoard loggers for the duration of a fit.

    They write every reported result of every trial a second time (the trial directory holds
    the record), on the driver's event loop: per trial, work that delays the next trial's start.
    A value the caller set explicitly wins.
    """
    return env_default(TUNE_LOGGERS_ENV, "1")
