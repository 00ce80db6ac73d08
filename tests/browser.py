"""Headless Chromium driven over the DevTools protocol, for the report's browser test.

The protocol runs over two pipes (``--remote-debugging-pipe``: the browser reads commands
from fd 3 and writes replies and events to fd 4, each a JSON text ended by a NUL byte), so
no WebSocket client, port or extra package is needed. :func:`find_or_install_chromium`
finds Debian's ``chromium`` or installs it with apt-get (as root), else returns why not.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe")
BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _found() -> str | None:
    return next((path for path in map(shutil.which, BINARIES) if path), None)


def find_or_install_chromium(timeout: float = 900) -> tuple[str | None, str]:
    """(path to the browser, '') or (None, why it could not be found or installed)."""
    found = _found()
    if found:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, "chromium is not installed and apt-get is not available to install it"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return None, "chromium is not installed and installing it with apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for step in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                 ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"'{' '.join(step)}' failed: {exc}"
        log.append(f"{' '.join(step)} -> {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        if step[1] == "install" and done.returncode == 0 and _found():
            return _found(), ""
    return None, "apt-get could not install chromium: " + "; ".join(log)


class Browser:
    """One headless Chromium with one page, spoken to over the DevTools protocol pipes."""

    def __init__(self, binary: str, *, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="rankshrink-chromium-")
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def child_fds():  # the browser's fd 3 reads our commands, its fd 4 writes its replies
            high_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_write = fcntl.fcntl(replies_write, fcntl.F_DUPFD, 10)
            os.dup2(high_read, 3)  # dup2 leaves close-on-exec off: these two survive exec, nothing else does
            os.dup2(high_write, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"], preexec_fn=child_fds,
            close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(commands_read)
        os.close(replies_write)
        self.events: list[dict[str, Any]] = []
        self._inbox: queue.Queue = queue.Queue()
        self._next_id = 0
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._replies, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                while b"\0" in buffer:
                    message, buffer = buffer.split(b"\0", 1)
                    self._inbox.put(json.loads(message))

    def _pump(self, until) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                tail = b"".join(self._stderr)[-2000:].decode(errors="replace")
                raise TimeoutError(f"no answer from chromium in {self.timeout} s; its stderr ends: {tail}")
            try:
                message = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if "method" in message:
                self.events.append(message)
            if until(message):
                return message

    def send(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        reply = self._pump(lambda m, wanted=self._next_id: m.get("id") == wanted)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, path: Path, *, width: int, height: int, mobile: bool = False) -> None:
        """Load ``path`` at a ``width``×``height`` viewport and wait for its load event."""
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)
        already = len(self.events)
        self.send("Page.navigate", session=True, url=Path(path).resolve().as_uri())
        if not any(e["method"] == "Page.loadEventFired" for e in self.events[already:]):
            self._pump(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        """PNG of the whole page (or of ``clip`` in page coordinates)."""
        if clip is None:
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"]}
        data = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                         clip={**clip, "scale": 1})["data"]
        return base64.b64decode(data)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and requests that left the file."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url')})")
            elif method == "Network.requestWillBeSent":
                url = params.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "about:")):
                    found.append(f"network request: {url}")
        return found

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
