"""Soak a running ``lmdm serve`` with one session: stream for --seconds while sampling the server's memory
(resident set of the Serve replica and proxy processes, this machine only) and its /v1/stats, switching prompts
every --change-every seconds to measure control latency. Prints the figures and writes JSON and a plot.

    lmdm serve &                                      # the quickstart's model on 127.0.0.1:8000
    python tools/serve_soak.py --seconds 600 --out runs/serve-soak

The memory target: flat within ±5% over the stream, measured from the first sample after the first minute
(allocator warm-up: the first blocks, prompt caches) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from lmdm.serve.listen import listen, parse_prompt


def serve_processes() -> dict[str, psutil.Process]:
    """This machine's Serve replica and proxy processes, by role."""
    found: dict[str, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "ServeReplica:" in line:
            found[f"replica {process.pid}"] = process
        elif "ProxyActor" in line:
            found[f"proxy {process.pid}"] = process
    return found


async def soak(url: str, seconds: float, change_every: float, interval: float, token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    http = url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/v1/", 1)[0]
    processes = serve_processes()
    if not any(k.startswith("replica") for k in processes):
        raise SystemExit("no Serve replica process on this machine: start `lmdm serve` here first")
    samples: list[dict[str, Any]] = []
    begin = time.monotonic()

    async def sample() -> None:
        async with httpx.AsyncClient() as client:
            while True:
                stats = (await client.get(f"{http}/v1/stats", headers=headers, timeout=30)).json()
                rss = {name: p.memory_info().rss for name, p in processes.items() if p.is_running()}
                samples.append(
                    {
                        "t": time.monotonic() - begin,
                        "rss": rss,
                        "total_rss": sum(rss.values()),
                        "underruns": stats["underruns"],
                        "blocks": stats["blocks"],
                    }
                )
                await asyncio.sleep(interval)

    sampler = asyncio.create_task(sample())
    try:
        result = await listen(
            url=url, prompts=[parse_prompt("Bach chorale, for organ, moderato")], seconds=seconds, out=None, seed=0, token=token,
            change_to=[parse_prompt("Monteverdi madrigal, for strings, allegro")], change_every=change_every,
        )  # fmt: skip
    finally:
        sampler.cancel()
    settled = [s["total_rss"] for s in samples if s["t"] >= 60.0] or [s["total_rss"] for s in samples]
    base = settled[0]
    return {
        "listen": result.summary(),
        "server_underruns": samples[-1]["underruns"] if samples else None,
        "memory": {
            "processes": sorted(processes),
            "first_mib": round(samples[0]["total_rss"] / 2**20, 1),
            "after_1_min_mib": round(base / 2**20, 1),
            "end_mib": round(settled[-1] / 2**20, 1),
            "min_mib": round(min(settled) / 2**20, 1),
            "max_mib": round(max(settled) / 2**20, 1),
            "max_deviation_pct": round(100 * max(abs(v - base) for v in settled) / base, 2),
        },
        "samples": samples,
    }


def plot(found: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in found["samples"]]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(t, [s["total_rss"] / 2**20 for s in found["samples"]], label="replica + proxy resident memory")
    base = found["memory"]["after_1_min_mib"]
    ax.axhspan(base * 0.95, base * 1.05, color="tab:green", alpha=0.12, label="±5% of the 1-minute value")
    ax.set_xlabel("minutes streaming")
    ax.set_ylabel("MiB")
    lat = found["listen"]["control_latency_s"]
    ax.set_title(
        f"one session, {found['listen']['seconds']:.0f} s: {found['listen']['underruns']} underruns, "
        f"control latency mean {lat['mean']} s", fontsize=10,
    )  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--change-every", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=Path("runs/serve-soak"))
    parser.add_argument("--token", default=os.environ.get("LMDM_SERVE_TOKEN"))
    args = parser.parse_args()
    found = asyncio.run(soak(args.url, args.seconds, args.change_every, args.interval, args.token))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(found, indent=2))
    plot(found, args.out / "soak.png")
    print(json.dumps({k: v for k, v in found.items() if k != "samples"}, indent=2))
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")


if __name__ == "__main__":
    main()
