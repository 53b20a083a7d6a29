"""Runtimes: device-specific ways to run a plain :class:`~lmdm.models.dit.DiT`'s layer stack, plugged in from
outside the model.

An engine calls ``runtime.bind(dit)`` once and then calls the result exactly as it would call
:meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>` (same arguments, same outputs within float32
rounding; ``tests/test_runtime.py`` holds every runtime to ``eager``):

- ``eager``: the model's own ``run_layers``.
- ``packed``: oneDNN packed weights and a straight-line block forward for float32 CPU inference
  (:mod:`lmdm.runtime.packed`); the model's path under gradients and elsewhere.
- ``compile``: ``torch.compile`` of ``run_layers`` (:mod:`lmdm.runtime.compiled`), static shapes, never
  under gradients; ``freeze`` on CPU (inference weights pre-packed by inductor, redone when they change).
- ``auto``: ``packed`` on CPU, ``compile`` on CUDA (the fastest on each in ``lmdm bench stream``; see the README).

Private torch APIs appear only inside this package, each with a fallback and a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from lmdm.models.dit import TextKV
from lmdm.models.kv_cache import CacheIO
from lmdm.models.lmm import LayerStack

__all__ = ["RUNTIMES", "LayerRunner", "Runtime", "RuntimeName", "get_runtime", "resolve_runtime"]

RuntimeName = Literal["auto", "eager", "packed", "compile"]
RUNTIMES: tuple[str, ...] = ("eager", "packed", "compile")


class LayerRunner(Protocol):
    """What ``runtime.bind(dit)`` returns: :meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>`'s signature."""

    def __call__(
        self,
        h: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: TextKV | None,
        text_mask: Tensor | None = None,
        cache: CacheIO | None = None,
        outputs_from: int = 0,
    ) -> Tensor: ...


class Runtime(Protocol):
    """A way to run a model's layer stack."""

    @property
    def name(self) -> str: ...

    def bind(self, dit: LayerStack) -> LayerRunner: ...


@dataclass(frozen=True)
class Eager:
    """The model's own ``run_layers``."""

    name: str = "eager"

    def bind(self, dit: LayerStack) -> LayerRunner:
        return dit.run_layers


@dataclass(frozen=True)
class Packed:
    """oneDNN packed weights, straight-line blocks (:mod:`lmdm.runtime.packed`)."""

    name: str = "packed"

    def bind(self, dit: LayerStack) -> LayerRunner:
        from lmdm.runtime.packed import packed_layers

        return packed_layers(dit)


@dataclass(frozen=True)
class Compile:
    """``torch.compile`` of ``run_layers`` (:mod:`lmdm.runtime.compiled`); ``freeze=None``: on for CPU models."""

    name: str = "compile"
    backend: str = "inductor"
    freeze: bool | None = None
    mode: str | None = None

    def bind(self, dit: LayerStack) -> LayerRunner:
        from lmdm.runtime.compiled import compiled_layers

        freeze = self.freeze
        if freeze is None:
            freeze = self.backend == "inductor" and next(dit.parameters()).device.type == "cpu"
        return compiled_layers(dit, self.backend, freeze, self.mode)


def resolve_runtime(name: str, device: torch.device | str) -> str:
    """The concrete runtime ``name`` means on ``device`` (``auto``: ``packed`` on CPU, ``compile`` elsewhere).

    Raises:
        ValueError: an unknown name.
    """
    if name == "auto":
        return "packed" if torch.device(device).type == "cpu" else "compile"
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; expected auto, {', '.join(RUNTIMES)}")
    return name


def get_runtime(name: str = "auto", device: torch.device | str = "cpu") -> Runtime:
    """The runtime called ``name`` for a model on ``device``.

    Raises:
        ValueError: an unknown name.
    """
    concrete = resolve_runtime(name, device)
    if concrete == "packed":
        return Packed()
    if concrete == "compile":
        return Compile()
    return Eager()
