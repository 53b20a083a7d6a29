"""Packed linear layers, on both kernels (ours where it builds, and oneDNN): the same outputs as ``F.linear``
(float32 rounding), gradients through the plain path, re-packing after an in-place weight change, and the
same LMDM stream as the unpacked model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lmdm.models import cpu_gemm
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.packed import Kernel, PackedLinear, kernels_used, pack_linears, packing_available
from lmdm.streaming.engines import Condition, LMDMEngine, Sampling
from lmdm.streaming.sequences import BlockGeometry

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")
KERNELS = pytest.mark.parametrize("kernel", ["auto", "onednn"])


@KERNELS
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(49, 64), (2, 97, 64), (1, 1, 64)])
def test_packed_linear_equals_f_linear(bias: bool, shape: tuple[int, ...], kernel: Kernel) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    packed = PackedLinear(linear, kernel)
    x = torch.randn(*shape)
    with torch.inference_mode():
        out = packed(x)
    ref = F.linear(x, linear.weight, linear.bias)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


@KERNELS
def test_gradients_use_the_plain_path_and_weight_updates_are_repacked(kernel: Kernel) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    packed = PackedLinear(linear, kernel)
    x = torch.randn(5, 32)
    packed(x).square().sum().backward()  # grad enabled: F.linear, so the shared weight gets its gradient
    expected = torch.autograd.grad(F.linear(x, linear.weight, linear.bias).square().sum(), linear.weight)[0]
    assert linear.weight.grad is not None and torch.allclose(linear.weight.grad, expected)
    with torch.no_grad():
        before = packed(x)
        torch.optim.SGD(linear.parameters(), lr=0.5).step()  # an in-place update of the weight
        after = packed(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


@KERNELS
def test_packed_dit_streams_the_same_blocks_with_the_same_state_dict(kernel: Kernel) -> None:
    torch.manual_seed(0)
    dit = DiT(DiTArgs(io_channels=8, width=64, depth=2, head_dim=32, cond_token_dim=32, input_concat_dim=9)).eval()
    for p in dit.parameters():  # non-zero everywhere (the default init zeroes the residual convs)
        nn.init.normal_(p, std=0.1)
    plain = copy.deepcopy(dit)
    keys = list(dit.state_dict())
    assert pack_linears(dit, kernel) == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    assert list(dit.state_dict()) == keys
    text = torch.randn(1, 5, 32)
    geometry = BlockGeometry(block_frames=4, context_blocks=2)
    blocks = {}
    for name, model in (("packed", dit), ("plain", plain)):
        engine = LMDMEngine(model, "block_causal", geometry, Sampling(steps=3))
        with torch.inference_mode():
            state = engine.start(Condition(text, "p"), 1, generator=torch.Generator().manual_seed(0))
            blocks[name] = torch.cat([engine.step(state, Condition(text, "p")) for _ in range(5)], dim=-1)
    ref = blocks["plain"]
    assert (blocks["packed"] - ref).abs().max() / ref.abs().max() < 1e-4
    used = kernels_used(dit)
    if kernel == "onednn" or not cpu_gemm.available():
        assert used["cpu_gemm"] == 0 and used["onednn"] > 0
    else:  # every linear of a width-64 DiT is whole 16-column panels, but for the 8-channel output projection
        assert used["cpu_gemm"] > 0 and used["onednn"] == 1


@KERNELS
@pytest.mark.parametrize("bias", [True, False])
def test_fused_residual_add_and_glu_equal_the_plain_ops(bias: bool, kernel: Kernel) -> None:
    """``forward_add`` = ``residual + linear(x)`` and ``forward_glu`` = ``value · silu(gate)``, packed (inference)
    and plain (gradients on, where both also give the reference gradients)."""
    torch.manual_seed(0)
    proj, out = nn.Linear(64, 2 * 96, bias=bias), nn.Linear(96, 64, bias=bias)
    packed_proj, packed_out = PackedLinear(proj, kernel), PackedLinear(out, kernel)
    x, residual = torch.randn(2, 49, 64), torch.randn(2, 49, 64)

    def reference(x: torch.Tensor) -> torch.Tensor:
        value, gate = F.linear(x, proj.weight, proj.bias).chunk(2, dim=-1)
        return residual + F.linear(value * F.silu(gate), out.weight, out.bias)

    with torch.inference_mode():
        fused = packed_out.forward_add(packed_proj.forward_glu(x), residual)
    torch.testing.assert_close(fused, reference(x), rtol=1e-5, atol=1e-5)
    x_grad = x.clone().requires_grad_()
    packed_out.forward_add(packed_proj.forward_glu(x_grad), residual).square().sum().backward()
    x_ref = x.clone().requires_grad_()
    reference(x_ref).square().sum().backward()
    assert x_grad.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x_grad.grad, x_ref.grad)


@KERNELS
def test_fused_glu_is_repacked_after_a_weight_update(kernel: Kernel) -> None:
    torch.manual_seed(0)
    proj = nn.Linear(32, 2 * 16)
    packed = PackedLinear(proj, kernel)
    x = torch.randn(7, 32)
    with torch.no_grad():
        before = packed.forward_glu(x)
        proj.weight.mul_(0.5)  # in place: the cached packed halves are stale
        after = packed.forward_glu(x)
        value, gate = F.linear(x, proj.weight, proj.bias).chunk(2, dim=-1)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, value * F.silu(gate), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        proj.bias.add_(1.0)  # the bias alone, in place: its cached halves are stale too
        shifted = packed.forward_glu(x)
        value, gate = F.linear(x, proj.weight, proj.bias).chunk(2, dim=-1)
    torch.testing.assert_close(shifted, value * F.silu(gate), rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_is_repacked_even_at_the_same_version() -> None:
    """``load_state_dict(assign=True)`` swaps in new tensors whose version counters may equal the old ones'."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    packed = PackedLinear(linear)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        packed(x)  # packs the old weight
    new = nn.Parameter(torch.randn(8, 16))
    with torch.no_grad():
        while new._version < packed.weight._version:
            new.add_(0.0)
    assert new._version == packed.weight._version
    packed.weight = new
    with torch.inference_mode():
        out = packed(x)
    torch.testing.assert_close(out, F.linear(x, new, linear.bias), rtol=1e-5, atol=1e-5)
