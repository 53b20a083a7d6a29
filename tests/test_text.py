"""Text encoders load from local folders only: the MiniLM shipped in its wheel, and a T5 the test builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmdm.config import ConfigError, load_config
from lmdm.text.encoders import TextEncoderError, build_text_encoder, load_text_encoder


def test_minilm_from_its_wheel() -> None:
    encoder = load_text_encoder("minilm", max_tokens=16)
    out = encoder.encode(["Bach chorale BWV 358, melody alone on violin", ""])
    assert out.tokens.shape == (2, 16, 384) and encoder.dim == 384
    assert out.mask[0].sum() > out.mask[1].sum()
    assert torch.count_nonzero(out.tokens[~out.mask]) == 0  # padding is zeroed
    again = encoder.encode(["Bach chorale BWV 358, melody alone on violin"])
    torch.testing.assert_close(again.tokens[0], out.tokens[0])
    assert len(encoder.fingerprint()) == 64


def test_quickstart_config_builds_the_default_encoder() -> None:
    encoder = build_text_encoder(load_config("quickstart"))
    assert encoder.kind == "minilm" and encoder.max_tokens == 64


def test_width_mismatch_is_a_clear_error() -> None:
    with pytest.raises(TextEncoderError, match=r"gives 384-d tokens but dit.cond_token_dim is 256"):
        build_text_encoder(load_config("quickstart", ["dit.cond_token_dim=256", "dit.width=256"]))


def test_t5_from_a_local_folder(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from lmdm.text.encoders import minilm_path

    torch.manual_seed(0)
    folder = tmp_path / "t5-tiny"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    encoder = load_text_encoder("t5", folder, max_tokens=8)
    out = encoder.encode(["a tiny prompt", "another"])
    assert out.tokens.shape == (2, 8, 32) and encoder.dim == 32
    with torch.no_grad():
        batch = tokenizer(["a tiny prompt"], padding="max_length", truncation=True, max_length=8, return_tensors="pt")
        ref = model.eval()(**batch).last_hidden_state * batch["attention_mask"][..., None]
    torch.testing.assert_close(out.tokens[:1], ref)


def test_missing_folders_never_download(tmp_path: Path) -> None:
    with pytest.raises(TextEncoderError, match="never downloaded"):
        load_text_encoder("t5", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match=r"no \.safetensors weights"):
        load_text_encoder("t5", tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"text: .*encoder 't5' needs text.path"):
        load_config("quickstart", ["text.encoder=t5"])


def test_a_prompt_longer_than_the_encoder_takes_is_a_clear_error() -> None:
    encoder = load_text_encoder("minilm", max_tokens=8)
    with pytest.raises(TextEncoderError, match=r"is \d+ tokens; the text encoder takes at most 8 \(text.max_tokens\)"):
        encoder.encode(["a short one", "a chorale by Bach for four voices, sung slowly by a choir in a large church"])
