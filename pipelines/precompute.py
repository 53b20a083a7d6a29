"""``lmdm precompute``: audio → latent shards with Ray Data.

read inputs → decode/resample/chunk in parallel Ray tasks → encode on an actor pool (one autoencoder
copy per actor) → Parquet shards of latents (posterior mean and std) with captions and sketch curves
at the latent rate, a caption-keyed table of text-encoder embeddings (one row per unique caption),
and ``manifest.json``.

Resumable and idempotent: inputs are grouped into shards of ``precompute.shard_inputs`` by their
position; a shard is written to a temporary file and renamed, then marked done by its sidecar JSON,
so a re-run computes only missing shards (no duplicate or missing rows). ``request.json`` records
what was asked (config, autoencoder and text-encoder hashes); a different request against the same
folder is an error, never a silent mix.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmdm.config import Config

__all__ = ["PrecomputeMismatchError", "PrecomputeSummary", "chunk_dataset", "run_precompute"]

FORMAT = 2  # 2: the corpus' held-out clips are never encoded (lmdm.data.split)


class PrecomputeMismatchError(RuntimeError):
    """The output folder holds latents made from a different request."""


@dataclass(frozen=True)
class PrecomputeSummary:
    out: Path
    inputs: int
    chunks: int
    skipped: list[dict[str, str]]
    shards_written: int
    shards_reused: int
    seconds: float


def _decode_batch(
    batch: dict[str, np.ndarray], *, sample_rate: int, channels: int, ratio: int, chunk_frames: int, frame_rate: int
) -> dict[str, Any]:
    """Ray task: records (JSON) → chunk rows; an unusable input becomes one row with its ``error``."""
    import torch

    from lmdm.data.chunks import InputRecord, chunk_input

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    size = chunk_frames * ratio
    for text in batch["record"]:
        record = InputRecord(**json.loads(str(text)))
        chunks, error = chunk_input(record, sample_rate, channels, ratio, chunk_frames, frame_rate)
        if error is not None:
            rows.append({"input_index": record.index, "input_id": record.input_id, "chunk": -1, "caption": record.caption, "error": error})
        for c in chunks:
            rows.append({**c, "error": ""})
    zeros = np.zeros((channels, size), dtype=np.float32)
    empty = np.zeros(chunk_frames, dtype=np.float32)
    return {
        "input_index": np.array([r["input_index"] for r in rows], dtype=np.int64),
        "input_id": np.array([r["input_id"] for r in rows], dtype=object),
        "chunk": np.array([r["chunk"] for r in rows], dtype=np.int64),
        "caption": np.array([r["caption"] for r in rows], dtype=object),
        "error": np.array([r["error"] for r in rows], dtype=object),
        "audio": np.stack([r.get("audio", zeros) for r in rows]),
        **{k: np.stack([r.get(k, empty) for r in rows]) for k in ("f0_hz", "loudness_db", "brightness_hz")},
    }


def chunk_dataset(cfg: Config, records: list[Any], ratio: int, chunk_frames: int) -> Any:
    """A Ray Dataset of the inputs' audio chunks (decode, resample and cut in parallel tasks); an
    unusable input becomes one row with its ``error`` (so nothing is dropped silently)."""
    import ray.data

    items = [{"record": json.dumps(dataclasses.asdict(r))} for r in records]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
    return ds.map_batches(
        _decode_batch,
        batch_size=1,
        num_cpus=0.5,
        fn_kwargs={
            "sample_rate": cfg.audio.sample_rate,
            "channels": cfg.audio.channels,
            "ratio": ratio,
            "chunk_frames": chunk_frames,
            "frame_rate": cfg.data.frame_rate,
        },
    )


class _Encoder:
    """Ray actor: one autoencoder copy; audio chunks → posterior mean and std."""

    def __init__(self, autoencoder: str, torch_threads: int) -> None:
        import torch

        from lmdm.checkpoints.format import load_checkpoint

        torch.set_num_threads(torch_threads)
        self.vae, _ = load_checkpoint(autoencoder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        audio = torch.from_numpy(np.ascontiguousarray(batch.pop("audio")))
        with torch.inference_mode():
            posterior = self.vae.encode(audio)  # type: ignore[operator]
        batch["latent_mean"] = posterior.mean.numpy().astype(np.float32)
        batch["latent_std"] = posterior.std.numpy().astype(np.float32)
        return batch


def _shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    return out / f"shard_{shard:05d}.parquet", out / f"shard_{shard:05d}.json"


def _write_shard(out: Path, shard: int, rows: list[dict[str, Any]], skipped: list[dict[str, str]], inputs: int) -> int:
    parquet, marker = _shard_paths(out, shard)
    if rows:
        D, T = rows[0]["latent_mean"].shape
        table = pa.table(
            {
                "input_index": pa.array([r["input_index"] for r in rows], pa.int64()),
                "input_id": pa.array([r["input_id"] for r in rows], pa.string()),
                "chunk": pa.array([r["chunk"] for r in rows], pa.int32()),
                "caption": pa.array([r["caption"] for r in rows], pa.string()),
                "latent_channels": pa.array([D] * len(rows), pa.int32()),
                "latent_frames": pa.array([T] * len(rows), pa.int32()),
                **{
                    k: pa.array([np.asarray(r[k], dtype=np.float32).ravel() for r in rows], pa.list_(pa.float32()))
                    for k in ("latent_mean", "latent_std", "f0_hz", "loudness_db", "brightness_hz")
                },
            }
        )
        tmp = parquet.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(parquet)
    marker.write_text(json.dumps({"shard": shard, "inputs": inputs, "chunks": len(rows), "skipped": skipped}))
    return len(rows)


def _request(cfg: Config, autoencoder: Path, text_fingerprint: str) -> dict[str, Any]:
    from lmdm.checkpoints.format import file_sha256

    data = cfg.data.model_dump(mode="json", include={"source", "path", "captions", "root", "frame_rate"})
    return {
        "format": FORMAT,
        "data": data,
        "audio": cfg.audio.model_dump(mode="json"),
        "chunk_frames": cfg.precompute.chunk_frames,
        "shard_inputs": cfg.precompute.shard_inputs,
        "autoencoder_sha256": file_sha256(autoencoder / "model.safetensors"),
        "text_encoder": {"kind": cfg.text.encoder, "max_tokens": cfg.text.max_tokens, "fingerprint": text_fingerprint},
        **({"max_inputs": cfg.precompute.max_inputs} if cfg.precompute.max_inputs is not None else {}),  # older folders stay valid
    }


def run_precompute(
    cfg: Config,
    autoencoder: Path,
    stop_after_shards: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrecomputeSummary:
    """Precompute latents for ``cfg.data`` with the autoencoder checkpoint ``autoencoder`` into ``cfg.precompute.out``.

    Args:
        stop_after_shards: stop after writing this many new shards (simulates an interruption).
        progress: ``progress(inputs_done, inputs_total)``.

    Raises:
        PrecomputeMismatchError: the folder holds latents from a different request.
        CheckpointError: the autoencoder checkpoint is missing or invalid.
    """
    import ray

    from lmdm.checkpoints.format import load_checkpoint
    from lmdm.data.chunks import list_inputs
    from lmdm.models.autoencoder import OobleckVAE
    from lmdm.text.encoders import build_text_encoder

    started = time.perf_counter()
    autoencoder = Path(autoencoder)
    vae, _ = load_checkpoint(autoencoder, kind="autoencoder")
    assert isinstance(vae, OobleckVAE)
    text_encoder = build_text_encoder(cfg)
    out = Path(cfg.precompute.out)
    out.mkdir(parents=True, exist_ok=True)
    request = _request(cfg, autoencoder, text_encoder.fingerprint())
    request_path = out / "request.json"
    if request_path.is_file():
        previous = json.loads(request_path.read_text())
        if previous != request:
            differs = sorted(k for k in set(previous) | set(request) if previous.get(k) != request.get(k))
            raise PrecomputeMismatchError(
                f"{out} holds latents made from a different request (differs in: {', '.join(differs)}); "
                "choose another precompute.out or delete the folder"
            )
    else:
        request_path.write_text(json.dumps(request, indent=2))

    source_path = cfg.data.root if cfg.data.source == "corpus" else cfg.data.path
    assert source_path is not None
    records = list_inputs(cfg.data.source, source_path, cfg.data.captions, split="train")[: cfg.precompute.max_inputs]
    held_out = [r.input_id for r in list_inputs(cfg.data.source, source_path, cfg.data.captions, split="held_out")]
    S = cfg.precompute.shard_inputs
    shards = (len(records) + S - 1) // S
    done = {k for k in range(shards) if _shard_paths(out, k)[1].is_file()}
    todo = [r for r in records if r.index // S not in done]
    inputs_done = len(records) - len(todo)
    if progress:
        progress(inputs_done, len(records))
    written = 0
    if todo:
        from lmdm.pipelines.ray_session import ensure_ray

        ensure_ray(cfg)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows arrive in input order: a shard is complete when the next begins
        # Ray Data's own progress bars (per operator) on a terminal; elsewhere (CI, a log file) it would log
        # every operator's full metrics instead, so none there.
        ctx.enable_progress_bars = ctx.enable_rich_progress_bars = sys.stdout.isatty()
        ctx.use_ray_tqdm = False  # Ray Data's rich bars: its tqdm ones stay blank with the driver's logs off the terminal
        ds = chunk_dataset(cfg, todo, vae.downsampling_ratio, cfg.precompute.chunk_frames)
        ds = ds.map_batches(
            _Encoder,
            fn_constructor_kwargs={"autoencoder": str(autoencoder.resolve()), "torch_threads": cfg.precompute.torch_threads},
            compute=ray.data.ActorPoolStrategy(size=cfg.precompute.actors),
            batch_size=cfg.precompute.batch_size,
            num_cpus=cfg.precompute.cpus_per_actor,
        )
        current, rows, skipped, seen = -1, [], [], set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["input_index"])):
                index = int(batch["input_index"][i])
                shard = index // S
                if shard != current:
                    if current >= 0:
                        _write_shard(out, current, rows, skipped, len(seen))
                        written += 1
                        if stop_after_shards is not None and written >= stop_after_shards:
                            return _summary(out, records, written, len(done), started)
                    current, rows, skipped, seen = shard, [], [], set()
                if index not in seen:
                    seen.add(index)
                    inputs_done += 1
                    if progress:
                        progress(inputs_done, len(records))
                error = str(batch["error"][i])
                if error:
                    skipped.append({"input_id": str(batch["input_id"][i]), "reason": error})
                else:
                    rows.append({k: batch[k][i] for k in batch if k != "error"})
        if current >= 0:
            _write_shard(out, current, rows, skipped, len(seen))
            written += 1
    _write_text_table(out, records, text_encoder)
    summary = _summary(out, records, written, len(done), started)
    manifest = {
        **request,
        "counts": {"inputs": summary.inputs, "chunks": summary.chunks, "skipped": len(summary.skipped), "shards": shards},
        "latent": {
            "channels": vae.latent_dim,
            "frames": cfg.precompute.chunk_frames,
            "rate": cfg.audio.sample_rate / vae.downsampling_ratio,
        },
        "skipped": summary.skipped,
        "held_out": held_out,  # the reference, never encoded here (lmdm.data.split)
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return summary


def _summary(out: Path, records: list[Any], written: int, reused: int, started: float) -> PrecomputeSummary:
    chunks, skipped = 0, []
    for marker in sorted(out.glob("shard_*.json")):
        info = json.loads(marker.read_text())
        chunks += info["chunks"]
        skipped += info["skipped"]
    return PrecomputeSummary(out, len(records), chunks, skipped, written, reused, time.perf_counter() - started)


def _write_text_table(out: Path, records: list[Any], encoder: Any) -> None:
    """One row per unique caption: token embeddings ``(L·D)`` and mask ``(L)``."""
    captions = sorted({r.caption for r in records} | {""})
    tokens, masks = [], []
    for i in range(0, len(captions), 32):
        enc = encoder.encode(captions[i : i + 32])
        tokens += [t.numpy().ravel() for t in enc.tokens]
        masks += [m.numpy() for m in enc.mask]
    table = pa.table(
        {
            "caption": pa.array(captions, pa.string()),
            "tokens": pa.array(tokens, pa.list_(pa.float32())),
            "mask": pa.array(masks, pa.list_(pa.bool_())),
            "dim": pa.array([encoder.dim] * len(captions), pa.int32()),
        }
    )
    tmp = out / "text_embeddings.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out / "text_embeddings.parquet")
