"""Our CPU linear kernel (``lmdm.models.cpu_gemm``) against float64 references: every row count around its
6-row tiles and 252-row chunks, bias and residual epilogues, the GLU's ``silu`` over float's range, thread
counts; and its build: cached, atomic, and a clear fallback to oneDNN where it cannot be built."""

from __future__ import annotations

import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lmdm.models import cpu_gemm
from lmdm.models.packed import PackedLinear, packing_available
from lmdm.models.rotary import RotaryEmbedding, apply_rotary

needs_kernel = pytest.mark.skipif(not cpu_gemm.available(), reason=f"lmdm cpu_gemm: {cpu_gemm.status()}")


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The kernel loaded anew under this test's environment (its own cache folder); reloaded as before after it."""
    monkeypatch.setenv("LMDM_KERNEL_CACHE", str(tmp_path / "kernels"))
    cpu_gemm._library.cache_clear()
    yield tmp_path / "kernels"
    monkeypatch.undo()
    cpu_gemm._library.cache_clear()


def _has_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"avx2", "fma"} <= set(flags.split())


def test_the_kernel_builds_wherever_a_compiler_and_avx2_exist() -> None:
    """So the tests below cannot skip silently on a machine that should run them (CI's does)."""
    if _has_avx2_fma() and (shutil.which("cc") or shutil.which("gcc")):
        assert cpu_gemm.available(), cpu_gemm.status()
    else:
        assert not cpu_gemm.available() and cpu_gemm.status().startswith("unavailable")


@needs_kernel
@pytest.mark.parametrize("M", [1, 5, 6, 7, 49, 253, 517])  # partial tiles, whole tiles, a second and third 252-row chunk
@pytest.mark.parametrize(("K", "N"), [(1, 16), (33, 48), (512, 96)])
def test_linear_equals_a_float64_reference(M: int, K: int, N: int) -> None:
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    residual = torch.randn(M, N, generator=g)
    panels = cpu_gemm.pack(w)
    ref = F.linear(x.double(), w.double())
    torch.testing.assert_close(cpu_gemm.linear(x, panels, None), ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_gemm.linear(x, panels, b), (ref + b.double()).float(), rtol=1e-5, atol=1e-5)
    out = cpu_gemm.linear(x, panels, b, residual)
    torch.testing.assert_close(out, (ref + b.double() + residual.double()).float(), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(49, 64), (2, 97, 64), (1, 1, 64)])
def test_glu_equals_value_times_silu_gate(bias: bool, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    H = 48
    x, w = torch.randn(*shape, generator=g), torch.randn(2 * H, shape[-1], generator=g) / 4
    b = torch.randn(2 * H, generator=g) if bias else None
    value, gate = F.linear(x.double(), w.double(), None if b is None else b.double()).chunk(2, dim=-1)
    out = cpu_gemm.glu(x, cpu_gemm.pack(w, glu=True), b)
    assert out.shape == (*shape[:-1], H)
    torch.testing.assert_close(out, (value * F.silu(gate)).float(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_glu_silu_is_accurate_over_floats_range() -> None:
    """value = 1 (bias), gate = x: the kernel's ``silu`` (its own ``exp``) against float64 from −1e4 to 1e4,
    saturating cleanly at both ends (no inf, no NaN)."""
    x = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([-1e4, -89.0, -88.5, 88.5, 89.0, 1e4, 0.0, 1e-30])])[:, None]
    w = torch.cat([torch.zeros(16, 1), torch.ones(16, 1)])
    b = torch.cat([torch.ones(16), torch.zeros(16)])
    out = cpu_gemm.glu(x, cpu_gemm.pack(w, glu=True), b)[:, 0].double()
    ref = F.silu(x[:, 0].double())
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= 2e-7 * ref.abs() + 1e-30).all(), (out - ref).abs().max()


@needs_kernel
@pytest.mark.parametrize("M", [7, 49, 97, 241, 259])
@pytest.mark.parametrize("glu", [False, True])
def test_a_row_is_computed_the_same_in_any_tile_split(M: int, glu: bool) -> None:
    """Rows split into tiles as evenly as possible (49 = 4·6 + 5·5); each row's sum runs over k in order
    whatever its tile, so every row equals the same row computed alone, bit for bit."""
    g = torch.Generator().manual_seed(M)
    x, w, b = torch.randn(M, 64, generator=g), torch.randn(64, 64, generator=g) / 8, torch.randn(64, generator=g)
    panels = cpu_gemm.pack(w, glu=glu)
    run = (lambda rows: cpu_gemm.glu(rows, panels, b)) if glu else (lambda rows: cpu_gemm.linear(rows, panels, b))
    whole = run(x)
    assert torch.equal(whole, torch.cat([run(x[i : i + 1]) for i in range(M)]))


@needs_kernel
@pytest.mark.parametrize(("B", "S", "H", "Dh"), [(1, 49, 8, 64), (2, 5, 2, 32), (1, 7, 3, 84), (2, 3, 1, 96)])
def test_rotary_qk_is_bit_identical_to_apply_rotary(B: int, S: int, H: int, Dh: int) -> None:
    """Head dims whose rotated half is a multiple of 8 floats or not (84: 21, the scalar tail), and whose
    unrotated rest is empty, 8 floats or more."""
    g = torch.Generator().manual_seed(S * Dh)
    qkv = torch.randn(B, S, 3 * H * Dh, generator=g) * 3
    table = RotaryEmbedding(Dh)(torch.arange(S) + 1000)  # large angles: every bit of cos and sin used
    reference = apply_rotary(qkv.view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)[:2], table)
    assert torch.equal(cpu_gemm.rotary_qk(qkv, H, table), reference)
    with pytest.raises(ValueError, match="do not match"):
        cpu_gemm.rotary_qk(qkv, H, table[:, :-1])


@needs_kernel
def test_results_do_not_depend_on_the_thread_count() -> None:
    """Each output is computed by one thread, in one order: 1, 2 or 3 threads give the same bits."""
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(49, 128, generator=g), torch.randn(4 * 16 * 3, 128, generator=g), torch.randn(192, generator=g)
    panels, glu = cpu_gemm.pack(w), cpu_gemm.pack(w, glu=True)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((cpu_gemm.linear(x, panels, b), cpu_gemm.glu(x, glu, b)))
    finally:
        torch.set_num_threads(before)
    for lin, gl in outs[1:]:
        assert torch.equal(lin, outs[0][0]) and torch.equal(gl, outs[0][1])


@needs_kernel
def test_a_packed_linear_uses_the_kernel_only_for_shapes_it_takes() -> None:
    torch.manual_seed(0)
    taken, other = PackedLinear(torch.nn.Linear(32, 48)), PackedLinear(torch.nn.Linear(32, 40))
    glu_other = PackedLinear(torch.nn.Linear(32, 48))  # a GLU needs whole panels per half: 24 is not
    x = torch.randn(5, 32)
    with torch.inference_mode():
        taken(x), other(x), glu_other.forward_glu(x)
    assert taken.pack().panels and not other.pack().panels
    assert glu_other.glu_pack().panels is None


@needs_kernel
def test_the_build_is_cached_per_source_and_leaves_no_partial_files(fresh_library: Path) -> None:
    assert cpu_gemm.available()
    (built,) = fresh_library.iterdir()
    assert built.name.startswith("cpu_gemm-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    cpu_gemm._library.cache_clear()
    assert cpu_gemm.available()  # a second load (as another worker process would) reuses it
    assert [p.name for p in fresh_library.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")
def test_a_failed_build_falls_back_to_onednn_and_says_why(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemm, "_cpu_has_avx2_fma", lambda: True)
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert not cpu_gemm.available()
    assert "unavailable: building cpu_gemm.c failed" in cpu_gemm.status()
    assert not fresh_library.exists() or not any(fresh_library.iterdir())  # no half-written library left behind
    layer = PackedLinear(torch.nn.Linear(32, 48))
    x = torch.randn(3, 32)
    with torch.inference_mode():
        out = layer(x)
    assert not layer.pack().panels
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_the_kernel_can_be_switched_off_and_a_bad_setting_is_an_error(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMDM_CPU_KERNEL", "onednn")
    assert not cpu_gemm.available() and cpu_gemm.status() == "off (LMDM_CPU_KERNEL=onednn)"
    cpu_gemm._library.cache_clear()
    monkeypatch.setenv("LMDM_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match="LMDM_CPU_KERNEL must be 'auto'"):
        cpu_gemm.available()


def test_a_packed_linear_refuses_an_unknown_kernel() -> None:
    with pytest.raises(ValueError, match="kernel must be 'auto' or 'onednn'"):
        PackedLinear(torch.nn.Linear(4, 16), "mkl")  # type: ignore[arg-type]


def test_an_unwritable_cache_folder_falls_back_to_a_private_temporary_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.delenv("LMDM_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # <file>/lmdm/kernels cannot be created
    folder = cpu_gemm._cache_dir()
    assert not str(folder).startswith(str(blocker)) and folder.is_dir()
    assert folder.stat().st_mode & 0o077 == 0  # private: no other user can plant a library in it
    folder.rmdir()  # (the process would remove it at exit)
    monkeypatch.setenv("LMDM_KERNEL_CACHE", str(tmp_path / "mine"))
    assert cpu_gemm._cache_dir() == tmp_path / "mine"


@needs_kernel
def test_an_input_of_the_wrong_width_is_a_clear_error() -> None:
    panels = cpu_gemm.pack(torch.randn(16, 8))
    with pytest.raises(ValueError, match="input has 7 features, the packed weight takes 8"):
        cpu_gemm.linear(torch.randn(3, 7), panels, None)


@needs_kernel
def test_a_residual_of_another_shape_is_refused_by_the_kernel_and_broadcast_by_the_layer() -> None:
    """The kernel reads ``rows × out`` residual values: a residual that would broadcast must never reach it."""
    torch.manual_seed(0)
    layer = PackedLinear(torch.nn.Linear(32, 48))
    x, row = torch.randn(5, 32), torch.randn(48)
    with pytest.raises(ValueError, match=r"residual \(48,\) must have the output's shape \(5, 48\)"):
        cpu_gemm.linear(x, layer.pack().weight, None, row)
    with torch.inference_mode():
        out = layer.forward_add(x, row)
    torch.testing.assert_close(out, row + F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_changing_the_kernel_of_a_layer_repacks_it() -> None:
    layer = PackedLinear(torch.nn.Linear(32, 48))
    x = torch.randn(3, 32)
    with torch.inference_mode():
        first = layer(x)
        assert layer.pack().panels
        layer.kernel = "onednn"
        second = layer(x)
    assert not layer.pack().panels
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_cc_may_be_a_command_line(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", f"env {shutil.which('cc') or shutil.which('gcc')}")
    assert cpu_gemm.available(), cpu_gemm.status()
    assert cpu_gemm.status().endswith("(AVX2, env)")


def test_no_home_folder_falls_back_to_a_private_temporary_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("LMDM_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    folder = cpu_gemm._cache_dir()
    assert folder.is_dir() and folder.stat().st_mode & 0o077 == 0
    folder.rmdir()
