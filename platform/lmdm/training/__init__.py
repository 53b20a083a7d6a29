"""Training objectives as library functions (the Ray pipelines call these)."""

from lmdm.training.losses import (
    LossOutput,
    TSampler,
    base_inpainting_loss,
    lmdm_block_causal_loss,
    lmdm_encdec_loss,
    sample_context_valid,
    sample_inpainting_mask,
    sample_t,
)

__all__ = [
    "LossOutput",
    "TSampler",
    "base_inpainting_loss",
    "lmdm_block_causal_loss",
    "lmdm_encdec_loss",
    "sample_context_valid",
    "sample_inpainting_mask",
    "sample_t",
]
