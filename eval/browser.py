"""Headless Chromium over the DevTools protocol (CDP), with the ``websockets`` dependency: open a page, run a
check in it, take a screenshot. The report test uses it to prove ``report.html`` renders (images decoded,
audio with a duration); ``tools/mlflow_screenshot.py`` uses it for the README's MLflow picture.

The browser is the system's (``chromium``, Debian's package; or ``$LMDM_CHROMIUM``), started with
``--headless --no-sandbox`` and a throwaway profile, on a DevTools port it picks itself (read back from
``DevToolsActivePort``), loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

__all__ = ["BrowserError", "Page", "find_chromium", "open_page"]

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """No browser, or the browser did not answer as expected."""


def find_chromium() -> str | None:
    """The browser to drive: ``$LMDM_CHROMIUM``, else the first of chromium / chromium-browser / google-chrome on PATH."""
    explicit = os.environ.get("LMDM_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((found for name in _NAMES if (found := shutil.which(name))), None)


class Page:
    """One page target of the browser, driven by CDP commands."""

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send a CDP command and wait for its answer (events that arrive meanwhile are kept in ``events``)."""
        ident = next(self._ids)
        await self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {timeout:g} s")
            message = json.loads(await self._recv(left, method))
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    async def _recv(self, timeout: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(self._socket.recv(), max(timeout, 0.0))
        except TimeoutError:
            raise BrowserError(f"{what}: no answer from the browser within the time allowed") from None

    async def goto(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait for the load event."""
        await self.send("Page.enable")
        self.events.clear()
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading within {timeout:g} s")
            self.events.append(json.loads(await self._recv(deadline - time.monotonic(), f"loading {url}")))

    async def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """The value of a JavaScript expression (a promise is awaited), as JSON."""
        answer = await self.send("Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"the page's script failed: {answer['exceptionDetails'].get('exception', answer['exceptionDetails'])}")
        return answer["result"].get("value")

    async def screenshot(self, path: Path, width: int = 1600, height: int = 1000) -> Path:
        """A PNG of the viewport at ``width`` × ``height``."""
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        data = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@asynccontextmanager
async def open_page(browser: str | None = None, start_timeout: float = 30.0) -> AsyncIterator[Page]:
    """Start headless Chromium and yield a blank :class:`Page`; the browser and its profile go at exit.

    Raises:
        BrowserError: no browser found, or it did not open its DevTools port in time.
    """
    import websockets

    binary = browser or find_chromium()
    if binary is None:
        raise BrowserError(f"no Chromium found (looked for {', '.join(_NAMES)} on PATH and $LMDM_CHROMIUM)")
    profile = Path(tempfile.mkdtemp(prefix="lmdm-chromium-"))
    log = (profile / "chromium.log").open("wb")  # a file, not a pipe nobody reads: a full pipe would stall the browser
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--mute-audio",
            "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if process.poll() is not None:
                raise BrowserError(
                    f"{binary} exited with {process.returncode}: {(process.stderr.read() if process.stderr else b'').decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise BrowserError(f"{binary} opened no DevTools port within {start_timeout:g} s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        async with websockets.connect(f"ws://127.0.0.1:{port}{port_file.read_text().splitlines()[1]}", max_size=None) as root:
            browser_page = Page(root)
            target = await browser_page.send("Target.createTarget", url="about:blank")
            targets = await browser_page.send("Target.getTargets")
            if not any(t["targetId"] == target["targetId"] for t in targets["targetInfos"]):
                raise BrowserError(f"{binary} did not list the page it opened")
        async with websockets.connect(f"ws://127.0.0.1:{port}/devtools/page/{target['targetId']}", max_size=None) as socket:
            yield Page(socket)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
