"""The `lottery` process exit: exit work done, exit code kept, the interpreter's teardown skipped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.process_exit import exit_code

ROOT = Path(__file__).resolve().parents[1]


def run_script(body: str) -> subprocess.CompletedProcess[str]:
    script = "from orchestrator.process_exit import run_then_exit\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(("code", "expected"), [(None, 0), (0, 0), (3, 3), ("stopped", 1)])
def test_exit_code_is_what_the_interpreter_would_use(code: object, expected: int) -> None:
    assert exit_code(code) == expected


def test_buffered_output_hooks_and_threads_all_finish_and_the_code_holds(tmp_path: Path) -> None:
    done = run_script(
        f"""
        import atexit, pathlib, sys, threading, time

        atexit.register(lambda: print("hook ran", flush=False))

        def late() -> None:
            time.sleep(0.5)
            pathlib.Path({str(tmp_path / "thread.txt")!r}).write_text("thread finished")

        def main() -> None:
            threading.Thread(target=late).start()  # not a daemon: the interpreter would wait for it
            sys.stdout.write("x" * 200_000)  # a pipe: block-buffered, unflushed when main returns
            raise SystemExit(4)

        run_then_exit(main)
        """
    )
    assert done.returncode == 4, done.stderr
    assert done.stdout == "x" * 200_000 + "hook ran\n"
    assert (tmp_path / "thread.txt").read_text() == "thread finished"


def test_an_executor_left_open_finishes_its_work_and_the_exit_does_not_hang() -> None:
    # Executors' worker threads are not daemons and end only through the interpreter's thread-exit
    # hooks: joining them by hand, without those hooks, would wait forever.
    done = run_script(
        """
        import time
        from concurrent.futures import ThreadPoolExecutor

        def main() -> None:
            pool = ThreadPoolExecutor(max_workers=1)
            pool.submit(lambda: (time.sleep(0.3), print("queued work done")))

        run_then_exit(main)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "queued work done\n"


def test_the_interpreters_teardown_is_skipped() -> None:
    # A module-level object's finalizer runs only in the interpreter's own teardown: with the prompt
    # exit it never runs, without it (the plain script) it does. The hook runs either way.
    body = """
        import atexit, sys

        class Teardown:
            def __del__(self) -> None:
                sys.stdout.write("teardown ran\\n")

        kept = Teardown()
        atexit.register(lambda: print("hook ran"))
        """
    prompt = run_script(body + "run_then_exit(lambda: print('done'))\n")
    plain = run_script(body + "print('done')\n")
    assert (prompt.returncode, plain.returncode) == (0, 0)
    assert prompt.stdout == "done\nhook ran\n"
    assert plain.stdout == "done\nhook ran\nteardown ran\n"


def test_an_unexpected_error_still_reaches_the_user_as_a_traceback() -> None:
    done = run_script("run_then_exit(lambda: 1 / 0)\n")
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr


def test_the_cli_exits_with_its_codes_through_the_prompt_exit(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(tmp_path / "nope.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: config: no such file {tmp_path / 'nope.yaml'}"]
    helped = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0
    assert "sweep" in helped.stdout and helped.stdout.endswith("\n")
