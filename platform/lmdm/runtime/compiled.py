"""The ``compile`` runtime: ``torch.compile`` of :meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>`.

What is compiled is the layer stack of one pass, whose inputs are tensors (tokens, rotary table, mask,
text keys/values, the :class:`~lmdm.models.kv_cache.CacheIO` buffers and positions) and a few ints that
are fixed per kind of pass (``outputs_from``, the attended cache region). Shapes are static
(``dynamic=False``): expect one compile per shape — an LMDM's plain denoising step, its merged commit
pass, a context encoding, an outpainting window, and each batch size — and none after that. Warm it up
(run every kind of pass once) before timing or serving.

- Never under gradients: with autograd recording, the pass runs the model's own (eager) ``run_layers``,
  so training and ARC-Forcing rollouts backpropagate through plain PyTorch.
- ``freeze=True`` (inductor freezing: weights become constants, which lets inductor pre-pack them, a large
  gain on CPU) is for inference weights only. The weights are fingerprinted at every call (identity and
  autograd version of each parameter and buffer); when they changed (an EMA or ARC-Forcing step,
  ``load_state_dict``, a reload) the frozen graphs are dropped and compiled again. Writes that keep no
  version — through ``param.data``, or into inference tensors — are not seen: call
  :meth:`CompiledLayers.invalidate` after those. Dropping the graphs is :func:`torch.compiler.reset`,
  which clears every compiled function of the process.

Private torch APIs used here, each with a fallback: ``torch._dynamo.config`` (raising the recompile
limit, so that the expected shapes never fall back to eager: skipped with a warning where the setting is
gone) and ``torch._inductor.config.patch(freezing=True)`` (where gone, ``freeze`` is refused with a
clear error). ``tests/test_runtime.py`` fails loudly if either disappears.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from lmdm.models.dit import TextKV
from lmdm.models.kv_cache import CacheIO
from lmdm.models.lmm import LayerStack
from lmdm.runtime.versions import WeightWatch

__all__ = ["RECOMPILE_LIMIT", "CompiledLayers", "compiled_layers", "freezing_available", "raise_recompile_limit"]

RECOMPILE_LIMIT = 64  # kinds of pass × batch sizes × models in one process, with room to spare


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> bool:
    """Let dynamo keep ``limit`` compiled versions of ``run_layers`` (its default, 8, is fewer than the shapes a
    serving process sees; past it dynamo silently runs eager). Returns whether the setting exists."""
    config: Any = torch._dynamo.config
    found = False
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))
            found = True
    if not found:
        warnings.warn("torch._dynamo.config has no recompile limit setting: many pass shapes may fall back to eager", stacklevel=2)
    return found


def freezing_available() -> bool:
    """Whether inductor's ``freezing`` setting exists in this torch."""
    return hasattr(torch._inductor.config, "freezing")


@contextlib.contextmanager
def _freezing(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    with torch._inductor.config.patch(freezing=True):
        yield


class CompiledLayers:
    """``run_layers`` of one model through ``torch.compile`` (the signature of :meth:`DiT.run_layers`).

    Args:
        dit: the model.
        backend: the ``torch.compile`` backend (``inductor``; tests also use ``aot_eager``, which traces the
            same graphs without generating code).
        freeze: inductor freezing (inference weights as constants; see the module docstring).
        mode: ``torch.compile`` mode (``None``, ``max-autotune``, ``reduce-overhead``, ...).

    Raises:
        ValueError: ``freeze`` with a backend other than inductor, or where freezing is unavailable.
    """

    def __init__(self, dit: LayerStack, backend: str = "inductor", freeze: bool = False, mode: str | None = None) -> None:
        if freeze and backend != "inductor":
            raise ValueError(f"freeze needs the inductor backend, got {backend!r}")
        if freeze and not freezing_available():
            raise ValueError("this torch has no inductor freezing setting; use freeze=False")
        self._dit = weakref.ref(dit)
        self.backend, self.freeze, self.mode = backend, freeze, mode
        self.recompiles_for_weights = 0  # frozen graphs dropped because the weights changed
        raise_recompile_limit()
        # the unbound method, called with the model: a bound one would keep the model alive forever
        self._compiled: Callable[..., Tensor] = torch.compile(
            type(dit).run_layers, backend=backend, fullgraph=True, dynamic=False, mode=mode
        )
        self._weights = WeightWatch()

    @property
    def dit(self) -> LayerStack:
        dit = self._dit()
        if dit is None:
            raise RuntimeError("the model these compiled layers were bound to no longer exists")
        return dit

    def invalidate(self) -> None:
        """Drop frozen graphs now (after weight writes that keep no version: ``param.data``, inference tensors)."""
        if self.freeze:
            torch.compiler.reset()
            self.recompiles_for_weights += 1
        self._weights.forget()

    def _check_weights(self) -> None:
        """Frozen graphs hold the weights they were compiled with: drop them when the weights changed."""
        if self._weights.changed([*self.dit.parameters(), *self.dit.buffers()]):  # frozen graphs bake in both
            torch.compiler.reset()
            self.recompiles_for_weights += 1

    def __call__(
        self,
        h: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: TextKV | None,
        text_mask: Tensor | None = None,
        cache: CacheIO | None = None,
        outputs_from: int = 0,
    ) -> Tensor:
        if torch.is_grad_enabled():  # never under gradients: eager, plain autograd
            return self.dit.run_layers(h, freqs, mask, text_kv, text_mask, cache, outputs_from)
        if self.freeze:
            self._check_weights()
        with _freezing(self.freeze):
            return self._compiled(self.dit, h, freqs, mask, text_kv, text_mask, cache, outputs_from)


_BOUND: weakref.WeakKeyDictionary[LayerStack, dict[tuple[str, bool, str | None], CompiledLayers]] = weakref.WeakKeyDictionary()


def compiled_layers(dit: LayerStack, backend: str = "inductor", freeze: bool = False, mode: str | None = None) -> CompiledLayers:
    """The compiled layers of ``dit`` with these settings (one per model and settings: engines share them)."""
    per_model = _BOUND.setdefault(dit, {})
    key = (backend, freeze, mode)
    if key not in per_model:
        per_model[key] = CompiledLayers(dit, backend, freeze, mode)
    return per_model[key]
