"""Oobleck VAE: Stable Audio Open's 1-D convolutional audio autoencoder, and a streaming decoder.

The module tree mirrors stable-audio-tools' ``OobleckEncoder`` / ``OobleckDecoder`` layer for layer,
so a Stable Audio state dict loads after a prefix strip and the weight-norm rename
``weight_g → parametrizations.weight.original0``, ``weight_v → parametrizations.weight.original1``
(see :mod:`lmdm.checkpoints.sao_autoencoder`). Only the configuration Stable Audio Open ships is
built: SnakeBeta activations, transposed-conv upsampling, no anti-aliasing, VAE bottleneck.

Legend:
    B  batch
    C  audio channels (1 mono, 2 stereo)
    T  audio samples, ``T = L * R``
    H  hidden channels of a conv layer
    D  latent channels (``latent_dim``); the encoder emits ``2D`` (mean and scale)
    L  latent frames
    R  ``downsampling_ratio``: audio samples per latent frame, the product of the strides
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from lmdm.config import AudioConfig, AutoencoderConfig
from lmdm.models.snake import SnakeBeta

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "OobleckDecoder",
    "OobleckEncoder",
    "OobleckVAE",
    "Posterior",
    "ResidualUnit",
    "SnakeBeta",
    "StreamingDecoder",
    "build_autoencoder",
    "input_span",
    "output_length",
    "push_together",
    "span_forward",
    "wn_conv1d",
    "wn_conv_transpose1d",
]

STD_FLOOR = 1e-4  # std = softplus(scale) + STD_FLOOR, as in stable-audio-tools' vae_sample
# Training init (see OobleckVAE.reset_for_training): the bottleneck's mean gain makes corpus-level audio
# (about -20 dBFS) give latents of std ~1 instead of ~0.07, and its scale bias starts the posterior at
# std softplus(-5) ≈ 0.007 instead of 0.69.
LATENT_INIT_GAIN = 15.0
SCALE_INIT_BIAS = -5.0
RESIDUAL_DILATIONS = (1, 3, 9)


def wn_conv1d(
    in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dilation: int = 1, padding: int = 0, bias: bool = True
) -> nn.Conv1d:
    """A ``Conv1d`` with weight normalisation (``parametrizations.weight.original0`` = g, ``original1`` = v)."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, padding=padding, bias=bias)
    return cast(nn.Conv1d, weight_norm(conv))


def wn_conv_transpose1d(in_channels: int, out_channels: int, kernel_size: int, *, stride: int, padding: int) -> nn.ConvTranspose1d:
    """A ``ConvTranspose1d`` with weight normalisation over dim 0 (g has shape ``(H_in, 1, 1)``)."""
    conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
    return cast(nn.ConvTranspose1d, weight_norm(conv))


class ResidualUnit(nn.Module):
    """``x + conv1(act(conv7_dilated(act(x))))``; the dilated conv pads ``3·dilation`` on each side."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(channels),
            wn_conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            SnakeBeta(channels),
            wn_conv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, N) → (B, H, N)``."""
        return x + cast(Tensor, self.layers(x))


class EncoderBlock(nn.Module):
    """Three residual units (dilations 1, 3, 9), activation, then a strided conv (kernel ``2s``, padding ``ceil(s/2)``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(ResidualUnit(in_channels, d) for d in RESIDUAL_DILATIONS),
            SnakeBeta(in_channels),
            wn_conv1d(in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H_in, N) → (B, H_out, N / stride)``."""
        return cast(Tensor, self.layers(x))


class DecoderBlock(nn.Module):
    """Activation, transposed conv (kernel ``2s``, stride ``s``, padding ``ceil(s/2)``), three residual units.

    This is stable-audio-tools' default path (``use_nearest_upsample=False``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(in_channels),
            wn_conv_transpose1d(in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
            *(ResidualUnit(out_channels, d) for d in RESIDUAL_DILATIONS),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H_in, N) → (B, H_out, N · stride)`` (for even strides)."""
        return cast(Tensor, self.layers(x))


def _widths(channels: int, c_mults: Sequence[int]) -> list[int]:
    """Hidden widths ``[channels, channels·c_mults[0], …]`` (stable-audio-tools prepends a 1 to ``c_mults``)."""
    return [channels * m for m in (1, *c_mults)]


class OobleckEncoder(nn.Module):
    """Audio → pre-bottleneck latents: conv7, one :class:`EncoderBlock` per stride, activation, conv3."""

    def __init__(self, audio_channels: int, channels: int, c_mults: Sequence[int], strides: Sequence[int], out_channels: int) -> None:
        super().__init__()
        widths = _widths(channels, c_mults)
        self.layers = nn.Sequential(
            wn_conv1d(audio_channels, widths[0], 7, padding=3),
            *(EncoderBlock(widths[i], widths[i + 1], s) for i, s in enumerate(strides)),
            SnakeBeta(widths[-1]),
            wn_conv1d(widths[-1], out_channels, 3, padding=1),
        )

    def forward(self, audio: Tensor) -> Tensor:
        """``(B, C, T) → (B, 2D, L)`` with ``L = T / R``."""
        return cast(Tensor, self.layers(audio))


class OobleckDecoder(nn.Module):
    """Latents → audio: conv7, one :class:`DecoderBlock` per stride (reversed), activation, conv7 (no bias), optional tanh."""

    def __init__(
        self, audio_channels: int, channels: int, c_mults: Sequence[int], strides: Sequence[int], latent_dim: int, final_tanh: bool = False
    ) -> None:
        super().__init__()
        widths = _widths(channels, c_mults)
        depth = len(strides)
        self.audio_channels = audio_channels
        self.downsampling_ratio = math.prod(strides)
        self.layers = nn.Sequential(
            wn_conv1d(latent_dim, widths[-1], 7, padding=3),
            *(DecoderBlock(widths[i], widths[i - 1], strides[i - 1]) for i in range(depth, 0, -1)),
            SnakeBeta(widths[0]),
            wn_conv1d(widths[0], audio_channels, 7, padding=3, bias=False),
            nn.Tanh() if final_tanh else nn.Identity(),
        )

    def forward(self, latents: Tensor) -> Tensor:
        """``(B, D, L) → (B, C, L · R)``."""
        return cast(Tensor, self.layers(latents))

    def forward_span(self, latents: Tensor, start: int, stop: int) -> Tensor:
        """Audio samples ``start … stop - 1`` of :meth:`forward`, computing at each layer only what they read.

        ``(B, D, L) → (B, C, stop - start)``, equal to ``self(latents)[..., start:stop]`` to float rounding
        (see :func:`span_forward`).
        """
        return span_forward(self.layers, latents, start, stop - 1)

    def receptive_field(self) -> tuple[int, int]:
        """Latent frames an audio frame reads, from the layer geometry (edges and zero padding ignored).

        Returns:
            ``(left, right)``: the ``R`` audio samples of latent frame ``f`` depend on latent frames
            ``f - left … f + right`` and on no others.
        """
        first, last = input_span(self.layers, 0, self.downsampling_ratio - 1)
        return -first, last


def input_span(module: nn.Module, first: int, last: int) -> tuple[int, int]:
    """Input indices that output indices ``first … last`` of ``module`` read, on an unbounded signal.

    Convs map ``y[n] = Σ_k w[k] x[n·s − p + k·d]``; transposed convs ``y[n] = Σ x[i] w[k]`` over
    ``i·s − p + k·d = n``; pointwise layers keep the span; residual units take the union with the skip.

    Raises:
        TypeError: for a layer type this function does not know.
    """
    if isinstance(module, nn.ConvTranspose1d | nn.Conv1d):
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        p = cast(tuple[int], module.padding)[0]
        reach = (k - 1) * d
        if isinstance(module, nn.ConvTranspose1d):
            return -((reach - first - p) // s), (last + p) // s  # ceil((first + p - reach) / s), floor(...)
        return first * s - p, last * s - p + reach
    if isinstance(module, nn.Sequential):
        for layer in reversed(module):
            first, last = input_span(layer, first, last)
        return first, last
    if isinstance(module, ResidualUnit):
        inner_first, inner_last = input_span(module.layers, first, last)
        return min(first, inner_first), max(last, inner_last)
    if isinstance(module, EncoderBlock | DecoderBlock | OobleckEncoder | OobleckDecoder):
        return input_span(module.layers, first, last)
    if isinstance(module, SnakeBeta | nn.Identity | nn.Tanh):
        return first, last
    raise TypeError(f"input_span: unknown layer type {type(module).__name__}")


def output_length(module: nn.Module, n: int) -> int:
    """Output length of ``module`` for an input of ``n`` steps (the layer types :func:`input_span` knows).

    Raises:
        TypeError: for a layer type this function does not know.
    """
    if isinstance(module, nn.ConvTranspose1d | nn.Conv1d):
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        p = cast(tuple[int], module.padding)[0]
        if isinstance(module, nn.ConvTranspose1d):
            return (n - 1) * s - 2 * p + d * (k - 1) + cast(tuple[int], module.output_padding)[0] + 1
        return (n + 2 * p - d * (k - 1) - 1) // s + 1
    if isinstance(module, nn.Sequential):
        for layer in module:
            n = output_length(layer, n)
        return n
    if isinstance(module, EncoderBlock | DecoderBlock | OobleckEncoder | OobleckDecoder):
        return output_length(module.layers, n)
    if isinstance(module, ResidualUnit | SnakeBeta | nn.Identity | nn.Tanh):
        return n
    raise TypeError(f"output_length: unknown layer type {type(module).__name__}")


def span_forward(module: nn.Module, x: Tensor, first: int, last: int, offset: int = 0, length: int | None = None) -> Tensor:
    """Outputs ``first … last`` of ``module`` on a signal, computing at each layer only the span they read.

    The signal is ``length`` steps long (zero outside, as the layers' zero padding sees it); ``x``
    ``(B, H, N)`` holds its steps ``offset … offset + N - 1``, which must cover what the outputs read
    (:func:`input_span`, clipped to the signal). Each layer runs on its needed input span with the zero
    padding made explicit, so the result equals ``module(signal)[..., first:last + 1]`` to float
    rounding: a streaming decoder that emits ``n`` new frames per push then computes about ``n`` frames'
    worth at the audio rate, instead of its whole window (which re-decodes ``context + lookahead`` frames).

    Args:
        module: a conv, transposed conv, pointwise layer, residual unit, block or ``nn.Sequential`` of them.
        x: ``(B, H, N)`` input steps ``offset …``.
        first, last: output steps wanted, ``0 <= first <= last < output_length(module, length)``.
        offset: the signal step ``x[..., 0]`` holds.
        length: the signal's length (default ``offset + N``).

    Returns:
        ``(B, H_out, last - first + 1)``.

    Raises:
        ValueError: an output span outside the signal, or an ``x`` that does not cover its input span.
        TypeError: for a layer type :func:`input_span` does not know.
    """
    n_in = offset + x.shape[-1] if length is None else length
    n_out = output_length(module, n_in)
    if not 0 <= first <= last < n_out:
        raise ValueError(f"span_forward: outputs {first} … {last} are not inside the {n_out} outputs of {type(module).__name__}")
    return _span_forward(module, x, first, last, offset, n_in)


def _span_forward(module: nn.Module, x: Tensor, first: int, last: int, offset: int, n_in: int) -> Tensor:
    """:func:`span_forward` without re-checking the span (its callers clip every span to the signal)."""
    if isinstance(module, nn.Sequential | EncoderBlock | DecoderBlock | OobleckEncoder | OobleckDecoder):
        layers = list(module.layers if not isinstance(module, nn.Sequential) else module)
        lengths = [n_in]
        for layer in layers:
            lengths.append(output_length(layer, lengths[-1]))
        spans = [(first, last)]
        for layer, n in zip(reversed(layers), reversed(lengths[:-1]), strict=True):  # what each layer's input must hold
            a, b = input_span(layer, *spans[-1])
            spans.append((max(a, 0), min(b, n - 1)))
        spans.reverse()  # spans[i]: the steps layer i reads (clipped), spans[i + 1]: the outputs it computes
        for i, layer in enumerate(layers):
            x = _span_forward(layer, x, *spans[i + 1], offset, lengths[i])
            offset = spans[i + 1][0]
        return x
    a, b = input_span(module, first, last)
    if isinstance(module, nn.ConvTranspose1d):
        (s,), (d,), p = module.stride, module.dilation, cast(tuple[int], module.padding)[0]
        if a > b or first + p < a * s or last + p > b * s + (module.kernel_size[0] - 1) * d:  # an end no input reaches
            raise ValueError(f"span_forward: {module} has outputs no input reaches (kernel shorter than stride): not supported")
    lo, hi = max(a, 0), min(b, n_in - 1)  # the part of the read span inside the signal
    if lo < offset or hi >= offset + x.shape[-1]:
        raise ValueError(f"span_forward: {type(module).__name__} reads steps {lo} … {hi}, x holds {offset} … {offset + x.shape[-1] - 1}")
    inside = x[..., lo - offset : hi - offset + 1]
    if isinstance(module, ResidualUnit):
        return x[..., first - offset : last - offset + 1] + _span_forward(module.layers, inside, first, last, lo, n_in)
    if isinstance(module, SnakeBeta | nn.Identity | nn.Tanh):
        return cast(Tensor, module(inside))
    assert isinstance(module, nn.Conv1d | nn.ConvTranspose1d)
    padded = F.pad(inside, (lo - a, b - hi)) if (lo - a or b - hi) else inside  # the zero padding, explicit
    if isinstance(module, nn.Conv1d):
        return F.conv1d(padded, module.weight, module.bias, stride=module.stride, dilation=module.dilation)
    y = F.conv_transpose1d(padded, module.weight, module.bias, stride=s, dilation=d)  # y[m] is output a·s − p + m
    return y[..., first - a * s + p : last - a * s + p + 1]


@dataclass(frozen=True)
class Posterior:
    """Diagonal Gaussian over latents, from the VAE bottleneck.

    Attributes:
        mean: ``(B, D, L)``.
        std: ``(B, D, L)``, ``softplus(scale) + 1e-4`` (strictly positive).
    """

    mean: Tensor
    std: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std · ε`` with ``ε ~ N(0, I)`` drawn from ``generator``; ``(B, D, L)``."""
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> Tensor:
        """KL to ``N(0, I)`` as stable-audio-tools computes it: ``(mean² + var − log var − 1)`` summed over D, averaged over B and L.

        Returns:
            A scalar tensor (it is twice the textbook KL, kept for loss-weight parity).
        """
        var = self.std * self.std
        return (self.mean * self.mean + var - torch.log(var) - 1).sum(1).mean()


class OobleckVAE(nn.Module):
    """Encoder, VAE bottleneck and decoder with the Stable Audio Open layout.

    Args:
        audio_channels: C, 1 (mono) or 2 (stereo).
        channels: base hidden width; block ``i`` runs at ``channels · c_mults[i]``.
        c_mults: width multiplier per block.
        strides: down/upsampling factor per block; even, one per entry of ``c_mults``.
        latent_dim: D, latent channels (the encoder emits ``2D``: mean, then scale).
        final_tanh: end the decoder with ``tanh``.

    Raises:
        ValueError: mismatched ``c_mults``/``strides`` lengths, or an odd or non-positive stride
            (the transposed conv of kernel ``2s``, padding ``ceil(s/2)`` returns ``L·s − 1`` samples for odd ``s``).
    """

    def __init__(
        self,
        audio_channels: int,
        channels: int,
        c_mults: Sequence[int],
        strides: Sequence[int],
        latent_dim: int,
        final_tanh: bool = False,
    ) -> None:
        super().__init__()
        if len(c_mults) != len(strides) or not strides:
            raise ValueError(f"c_mults {list(c_mults)} and strides {list(strides)} must be non-empty and of equal length")
        if any(s < 2 or s % 2 for s in strides):
            raise ValueError(f"strides must be even and >= 2 so decoding returns exactly L·R samples, got {list(strides)}")
        self._latent_dim = latent_dim
        self.audio_channels = audio_channels
        # Flat constructor arguments, saved in checkpoints' config.json.
        self.init_args = {
            "audio_channels": audio_channels,
            "channels": channels,
            "c_mults": list(c_mults),
            "strides": list(strides),
            "latent_dim": latent_dim,
            "final_tanh": final_tanh,
        }
        self.encoder = OobleckEncoder(audio_channels, channels, c_mults, strides, 2 * latent_dim)
        self.decoder = OobleckDecoder(audio_channels, channels, c_mults, strides, latent_dim, final_tanh)
        self.reset_for_training()

    @torch.no_grad()
    def reset_for_training(self) -> None:
        """Initialise so that the decoder's output depends on the latents from the first step.

        PyTorch's default init gives every conv a random bias (as DAC does, we zero them instead) and
        the bottleneck latents of std ~0.07 under a posterior of std ~0.69: the decoder then sees
        biases and noise, outputs one input-independent pattern, and stays there (measured on the
        built-in corpus: identical reconstructions of every clip after 300 steps at lr 2e-3). Here
        ``decode(0) == 0``, latents have std ~1 and the posterior starts narrow. Loaded weights
        (our checkpoints, Stable Audio imports) replace all of this.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv1d | nn.ConvTranspose1d) and module.bias is not None:
                module.bias.zero_()
        bottleneck = cast(nn.Conv1d, self.encoder.layers[-1])
        D = self.latent_dim
        gain = cast(Tensor, bottleneck.get_parameter("parametrizations.weight.original0"))  # weight norm's g, (2D, 1, 1)
        gain[:D] *= LATENT_INIT_GAIN
        assert bottleneck.bias is not None
        bottleneck.bias[D:] = SCALE_INIT_BIAS

    @property
    def downsampling_ratio(self) -> int:
        """R, audio samples per latent frame."""
        return self.decoder.downsampling_ratio

    @property
    def latent_dim(self) -> int:
        """D, latent channels."""
        return self._latent_dim

    def encode(self, audio: Tensor) -> Posterior:
        """Encode audio into a latent posterior.

        Args:
            audio: ``(B, C, T)`` with ``T`` a multiple of ``downsampling_ratio``.

        Returns:
            :class:`Posterior` with ``mean``, ``std`` of shape ``(B, D, T / R)``.

        Raises:
            ValueError: wrong channel count or a length that is not a multiple of R.
        """
        _, C, T = audio.shape  # (B, C, T)
        if self.audio_channels != C or T % self.downsampling_ratio:
            raise ValueError(
                f"encode expects (B, {self.audio_channels}, T) with T a multiple of {self.downsampling_ratio}, got {tuple(audio.shape)}; "
                "pad the audio to a whole number of latent frames"
            )
        mean, scale = self.encoder(audio).chunk(2, dim=1)  # (B, D, L) each
        return Posterior(mean=mean, std=F.softplus(scale) + STD_FLOOR)

    def decode(self, latents: Tensor) -> Tensor:
        """Decode latents to audio.

        Args:
            latents: ``(B, D, L)``.

        Returns:
            ``(B, C, L · R)`` audio.

        Raises:
            ValueError: when the latent channel count is not D.
        """
        self._check_latents(latents)
        return cast(Tensor, self.decoder(latents))

    def decode_span(self, latents: Tensor, start: int, stop: int) -> Tensor:
        """Audio samples ``start … stop - 1`` of :meth:`decode`, computing only what they read (:func:`span_forward`).

        Args:
            latents: ``(B, D, L)``.
            start, stop: ``0 <= start < stop <= L · R``.

        Returns:
            ``(B, C, stop - start)``, equal to ``decode(latents)[..., start:stop]`` to float rounding.

        Raises:
            ValueError: for latent channels other than D, or a span outside the audio.
        """
        self._check_latents(latents)
        return self.decoder.forward_span(latents, start, stop)

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 3 or latents.shape[1] != self.latent_dim:
            raise ValueError(f"decode expects latents (B, {self.latent_dim}, L), got {tuple(latents.shape)}")


class StreamingDecoder:
    """Decodes a latent stream block by block; the concatenated audio equals ``vae.decode`` of the whole stream.

    The decoder is non-causal: the audio of latent frame ``f`` reads frames ``f - context … f + lookahead``
    (:meth:`OobleckDecoder.receptive_field`). Each :meth:`push` appends a block to a window that keeps
    the last ``context`` frames before the first unemitted one, decodes the window, and returns the audio
    of every frame whose lookahead has arrived. So audio for frame ``f`` comes out once frame
    ``f + lookahead`` is pushed: a latency of ``lookahead`` latent frames (``latency_samples`` samples)
    on top of compute. :meth:`flush` ends the stream and returns the held-back frames, decoded with the
    same right edge as a batch decode. Per push, the window holds at most ``context + lookahead + n``
    frames, but each layer computes only the span the new audio reads (:meth:`OobleckVAE.decode_span`):
    at the audio rate, where a decoder spends most of its time, that is the ``n`` new frames plus a
    few samples, not the whole window. For Stable Audio Open's decoder (strides 2, 4, 4, 8, 8) context
    and lookahead are 10 frames each: 20480 samples, about 0.46 s at 44.1 kHz.

    Usage::

        stream = StreamingDecoder(vae)
        chunks = [stream.push(block) for block in blocks] + [stream.flush()]
        audio = torch.cat(chunks, dim=-1)  # == vae.decode(torch.cat(blocks, dim=-1))
    """

    def __init__(self, vae: OobleckVAE) -> None:
        self.vae = vae
        self.context, self.lookahead = vae.decoder.receptive_field()
        self.hop = vae.downsampling_ratio
        self._window: Tensor | None = None  # (B, D, W): latent frames start … received - 1
        self._start = 0
        self._received = 0
        self._emitted = 0

    @property
    def latency_samples(self) -> int:
        """Audio samples held back until the lookahead frames arrive: ``lookahead · R``."""
        return self.lookahead * self.hop

    def reset(self) -> None:
        """Forget the stream; the next :meth:`push` starts a new one at frame 0."""
        self._window = None
        self._start = self._received = self._emitted = 0

    def prime(self, latents: Tensor) -> None:
        """Start a stream that continues ``latents`` ``(B, D, n)`` whose audio was already heard (a session that
        resumes from a client's audio): nothing of them is emitted, and the next :meth:`push` returns audio from
        their end on, decoded with them as its left context (no seam from a cold start)."""
        _, D, n = latents.shape
        if self.vae.latent_dim != D or n < 1:
            raise ValueError(f"prime expects latents (B, {self.vae.latent_dim}, n >= 1), got {tuple(latents.shape)}")
        keep = min(n, self.context)
        self._window = latents[..., n - keep :]
        self._start = n - keep
        self._received = self._emitted = n

    def push(self, latents: Tensor) -> Tensor:
        """Append the next block of latent frames and return the audio that is now final.

        Args:
            latents: ``(B, D, n)``, ``n >= 1``, the frames after those already pushed.

        Returns:
            ``(B, C, m · R)`` audio for frames ``emitted … received - lookahead - 1`` (``m`` may be 0).

        Raises:
            ValueError: a block with the wrong rank, channels, batch size or no frames.
        """
        window, ready = self._append(latents)
        return self._emit(window, ready)

    def _append(self, latents: Tensor) -> tuple[Tensor, int]:
        """The window with ``latents`` appended and the frame up to which audio is now final (counted received)."""
        B, D, n = latents.shape
        if self.vae.latent_dim != D or n < 1 or (self._window is not None and self._window.shape[0] != B):
            expected_batch = "B" if self._window is None else str(self._window.shape[0])
            raise ValueError(f"push expects latents ({expected_batch}, {self.vae.latent_dim}, n >= 1), got {tuple(latents.shape)}")
        window = latents if self._window is None else torch.cat((self._window, latents), dim=-1)
        self._received += n
        return window, self._received - self.lookahead

    def flush(self) -> Tensor:
        """End the stream: the audio of the last ``lookahead`` frames, ``(B, C, m · R)``; then :meth:`reset`.

        Raises:
            RuntimeError: when nothing was pushed.
        """
        if self._window is None:
            raise RuntimeError("flush() called before any push()")
        audio = self._emit(self._window, self._received)
        self.reset()
        return audio

    def _emit(self, window: Tensor, ready: int) -> Tensor:
        """Decode ``window`` (frames ``start …``) and return frames ``emitted … ready - 1``; trim the window."""
        span = self._span(ready)
        audio = window.new_zeros(window.shape[0], self.vae.audio_channels, 0) if span is None else self.vae.decode_span(window, *span)
        self._keep(window, ready)
        return audio

    def _span(self, ready: int) -> tuple[int, int] | None:
        """The samples of the window to decode for frames ``emitted … ready − 1`` (``None``: nothing new)."""
        if ready <= self._emitted:
            return None
        # only the new frames' audio, each layer on the span it needs (not the whole window)
        return (self._emitted - self._start) * self.hop, (ready - self._start) * self.hop

    def _keep(self, window: Tensor, ready: int) -> None:
        """After emitting up to ``ready``: keep the window's last ``context`` frames before it."""
        if ready <= self._emitted:
            self._window = window
            return
        self._emitted = ready
        keep_from = max(self._start, ready - self.context)
        self._window = window[..., keep_from - self._start :]
        self._start = keep_from


def push_together(decoders: list[StreamingDecoder], latents: list[Tensor]) -> list[Tensor]:
    """:meth:`StreamingDecoder.push` of one block into each of several streams' decoders (one autoencoder), the
    streams whose windows line up decoded as one batch: the same frames held, emitted and final, as for every
    stream past its first blocks when they push blocks of one length. Each returns the audio its own push
    would (a served replica decodes its sessions' blocks together).

    Raises:
        ValueError: decoders of different autoencoders, or a block :meth:`~StreamingDecoder.push` refuses.
    """
    if len({id(d.vae) for d in decoders}) > 1:
        raise ValueError("push_together decodes with one autoencoder: every decoder must share it")
    appended = [d._append(x) for d, x in zip(decoders, latents, strict=True)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (d, (window, ready)) in enumerate(zip(decoders, appended, strict=True)):
        span = d._span(ready)
        key = (window.shape[-1], *span) if span is not None else (-1, i)  # nothing to decode: alone, no work
        groups.setdefault(key, []).append(i)
    out: list[Tensor | None] = [None] * len(decoders)
    for members in groups.values():
        first = decoders[members[0]]
        span = first._span(appended[members[0]][1])
        if span is None:
            window = appended[members[0]][0]
            out[members[0]] = window.new_zeros(window.shape[0], first.vae.audio_channels, 0)
        else:
            windows = [appended[i][0] for i in members]
            audio = first.vae.decode_span(torch.cat(windows), *span)
            for i, part in zip(members, torch.split(audio, [w.shape[0] for w in windows]), strict=True):
                out[i] = part
        for i in members:
            decoders[i]._keep(*appended[i])
    return [a for a in out if a is not None]


def build_autoencoder(cfg: AutoencoderConfig, audio_cfg: AudioConfig) -> OobleckVAE:
    """Build the VAE from config (``final_tanh`` off, as in Stable Audio Open)."""
    return OobleckVAE(
        audio_channels=audio_cfg.channels,
        channels=cfg.channels,
        c_mults=cfg.channel_mults,
        strides=cfg.strides,
        latent_dim=cfg.latent_channels,
    )
