"""Headless Chromium driven over the DevTools protocol, stdlib only: open a page, run JavaScript in
it, wait for a condition, click. For tests that follow a researcher's clicks through a web UI (a
`--dump-dom` snapshot cannot click).

Chromium speaks the protocol over a pipe (`--remote-debugging-pipe`: it reads commands from fd 3
and writes answers to fd 4, each message JSON ended by a NUL byte), so no port is opened and no
websocket library is needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from server import stop_process_group

# How every test starts Chromium (one list): headless, no sandbox (root), no network of its own.
HEADLESS_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
FLAGS = [*HEADLESS_FLAGS, "--remote-debugging-pipe"]


class Navigated(AssertionError):
    """The page went elsewhere while an expression ran in it (a redirect): ask again."""


class Browser:
    """One Chromium with one page; `with Browser(profile) as page: page.open(url) ...`."""

    def __init__(self, profile: Path, window: str = "1600,900") -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "Chromium is not installed: apt-get install -y chromium"
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def fds() -> None:  # in the child: the protocol's fds 3 and 4 (moved out of the way first)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=False,
            preexec_fn=fds,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._id = 0
        targets = self._call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self._session = self._call("Target.attachToTarget", targetId=page["targetId"], flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._write)
        os.close(self._read)
        stop_process_group(self._process, grace_s=5.0)

    def _call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                assert chunk, f"Chromium closed its pipe during {method}"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                error = answer.get("error", {}).get("message", "")
                if "navigated" in error or "context" in error:
                    raise Navigated(f"{method}: {error}")
                assert not error, f"{method}: {answer['error']}"
                return answer["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self._call(method, self._session, **params)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout_s: float = 60.0) -> Any:
        """Poll until the expression is truthy; its value (true for an object, e.g. an element)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.js(
                    f"(() => {{ try {{ const v = ({expression});"
                    " return v && typeof v === 'object' ? true : v; } catch (e) { return null; } })()"
                )
            except Navigated:
                value = None
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"not within {timeout_s:.0f} s: {expression}\npage: {self.text()[:2000]}")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
