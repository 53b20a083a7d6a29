"""The FlexAttention block mask is the dense mask: the same predicate materialises to the same (S, K)
booleans (with dropped context and per-sample validity), and attention over it computes what SDPA over
the dense mask computes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from lmdm.models.attention import SelfAttention, query_rows
from lmdm.models.block_mask import (
    CLEAN,
    GLOBAL,
    NOISY,
    TokenLayout,
    Variant,
    attention_mask,
    flex_available,
    flex_block_mask,
)
from lmdm.models.dit import DiT, DiTArgs
from lmdm.streaming.sequences import BlockGeometry, block_causal_forward

IO, BF, CTX, B = 4, 3, 2, 2
GEO = BlockGeometry(block_frames=BF, context_blocks=CTX)
VARIANTS: list[Variant] = ["block_causal", "encdec", "full"]

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def stream_layout(targets: list[int], n: int, valid: Tensor | None = None) -> TokenLayout:
    """The packed training layout of :func:`block_causal_forward`: J globals, N clean blocks, J noisy targets;
    ``valid`` ``(N,)`` or ``(B, N)`` per clean block."""
    tgt = torch.tensor(targets)
    J = len(targets)
    v = torch.ones(n, dtype=torch.bool) if valid is None else valid
    v = v.repeat_interleave(BF, dim=-1)
    ones_j, ones_t = torch.ones(J, dtype=torch.bool), torch.ones(J * BF, dtype=torch.bool)
    if v.ndim == 2:
        ones_j, ones_t = ones_j.expand(v.shape[0], -1), ones_t.expand(v.shape[0], -1)
    return TokenLayout(
        kind=torch.cat([tgt.new_full((J,), GLOBAL), tgt.new_full((n * BF,), CLEAN), tgt.new_full((J * BF,), NOISY)]),
        block=torch.cat([tgt, torch.arange(n).repeat_interleave(BF), tgt.repeat_interleave(BF)]),
        valid=torch.cat([ones_j, v, ones_t], dim=-1),
    )


def random_layout(n: int, seed: int, per_sample: bool) -> TokenLayout:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand((B, n) if per_sample else (n,), generator=g) > 0.3
    return TokenLayout(torch.randint(0, 3, (n,), generator=g), torch.randint(0, 6, (n,), generator=g), valid)


def materialise(mask: BlockMask) -> Tensor:
    """The token-level booleans FlexAttention computes with: ``mask_mod`` inside the partial blocks, True in
    the full blocks, False in every skipped block. ``(B, 1, S, K)``."""
    S, K = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    nb = mask.kv_num_blocks.shape[0]
    evaluated = mask.mask_mod(
        torch.arange(nb)[:, None, None, None], torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(S)[:, None], torch.arange(K)
    ).expand(nb, 1, S, K)
    dense = torch.zeros(nb, 1, S, K, dtype=torch.bool)
    for b in range(nb):
        for qb in range(mask.kv_num_blocks.shape[2]):
            rows = slice(qb * bq, (qb + 1) * bq)
            for i in range(int(mask.kv_num_blocks[b, 0, qb])):
                cols = slice(int(mask.kv_indices[b, 0, qb, i]) * bk, (int(mask.kv_indices[b, 0, qb, i]) + 1) * bk)
                dense[b, 0, rows, cols] = evaluated[b, 0, rows, cols]
            if mask.full_kv_num_blocks is not None and mask.full_kv_indices is not None:
                for i in range(int(mask.full_kv_num_blocks[b, 0, qb])):
                    cols = slice(int(mask.full_kv_indices[b, 0, qb, i]) * bk, (int(mask.full_kv_indices[b, 0, qb, i]) + 1) * bk)
                    dense[b, 0, rows, cols] = True
    return dense


def assert_same_mask(queries: TokenLayout, keys: TokenLayout, variant: Variant, same_tokens: bool = True) -> None:
    dense = attention_mask(queries, keys, variant, CTX, same_tokens)
    expected = dense if dense.ndim == 4 else dense[None, None]
    for block_size in (128, 4):  # one block; many (block skipping and full blocks exercised)
        flex = flex_block_mask(queries, keys, variant, CTX, same_tokens, block_size=block_size)
        assert flex.shape == (expected.shape[0], 1, len(queries), len(keys))
        assert torch.equal(materialise(flex), expected), (variant, block_size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_mask_equals_dense_mask_on_a_stream(variant: Variant) -> None:
    layout = stream_layout([1, 4, 6], 7)
    assert_same_mask(layout, layout, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_mask_equals_dense_mask_with_dropped_context(variant: Variant) -> None:
    dropped = torch.tensor([False, True, True, False, True, True, True])
    layout = stream_layout([0, 3, 7], 7, dropped)
    assert_same_mask(layout, layout, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_mask_equals_dense_mask_with_per_sample_validity(variant: Variant) -> None:
    valid = torch.tensor([[True, False, True, True, False, True], [False, False, False, False, False, False]])
    layout = stream_layout([2, 5, 6], 6, valid)
    assert_same_mask(layout, layout, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_block_mask_equals_dense_mask_on_random_layouts(variant: Variant, per_sample: bool) -> None:
    for seed in range(3):
        layout = random_layout(23, seed, per_sample)
        assert_same_mask(layout, layout, variant)
        # queries = the first tokens of the keys, as a cached engine's pass sees them
        queries = TokenLayout(layout.kind[:9], layout.block[:9], torch.ones(9, dtype=torch.bool))
        assert_same_mask(queries, layout, variant, same_tokens=False)


def test_unknown_variant_is_refused() -> None:
    layout = stream_layout([1], 2)
    with pytest.raises(ValueError, match="unknown attention variant"):
        flex_block_mask(layout, layout, "causal", CTX)  # type: ignore[arg-type]


def test_query_rows_refuses_to_slice_a_block_mask() -> None:
    layout = stream_layout([1], 2)
    mask = flex_block_mask(layout, layout, "block_causal", CTX)
    assert query_rows(mask, 0) is mask
    with pytest.raises(ValueError, match="outputs_from > 0"):
        query_rows(mask, 1)


def tiny_dit(dtype: torch.dtype) -> DiT:
    torch.manual_seed(0)
    dit = DiT(DiTArgs(io_channels=IO, width=64, depth=3, head_dim=32, cond_token_dim=32, input_concat_dim=IO + 1)).to(dtype)
    for p in dit.parameters():  # non-zero everywhere (the default init zeroes the residual convs)
        torch.nn.init.normal_(p, std=0.2)
    return dit


@pytest.mark.skipif(not flex_available("cpu", torch.float32), reason="flex_attention does not run on CPU in this torch")
def test_attend_over_block_mask_equals_sdpa_over_dense_mask() -> None:
    layout = random_layout(37, 0, per_sample=True)
    attn = SelfAttention(64, 16)
    q, k, v = torch.randn(3, B, 4, 37, 16).unbind(0)
    dense = attn.attend(q, k, v, attention_mask(layout, layout, "block_causal", CTX))
    for block_size in (128, 8):
        flex = attn.attend(q, k, v, flex_block_mask(layout, layout, "block_causal", CTX, block_size=block_size))
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not flex_available("cpu", torch.float32), reason="flex_attention does not run on CPU in this torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_causal_forward_flex_equals_dense(dtype: torch.dtype) -> None:
    dit = tiny_dit(dtype)
    g = torch.Generator().manual_seed(3)
    N, targets = 6, [1, 4, 6]
    clean = torch.randn(B, IO, N * BF, generator=g, dtype=dtype)
    noisy = torch.randn(B, IO, len(targets) * BF, generator=g, dtype=dtype)
    t = torch.rand(B, len(targets), generator=g, dtype=dtype)
    text = torch.randn(B, 2, 5, 32, generator=g, dtype=dtype)
    args = {"text": text, "block_prompt": torch.tensor([0, 0, 1, 1, 0, 1]), "target_prompt": torch.tensor([0, 1, 1])}
    for valid in (None, torch.tensor([True, False, True, True, False, True]), torch.rand(B, N, generator=g) > 0.4):
        with torch.no_grad():
            dense = block_causal_forward(dit, GEO, clean, noisy, targets, t, context_valid=valid, flex=False, **args)
            flex = block_causal_forward(dit, GEO, clean, noisy, targets, t, context_valid=valid, flex=True, **args)
        rel = ((flex - dense).abs().max() / dense.abs().max()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-12), rel


def test_default_on_cpu_is_the_dense_mask() -> None:
    """CPU keeps SDPA over the dense mask (flex has no CPU backward and an unfused eager forward): bit-equal."""
    dit = tiny_dit(torch.float64)
    clean, noisy, t = torch.randn(B, IO, 4 * BF, dtype=torch.float64), torch.randn(B, IO, BF, dtype=torch.float64), torch.rand(B, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager flex_attention call would warn
        out = block_causal_forward(dit, GEO, clean, noisy, [4], t.double())
    assert torch.equal(out, block_causal_forward(dit, GEO, clean, noisy, [4], t.double(), flex=False))


def test_flex_where_it_cannot_run_is_refused() -> None:
    """torch 2.13 has no FlexAttention backward on CPU: a training pass with ``flex=True`` says so."""
    if flex_available("cpu", torch.float32, grad=True):
        pytest.skip("this torch runs FlexAttention backward on CPU")
    dit = tiny_dit(torch.float32)
    clean, noisy, t = torch.randn(B, IO, 2 * BF), torch.randn(B, IO, BF), torch.rand(B, 1)
    with pytest.raises(ValueError, match="FlexAttention does not run"):
        block_causal_forward(dit, GEO, clean, noisy, [2], t, flex=True)
