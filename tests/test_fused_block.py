"""The fused block forward (straight-line packed-kernel calls, either kernel) computes the same bits as the module path, and its
gathered weights follow every change to the model (in-place updates, replaced tensors, packing)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lmdm.models.attention import Projected, TransformerBlock
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.fused_block import FusedStack, fused_block_forward
from lmdm.models.packed import Kernel, pack_linears, packing_available
from lmdm.models.rotary import RotaryEmbedding
from lmdm.streaming.engines import Condition, LMDMEngine, Sampling
from lmdm.streaming.sequences import BlockGeometry

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")

D, DH = 64, 32


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(DiTArgs(io_channels=4, width=D, depth=2, head_dim=DH, cond_token_dim=32, input_concat_dim=5)).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return dit


def packed_tiny(seed: int = 0) -> tuple[DiT, torch.Tensor, torch.Tensor]:
    """A packed tiny DiT, six tokens and their rotary table."""
    dit = tiny_dit(seed)
    pack_linears(dit)
    return dit, torch.randn(1, 6, D), dit.freqs(torch.arange(6))


def _inputs(B: int, S: int, K: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    mask = torch.rand(S, K, generator=g) > 0.3
    mask[:, -1] = True
    return x, mask, torch.randn(B, 2, 5, DH, generator=g), torch.randn(B, 2, 5, DH, generator=g)


@pytest.mark.parametrize("kernel", ["auto", "onednn"])
@pytest.mark.parametrize("context_dim", [None, D, 2 * DH])  # no cross-attention; as many K/V heads as queries; grouped
@pytest.mark.parametrize(("B", "outputs_from"), [(1, 0), (2, 0), (2, 3)])
def test_fused_block_equals_module_block(context_dim: int | None, B: int, outputs_from: int, kernel: Kernel) -> None:
    torch.manual_seed(0)
    block = TransformerBlock(D, DH, context_dim).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    pack_linears(block, kernel)
    S, extra = 7, 4  # the hook adds 4 cached keys in front of the block's own
    x, mask, text_k, text_v = _inputs(B, S, extra + S)
    freqs = RotaryEmbedding(DH)(torch.arange(S))
    text_mask = torch.ones(S, 5, dtype=torch.bool)
    text_mask[::2, 3:] = False
    text_kv = None
    if context_dim is not None:
        text_kv = (text_k[:, : context_dim // DH], text_v[:, : context_dim // DH])
    cached = torch.randn(B, D // DH, extra, DH)
    seen: list[list[torch.Tensor]] = [[], []]

    def hook_for(i: int):  # type: ignore[no-untyped-def]
        def hook(p: Projected) -> tuple[torch.Tensor, torch.Tensor]:
            seen[i].append(torch.cat([p.q, p.k, p.k_raw, p.v]))
            return torch.cat([cached, p.k], 2), torch.cat([cached, p.v], 2)

        return hook

    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([block])
    stack = FusedStack(holder)
    with torch.inference_mode():
        reference = block(x, freqs, mask, text_kv, text_mask, hook_for(0), outputs_from)
        packs = stack.packs(x)
        assert packs is not None
        fused = fused_block_forward(packs[0], x, freqs, mask, text_kv, text_mask, hook_for(1), outputs_from)
    assert fused.shape == (B, S - outputs_from, D)
    assert torch.equal(fused, reference)
    assert torch.equal(seen[0][0], seen[1][0])


def test_run_layers_takes_the_fused_path_only_where_it_applies() -> None:
    dit = tiny_dit()
    h = torch.randn(1, 6, D)
    freqs, text = dit.freqs(torch.arange(6)), dit.text_kv(torch.randn(1, 5, 32))
    with torch.inference_mode():
        assert dit._fused.packs(h) is None  # not packed yet: the module path
        unpacked = dit.run_layers(h, freqs, None, text)
    pack_linears(dit)  # replaces modules: the stack notices without being told
    with torch.inference_mode():
        assert dit._fused.packs(h) is not None
        fused = dit.run_layers(h, freqs, None, text)
        assert dit._fused.packs(h.double()) is None
        module = h
        for layer, kv in zip(dit.layers, text, strict=True):  # the module path, with the same packed kernels
            module = layer(module, freqs, None, kv)
    assert dit._fused.packs(h) is None  # autograd on (parameters require grad): the module path
    torch.testing.assert_close(fused, unpacked, rtol=1e-5, atol=1e-5)  # packed vs BLAS: float32 rounding
    assert torch.equal(fused, module)


def test_fused_stack_follows_in_place_updates_and_replaced_tensors() -> None:
    dit, h, freqs = packed_tiny()

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            fused = dit.run_layers(h, freqs, None, None)
            out = h
            for layer in dit.layers:  # the module path
                out = layer(out, freqs, None, None)
        return fused, out

    first, _ = both()
    with torch.no_grad():
        dit.layers[1].ff.ff[2].weight.mul_(0.5)  # in place, as an optimizer step
        dit.layers[0].pre_norm.gamma.add_(0.1)
    fused, module = both()
    assert not torch.equal(fused, first) and torch.equal(fused, module)
    state = {k: v + 0.01 for k, v in dit.state_dict().items()}
    dit.load_state_dict(state, assign=True)  # new tensor objects, fresh version counters
    fused, module = both()
    assert torch.equal(fused, module)
    plain = h
    for layer in dit.layers:  # autograd on: F.linear on the live weights, no pack involved
        plain = layer(plain, freqs, None, None)
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-5)  # no stale pack anywhere


def test_copies_and_pickles_carry_no_packs() -> None:
    dit, h, freqs = packed_tiny()
    with torch.inference_mode():
        out = dit.run_layers(h, freqs, None, None)
        for clone in (copy.deepcopy(dit), pickle.loads(pickle.dumps(dit))):
            assert clone._fused._packs is None and clone._fused.owner is clone.transformer
            assert torch.equal(clone.run_layers(h, freqs, None, None), out)


def _module_path(dit: DiT, h: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    for layer in dit.layers:
        h = layer(h, freqs, None, None)
    return h


def test_a_replaced_or_grown_layer_list_is_noticed() -> None:
    dit, other = tiny_dit(0), tiny_dit(1)
    pack_linears(dit)
    pack_linears(other)
    h = torch.randn(1, 6, D)
    freqs = dit.freqs(torch.arange(6))
    with torch.inference_mode():
        dit.run_layers(h, freqs, None, None)  # gathers the packs of the first list
        dit.transformer.layers = other.transformer.layers  # a new list object
        torch.testing.assert_close(dit.run_layers(h, freqs, None, None), _module_path(other, h, freqs), rtol=0, atol=0)
        dit.transformer.layers.append(copy.deepcopy(other.transformer.layers[0]))  # the same list, one more block
        assert torch.equal(dit.run_layers(h, freqs, None, None), _module_path(dit, h, freqs))


def test_hooks_subclasses_and_strided_tokens_take_the_module_path() -> None:
    dit = tiny_dit()
    pack_linears(dit)
    h = torch.randn(1, 6, D)
    with torch.inference_mode():
        assert dit._fused.packs(h) is not None
        assert dit._fused.packs(torch.randn(1, 6, 2 * D)[..., ::2]) is None  # strided: the unfused residual add
        calls: list[int] = []
        handle = dit.layers[1].ff.register_forward_hook(lambda *_: calls.append(1))
        assert dit._fused.packs(h) is None
        dit.run_layers(h, dit.freqs(torch.arange(6)), None, None)
        assert calls == [1]  # the hook ran
        handle.remove()
        assert dit._fused.packs(h) is not None

        class Doubled(TransformerBlock):
            def forward(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
                return 2 * super().forward(x, *args, **kwargs)

        doubled = Doubled(D, DH, 32)
        doubled.load_state_dict(dit.layers[0].state_dict())
        pack_linears(doubled)
        dit.transformer.layers[0] = doubled
        assert dit._fused.packs(h) is None


def test_a_bias_assigned_later_is_noticed() -> None:
    dit, h, freqs = packed_tiny()
    with torch.inference_mode():
        dit.run_layers(h, freqs, None, None)
    to_out = dit.layers[0].self_attn.to_out
    assert to_out.bias is None
    to_out.bias = torch.nn.Parameter(torch.full((D,), 0.5))
    with torch.inference_mode():
        assert torch.equal(dit.run_layers(h, freqs, None, None), _module_path(dit, h, freqs))


@pytest.mark.parametrize("mask_shape", [(1, 7), (7, 7), (2, 1, 7, 7), (2, 1, 1, 7)])
def test_outputs_from_with_masks_broadcast_over_queries(mask_shape: tuple[int, ...]) -> None:
    dit = tiny_dit()
    pack_linears(dit)
    h = torch.randn(2, 7, D)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[..., -1] = True
    if len(mask_shape) >= 2 and mask_shape[-2] == 7:
        mask |= torch.eye(7, dtype=torch.bool)
    freqs = dit.freqs(torch.arange(7))
    with torch.inference_mode():
        full = dit.run_layers(h, freqs, mask, None)
        part = dit.run_layers(h, freqs, mask, None, outputs_from=3)
    torch.testing.assert_close(part, full[:, 3:], rtol=1e-5, atol=1e-6)
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="outputs_from must be in"):
            dit.run_layers(h, freqs, mask, None, outputs_from=bad)


@pytest.mark.parametrize("kernel", ["auto", "onednn"])
def test_packed_block_causal_stream_with_cfg_and_prompt_changes_is_the_same_fused_or_not(
    monkeypatch: pytest.MonkeyPatch, kernel: Kernel
) -> None:
    """Engine level: CFG rows, per-block prompts (the merged commit pass slices its text mask) and FIFO
    eviction give the same blocks, bit for bit, on the fused and the module path."""
    dit = tiny_dit()
    pack_linears(dit, kernel)
    geometry = BlockGeometry(block_frames=3, context_blocks=2)
    g = torch.Generator().manual_seed(5)
    texts = [torch.randn(2, 5, 32, generator=g) for _ in range(3)]

    def stream() -> list[torch.Tensor]:
        engine = LMDMEngine(dit, "block_causal", geometry, Sampling(steps=2, cfg_scale=3.0))
        state = engine.start(Condition(texts[0], "p0"), 2, generator=torch.Generator().manual_seed(0))
        blocks = []
        with torch.inference_mode():
            for j in range(5):
                k = min(j // 2, 2)
                blocks.append(engine.step(state, Condition(texts[k], f"p{k}")))
        return blocks

    fused = stream()
    monkeypatch.setattr(FusedStack, "packs", lambda self, h: None)
    module = stream()
    for a, b in zip(fused, module, strict=True):
        assert torch.equal(a, b)
