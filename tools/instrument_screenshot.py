"""The README's picture of the browser instrument: open a running ``lmdm serve``'s page in headless Chromium,
start a stream, move the second prompt's slider mid-stream, and take a screenshot once the change is heard.

    lmdm serve &
    python tools/instrument_screenshot.py --url http://127.0.0.1:8000/ --out docs/instrument.png
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from lmdm.eval.browser import open_page


async def shoot(url: str, out: Path, seconds: float) -> None:
    async with open_page() as page:
        await page.goto(url)
        await page.evaluate("document.getElementById('start').click()")
        await asyncio.sleep(seconds)
        await page.evaluate(
            """(() => { const rows = document.querySelectorAll('#prompts .prompt');
               rows[1].children[1].value = 0.6; rows[1].children[1].dispatchEvent(new Event('input')); return true; })()"""
        )
        begin = time.monotonic()
        while not await page.evaluate("lmdm.state.latencies.length > 0") and time.monotonic() - begin < 30:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        await page.screenshot(out, width=900, height=830)
        print(
            await page.evaluate(
                "JSON.stringify({blocks: lmdm.state.blocks, gaps: lmdm.state.gaps, underruns: lmdm.state.underruns, latencies: lmdm.state.latencies})"
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--out", type=Path, default=Path("docs/instrument.png"))
    parser.add_argument("--seconds", type=float, default=8.0, help="stream this long before the prompt change")
    args = parser.parse_args()
    asyncio.run(shoot(args.url, args.out, args.seconds))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
