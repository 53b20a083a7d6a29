"""Enumerate LAION-CLAP's own state-dict keys (and, optionally, a tiny random model's embeddings) with
laion_clap's own model code, for the fixtures of tests/test_clap.py. Not part of the package.

laion_clap 1.1.7 does not import here as published (it imports torchvision, h5py and wget, and builds
RoBERTa with ``from_pretrained('roberta-base')``), so this script installs nothing and stubs only what
the model code never calls: ``torchvision.ops.misc.FrozenBatchNorm2d`` (used by the ResNet towers) and
``h5py`` (dataset helpers), and builds RoBERTa from roberta-base's configuration instead of the hub.

    pip install --no-deps --target /tmp/lc laion_clap==1.1.7 torchlibrosa==0.1.0
    PYTHONPATH=/tmp/lc python tools/clap_reference.py keys tests/fixtures/clap/htsat_base_keys.json
    PYTHONPATH=/tmp/lc python tools/clap_reference.py tiny tests/fixtures/clap/tiny_laion

``keys`` writes the key names and shapes of the HTSAT-base + RoBERTa model that LAION's music
checkpoints (``music_audioset_epoch_15_esc_90.14.pt`` and kin) hold. ``tiny`` writes a small random
HTSAT + RoBERTa model in LAION's ``.pt`` layout and its embeddings of fixed inputs, made by laion_clap's
own forward pass.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn


def _stub_imports() -> None:
    """Empty stand-ins for the imports laion_clap's model code makes but never calls on this path."""
    if getattr(sys.modules.get("laion_clap"), "stubbed", False):
        return
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.Module,), {})  # type: ignore[attr-defined]
    for name, module in {
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.ops": types.ModuleType("torchvision.ops"),
        "torchvision.ops.misc": misc,
        "h5py": types.ModuleType("h5py"),
    }.items():
        sys.modules.setdefault(name, module)
    # The packages' own __init__ files import the training and data code (webdataset, wget, ...): load
    # the model modules without them.
    root = Path(importlib.util.find_spec("laion_clap").submodule_search_locations[0])  # type: ignore[index, union-attr]
    for name, folder in (("laion_clap", root), ("laion_clap.clap_module", root / "clap_module")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]  # type: ignore[attr-defined]
        package.stubbed = True  # type: ignore[attr-defined]
        sys.modules[name] = package


def _roberta_base() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    return RobertaModel(config)


def build(audio_cfg: dict, text_model: nn.Module, embed_dim: int, joint_embed_shape: int = 512) -> nn.Module:
    """laion_clap's ``CLAP`` as its ``create_model`` builds it (``embed_dim`` from the model config's JSON)."""
    _stub_imports()
    import transformers
    from laion_clap.clap_module.model import CLAP  # type: ignore[import-not-found]

    original = transformers.RobertaModel.from_pretrained
    transformers.RobertaModel.from_pretrained = staticmethod(lambda *a, **k: text_model)  # type: ignore[method-assign]
    import laion_clap.clap_module.model as model_module  # type: ignore[import-not-found]

    model_module.RobertaModel.from_pretrained = staticmethod(lambda *a, **k: text_model)
    try:
        text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "model_type": "roberta"}
        return CLAP(embed_dim=embed_dim, audio_cfg=audio_cfg, text_cfg=text_cfg, joint_embed_shape=joint_embed_shape).eval()
    finally:
        transformers.RobertaModel.from_pretrained = original  # type: ignore[method-assign]


HTSAT_BASE = {
    "audio_length": 1024, "clip_samples": 480000, "mel_bins": 64, "sample_rate": 48000, "window_size": 1024,
    "hop_size": 480, "fmin": 50, "fmax": 14000, "class_num": 527, "model_type": "HTSAT", "model_name": "base",
}  # fmt: skip


def write_keys(out: Path) -> None:
    torch.manual_seed(0)
    model = build(HTSAT_BASE, _roberta_base(), embed_dim=1024)  # HTSAT-base.json
    keys = {f"module.{k}": list(v.shape) for k, v in model.state_dict().items()}  # LAION saved from DDP
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source": "laion_clap 1.1.7 CLAP(HTSAT-base, roberta), state_dict()", "keys": keys}, indent=0))
    print(f"{len(keys)} keys -> {out}")


# The tiny model: HTSAT's input geometry (64 mel bins, 10 s at 48 kHz, a 256-pixel spectrogram image) with
# narrow towers, and a narrow RoBERTa (the text projection is rebuilt for its width).
TINY = {
    "audio": {"patch_embeds_hidden_size": 8, "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2], "hidden_size": 64},
    "text": {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 40, "type_vocab_size": 1, "layer_norm_eps": 1e-5},
    "projection_dim": 16,
}  # fmt: skip
TINY_CLASSES = 5


def tiny_waveforms() -> torch.Tensor:
    """Two fixed 10-s clips at 48 kHz, ``(2, 480000)`` (the test makes the same ones)."""
    t = torch.arange(480000, dtype=torch.float64) / 48000
    first = 0.3 * torch.sin(2 * torch.pi * 220.0 * t) + 0.1 * torch.sin(2 * torch.pi * 3000.0 * t)
    second = 0.2 * torch.sin(2 * torch.pi * 440.0 * t * (1 + 0.1 * t))  # a rising sweep
    return torch.stack([first, second]).float()


TINY_TOKENS = [[0, 5, 9, 17, 2, 1, 1, 1], [0, 33, 2, 1, 1, 1, 1, 1]]  # <s> ... </s> then <pad> (id 1)


def write_tiny(folder: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    _stub_imports()
    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer  # type: ignore[import-not-found]

    torch.manual_seed(0)
    text = TINY["text"]
    roberta = RobertaModel(RobertaConfig(**text, pad_token_id=1, bos_token_id=0, eos_token_id=2))
    audio_cfg = {**HTSAT_BASE, "class_num": TINY_CLASSES, "model_name": "tiny"}
    model = build(audio_cfg, roberta, embed_dim=768)  # HTSAT-tiny.json; both towers are replaced below
    audio = TINY["audio"]
    model.audio_branch = HTSAT_Swin_Transformer(
        spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=TINY_CLASSES, embed_dim=audio["patch_embeds_hidden_size"],
        depths=audio["depths"], num_heads=audio["num_attention_heads"], window_size=8, config=model.audio_cfg,
    )  # fmt: skip
    joint = TINY["projection_dim"]
    model.audio_projection = nn.Sequential(nn.Linear(audio["hidden_size"], joint), nn.ReLU(), nn.Linear(joint, joint))
    model.text_projection = nn.Sequential(nn.Linear(text["hidden_size"], joint), nn.ReLU(), nn.Linear(joint, joint))
    model.text_transform = nn.Identity()
    model.audio_transform = nn.Identity()
    model.joint_embed_shape = joint
    with torch.no_grad():
        for parameter in model.parameters():  # LAION's init leaves the tiny towers near-degenerate
            if parameter.requires_grad:  # not the frozen STFT and mel filters
                parameter.add_(0.05 * torch.randn_like(parameter))
        # bn0's running statistics as a trained model has them (a fresh one has mean 0, variance 1)
        model.audio_branch.bn0.running_mean.uniform_(-40.0, -10.0)
        model.audio_branch.bn0.running_var.uniform_(50.0, 200.0)
    model.eval()
    ids = torch.tensor(TINY_TOKENS)
    with torch.no_grad():
        audio_embeds = model.get_audio_embedding([{"waveform": w} for w in tiny_waveforms()])
        text_embeds = model.get_text_embedding({"input_ids": ids, "attention_mask": (ids != 1).long()})
    folder.mkdir(parents=True, exist_ok=True)
    # The STFT's fixed DFT bases (1M numbers, rebuilt by torchlibrosa from the window size) are left out to
    # keep the fixture small; htsat_base_keys.json has them, and the loader skips them either way.
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items() if "spectrogram_extractor" not in k}
    # LAION's envelope: the epoch, the weights, and a NumPy scalar beside them (as their training loop saved).
    import numpy as np

    torch.save({"epoch": 1, "state_dict": state, "best_metric": np.float64(0.5)}, folder / "tiny_laion.pt")
    (folder / "tiny_laion.json").write_text(
        json.dumps(
            {
                "source": "laion_clap 1.1.7 CLAP (HTSAT + roberta towers, narrowed), get_audio_embedding / get_text_embedding",
                "config": TINY,
                "tokens": TINY_TOKENS,
                "audio_embeddings": audio_embeds.tolist(),
                "text_embeddings": text_embeds.tolist(),
            },
            indent=1,
        )
    )
    print(f"{len(state)} tensors, {sum(v.numel() for v in state.values())} numbers -> {folder}")


if __name__ == "__main__":
    if sys.argv[1] == "keys":
        write_keys(Path(sys.argv[2]))
    elif sys.argv[1] == "tiny":
        write_tiny(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}: keys or tiny")
