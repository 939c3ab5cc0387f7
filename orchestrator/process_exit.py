"""How the `lottery` process ends: everything it registered to run at exit runs, then it leaves at once.

A command that trained, ran a sweep or read runs has torch, Ray, MLflow, pandas and matplotlib
loaded, and the interpreter's own teardown (tearing every module down, running finalizers of
objects nobody uses any more) then takes 1-2 s after the command has printed its last line:
a second of waiting on every command, and most of a small sweep's tail (bench/cli_exit.py
measures both ways). What the command's libraries want done at exit is done first, in order:
non-daemon threads are waited for, then every atexit hook (Ray's shutdown, logging's flush,
weakref finalizers such as temporary directories), then stdout and stderr are flushed; only
the interpreter's teardown of its own memory is skipped. The operating system frees that.

Only the console entry point and `python -m orchestrator` end this way; code that calls the
Typer app in-process (tests, notebooks) keeps its interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def exit_code(code: object) -> int:
    """What the interpreter would exit with for `SystemExit(code)`: None is 0, text is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_then_exit(main: Callable[[], object]) -> NoReturn:
    """Run `main` and end the process with its exit code once the exit work is done (module docstring).

    An exception other than SystemExit propagates: the interpreter prints it and exits as usual.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exit_code(exc.code)
    threading._shutdown()  # what the interpreter does first: executors' exit hooks, then non-daemon joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing reaches it
            stream.flush()
    os._exit(code)
