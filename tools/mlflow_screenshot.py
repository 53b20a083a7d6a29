"""The README's picture of the MLflow UI: an eval's engine runs as comparison charts, taken in headless Chromium.

Starts `mlflow ui` on this checkout's store (loopback, a free port), opens the link `lmdm eval` printed (its
eval.json's ``mlflow_link``), checks that the page is the runs' chart view with the eval's metrics on it (not the
GenAI overview the pinned MLflow opens by default), and writes the screenshot.

Run:  .venv/bin/python tools/mlflow_screenshot.py runs/quickstart/eval/eval.json docs/mlflow-eval-charts.png
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lmdm.eval.browser import open_page

# Wait for the charts to draw (their lines are SVG paths once the metric histories arrive), close the assistant side
# panel where this MLflow opens one, give the charts a moment to take the room, and return the page's text.
_SETTLE = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (let i = 0; i < 60 && document.querySelectorAll('.js-plotly-plot .scatterlayer path, .js-plotly-plot .trace path').length < 2; i++) await sleep(500);
  const panel = [...document.querySelectorAll('*')].find(e => e.children.length === 0 && e.textContent.trim() === 'MLflow Assistant');
  const close = panel && [...panel.closest('div').parentElement.querySelectorAll('button')].pop();
  const labelled = [...document.querySelectorAll('button')].find(b => /close/i.test(b.getAttribute('aria-label') || ''));
  (labelled || close)?.click();
  await sleep(4000);
  return document.body.innerText;
})()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _shoot(url: str, out: Path) -> str:
    async with open_page() as page:
        await page.send("Emulation.setDeviceMetricsOverride", width=1600, height=1100, deviceScaleFactor=1, mobile=False)
        await page.goto(url)
        text: str = await page.evaluate(_SETTLE, timeout=90)
        await page.screenshot(out, 1600, 1100)
        return text


def main(eval_json: Path, out: Path, store: str = "sqlite:///runs/mlflow.db") -> None:
    link = json.loads(eval_json.read_text())["mlflow_link"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"mlflow ui did not answer on {base}/health within a minute")
        url = link.replace("http://127.0.0.1:5000", base)
        text = asyncio.run(_shoot(url, out))
        for expected in ("by_window", "eval/lmdm", "eval/outpainting"):
            if expected not in text:
                raise SystemExit(f"the page at {url} does not show {expected!r}: not the eval's charts?\n{text[:2000]}")
        print(f"{out}: {url}")
    finally:
        server.terminate()
        server.wait(20)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
