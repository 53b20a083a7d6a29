"""Our small-row float32 linear kernel for x86-64 CPUs (``cpu_gemm.c``), compiled on first use.

At the 49-token passes of an LMDM denoising step a linear layer does little arithmetic per weight it
reads, and every pass reads every weight from memory. oneDNN's kernels leave that weight stream to the
hardware prefetcher: a 49-row 512→2048 linear took 1283 µs with its weights streamed from memory against
805 µs with them in cache (the 2-core dev machine). ``cpu_gemm.c`` prefetches each 16-column weight
panel while it computes the previous one, so the stream overlaps the arithmetic (the bench's
``machine.weight_streaming`` figures show both kernels' cold/warm times).

The C source is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``; about a second) into
``$LMDM_KERNEL_CACHE`` (default ``~/.cache/lmdm/kernels``), once per source and compiler, and loaded with
:mod:`ctypes`. Its OpenMP loops need ``libgomp.so.1``, which the loader resolves to the one a GNU-OpenMP
torch build (the x86 wheels) has already loaded, so both share one thread pool. Where it cannot be
built (no compiler, no AVX2/FMA, not x86-64, or ``LMDM_CPU_KERNEL=onednn``), :func:`available` is false
and packed linears use oneDNN (:mod:`lmdm.models.packed`).

Weight layout (``panels``): ``(N/16, K, 16)``, panel ``p`` holding output columns ``16p … 16p+15``
transposed; a GLU weight ``(2H, K)`` stores value panel ``q`` and gate panel ``q`` together,
``(H/16, 2, K, 16)``.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_IN_FEATURES", "available", "glu", "linear", "pack", "rotary_qk", "status"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemm.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
PANEL = 16  # output columns per panel: out_features must be a multiple
MAX_IN_FEATURES = 1 << 16  # keeps every index of a (rows, in) tile inside a C int

_status = "not loaded"


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split(":", 1)[1].split())


def _compiler() -> list[str] | None:
    """``$CC`` (a command line: ``ccache gcc`` works), else ``cc`` or ``gcc`` on the path."""
    given = shlex.split(os.environ.get("CC", ""))
    for command in (given, ["cc"], ["gcc"]):
        found = shutil.which(command[0]) if command else None
        if found:
            return [found, *command[1:]]
    return None


def _cache_dir() -> Path:
    """``$LMDM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lmdm/kernels`` (``~/.cache/lmdm/kernels``); where that
    cannot be created (a read-only home), a private temporary folder of this process."""
    given = os.environ.get("LMDM_KERNEL_CACHE")
    if given:
        return Path(given)
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmdm" / "kernels"
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except (OSError, RuntimeError):  # RuntimeError: no home folder to be found
        pass
    private = tempfile.mkdtemp(prefix="lmdm-kernels-")  # mode 0700: no other user can plant a library there
    atexit.register(shutil.rmtree, private, ignore_errors=True)  # a loaded library stays mapped after its file goes
    return Path(private)


def _build(cc: list[str]) -> Path:
    """The compiled library for this source and compiler, built (atomically: concurrent workers may race) if absent."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"cpu_gemm-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=cache)
    os.close(fd)
    try:
        subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _status
    choice = os.environ.get("LMDM_CPU_KERNEL", "auto")
    if choice not in ("auto", "onednn"):
        raise ValueError(f"LMDM_CPU_KERNEL must be 'auto' (our kernel where it builds) or 'onednn', got {choice!r}")
    if choice == "onednn":
        _status = "off (LMDM_CPU_KERNEL=onednn)"
        return None
    if not _cpu_has_avx2_fma():
        _status = "unavailable: this CPU has no AVX2 + FMA (or is not x86-64)"
        return None
    cc = _compiler()
    if cc is None:
        _status = "unavailable: no C compiler (set CC, or install gcc)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        _status = f"unavailable: building {SOURCE.name} failed: {detail.strip()[:500]}"
        log.warning("lmdm CPU kernel %s; using oneDNN", _status)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.lmdm_linear.argtypes = [p, i, i, p, i, p, p, p, i]
    lib.lmdm_glu.argtypes = [p, i, i, p, i, p, p, i]
    lib.lmdm_pack.argtypes = [p, i, i, i, p]
    lib.lmdm_rotary_qk.argtypes = [p, i, i, i, i, p, p, i, p]
    for fn in (lib.lmdm_linear, lib.lmdm_glu, lib.lmdm_pack, lib.lmdm_rotary_qk):
        fn.restype = None
    _status = f"lmdm cpu_gemm (AVX2, {Path(cc[0]).name})"
    return lib


def available() -> bool:
    """Whether our kernel is built and loaded (compiles it on the first call)."""
    return _library() is not None


def status() -> str:
    """What :func:`available` found, in words (for benchmark captions and logs)."""
    _library()
    return _status


def supports(out_features: int, in_features: int, glu: bool = False) -> bool:
    """Whether a linear of this shape can use the kernel (whole 16-column panels; GLU: whole panels per half)."""
    unit = 2 * PANEL if glu else PANEL
    return available() and out_features % unit == 0 and 0 < in_features <= MAX_IN_FEATURES


def pack(weight: Tensor, glu: bool = False) -> Tensor:
    """The panel layout of a float32 ``(out, in)`` weight (see the module docstring)."""
    lib = _library()
    assert lib is not None, "cpu_gemm is not available"
    w = weight.detach().to(torch.float32).contiguous()
    N, K = w.shape
    out = torch.empty(N // PANEL, K, PANEL, dtype=torch.float32, device="cpu")
    lib.lmdm_pack(w.data_ptr(), N, K, int(glu), out.data_ptr())
    return out


def _rows(x: Tensor, K: int) -> tuple[Tensor, int]:
    x = x.contiguous()
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight takes {K}")
    rows = x.numel() // K
    if rows >= 2**31:
        raise ValueError(f"{rows} input rows: the kernel takes fewer than 2**31 per call")
    return x, rows


def linear(x: Tensor, panels: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """``x · Wᵀ + bias (+ residual)`` for float32 CPU ``x`` ``(..., in)``; ``residual`` ``(..., out)``."""
    lib = _library()
    assert lib is not None
    K = panels.shape[1]
    N = panels.shape[0] * PANEL
    x, M = _rows(x, K)
    out = torch.empty(*x.shape[:-1], N, dtype=torch.float32, device="cpu")
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have the output's shape {tuple(out.shape)}")
        residual = residual.contiguous()
    lib.lmdm_linear(
        x.data_ptr(), M, K, panels.data_ptr(), N,
        None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def glu(x: Tensor, panels: Tensor, bias: Tensor | None) -> Tensor:
    """``value · silu(gate)`` of ``[value, gate] = x · Wᵀ + bias`` for a GLU-packed weight: ``(..., in) → (..., H)``."""
    lib = _library()
    assert lib is not None
    K = panels.shape[1]
    H = panels.shape[0] // 2 * PANEL
    x, M = _rows(x, K)
    out = torch.empty(*x.shape[:-1], H, dtype=torch.float32, device="cpu")
    lib.lmdm_glu(
        x.data_ptr(), M, K, panels.data_ptr(), H, None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads()
    )
    return out


def rotary_qk(qkv: Tensor, heads: int, table: Tensor) -> Tensor:
    """Rotated queries and keys ``(2, B, H, S, Dh)`` of a fused qkv projection ``(B, S, 3·H·Dh)``: bit-identical
    to ``apply_rotary(qkv.view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)[:2], table)`` in one call instead of
    seven tensor ops.

    Args:
        qkv: float32 CPU ``(B, S, 3·H·Dh)`` (made contiguous).
        heads: ``H``.
        table: the rotary table ``(2, S, R/2)`` (:class:`~lmdm.models.rotary.RotaryEmbedding`), float32.
    """
    lib = _library()
    assert lib is not None
    qkv = qkv.contiguous()
    B, S, D3 = qkv.shape
    Dh = D3 // 3 // heads
    half = table.shape[-1]
    if D3 != 3 * heads * Dh or table.shape != (2, S, half) or table.dtype != torch.float32 or 2 * half > Dh:
        raise ValueError(f"rotary_qk: qkv {tuple(qkv.shape)} with {heads} heads and table {tuple(table.shape)} do not match")
    cos, sin = table[0].contiguous(), table[1].contiguous()
    out = torch.empty(2, B, heads, S, Dh, dtype=torch.float32, device="cpu")
    lib.lmdm_rotary_qk(qkv.data_ptr(), B, S, heads, Dh, cos.data_ptr(), sin.data_ptr(), half, out.data_ptr())
    return out
