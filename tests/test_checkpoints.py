"""Our checkpoint format and the Stable Audio DiT import, held against frozen stable-audio-tools outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdm.checkpoints.errors import CheckpointError
from lmdm.checkpoints.format import load_checkpoint, read_checkpoint_info, save_checkpoint
from lmdm.checkpoints.sao_dit import import_sao, load_sao_diffusion
from lmdm.models.autoencoder import OobleckVAE
from lmdm.models.conditioners import NumberConditioners
from lmdm.models.dit import DiT, DiTArgs

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # frozen Stable Audio references (fixtures/README.md)
DIT_FIXTURE = FIXTURES / "sao_dit_tiny"


def test_sao_dit_import_reproduces_stable_audio_tools_outputs() -> None:
    imported = load_sao_diffusion(DIT_FIXTURE)
    ref = load_file(str(DIT_FIXTURE / "reference.safetensors"))
    with torch.no_grad():
        y = imported.dit(ref["x"], ref["t"], cross_attn_cond=ref["cross_attn_cond"], global_embed=ref["global_embed"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-4, atol=1e-5)
    assert imported.spec.objective == "rectified_flow" and imported.spec.dit.head_dim == 64


def copy_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "sao"
    shutil.copytree(DIT_FIXTURE, folder)
    return folder


def test_wrong_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.model.transformer.layers.1.ff.ff.2.bias")
    state["model.model.transformer.layers.0.self_attn.to_qkv.weight"] = torch.zeros(3, 3)
    state["model.model.transformer.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_sao_diffusion(folder)
    msg = str(info.value)
    assert "missing (1):\n    transformer.layers.1.ff.ff.2.bias [128]" in msg
    assert "unexpected (1):\n    transformer.layers.0.extra.weight [2]" in msg
    assert "transformer.layers.0.self_attn.to_qkv.weight: file [3, 3], model expects [384, 128]" in msg


def test_unsupported_config_option_names_the_key(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "model_config.json").read_text())
    config["model"]["diffusion"]["config"]["global_cond_type"] = "adaLN"
    (folder / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.diffusion.config.global_cond_type = 'adaLN' is not supported"):
        load_sao_diffusion(folder)


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"only \.safetensors weights are read"):
        load_sao_diffusion(DIT_FIXTURE, tmp_path / "model.ckpt")


def test_import_sao_writes_our_format(tmp_path: Path) -> None:
    written = import_sao(DIT_FIXTURE, tmp_path / "out")
    assert set(written) == {"dit"}
    dit, _ = load_checkpoint(written["dit"])
    assert isinstance(dit, DiT) and read_checkpoint_info(written["dit"]).trained.objective == "rectified_flow"
    ref = load_file(str(DIT_FIXTURE / "reference.safetensors"))
    with torch.no_grad():
        y = dit(ref["x"], ref["t"], cross_attn_cond=ref["cross_attn_cond"], global_embed=ref["global_embed"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-4, atol=1e-5)


def test_our_format_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dit = DiT(DiTArgs(io_channels=4, width=64, depth=2, head_dim=32, cond_token_dim=32, input_concat_dim=5))
    vae = OobleckVAE(1, 8, [1, 2], [2, 4], 4)
    numbers = NumberConditioners({"seconds_total": (32, 0.0, 512.0)})
    for model in (dit, vae, numbers):
        folder = save_checkpoint(tmp_path / type(model).__name__, model, {"step": 3})
        loaded, meta = load_checkpoint(folder)
        assert meta == {"step": 3} and type(loaded) is type(model)
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 4, 6)
    t = torch.rand(2)
    loaded_dit, _ = load_checkpoint(tmp_path / "DiT")
    torch.testing.assert_close(
        loaded_dit(x, t, input_concat_cond=torch.zeros(2, 5, 6)), dit.eval()(x, t, input_concat_cond=torch.zeros(2, 5, 6))
    )


def test_our_format_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(tmp_path / "d", DiT(DiTArgs(io_channels=4, width=64, depth=1, head_dim=32)))
    config = json.loads((folder / "config.json").read_text())
    config["args"]["depth"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing \(\d+\):\n    transformer.layers.1"):
        load_checkpoint(folder)
    config["kind"] = "nope"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'nope'"):
        load_checkpoint(folder)


def test_number_conditioner_formula() -> None:
    numbers = NumberConditioners({"seconds_total": (8, 0.0, 10.0)})
    cond = numbers["seconds_total"]
    fourier, linear = cond.embedder.embedding[0], cond.embedder.embedding[1]
    values = torch.tensor([5.0, 20.0])
    x = torch.tensor([0.5, 1.0])  # clamped to max, normalised
    f = x[:, None] * fourier.weights[None] * 2 * torch.pi
    expected = linear(torch.cat([x[:, None], f.sin(), f.cos()], dim=-1))[:, None]
    torch.testing.assert_close(cond(values), expected)


def test_widen_inputs_keeps_imported_weights_and_adds_zeros() -> None:
    """A DiT without conditioning inputs (a Stable Audio import) maps onto an LMDM's wider inputs: every
    imported tensor unchanged, the added ones zero, and the same output whatever the new channels hold."""
    from lmdm.checkpoints.compat import widen_inputs

    torch.manual_seed(0)
    narrow = DiT(DiTArgs(io_channels=4, width=64, depth=1, head_dim=32)).eval()
    torch.nn.init.normal_(narrow.preprocess_conv.weight)  # non-zero, so the zero blocks are visible
    args = DiTArgs(io_channels=4, width=64, depth=1, head_dim=32, input_concat_dim=5)
    state = widen_inputs(narrow.state_dict(), args)
    wide = DiT(args).eval()
    wide.load_state_dict(state)
    for key, old in narrow.state_dict().items():
        new = wide.state_dict()[key]
        if key == "transformer.project_in.weight":
            assert torch.equal(new[:, :4], old) and not new[:, 4:].any()
        elif key == "preprocess_conv.weight":
            assert torch.equal(new[:4, :4], old) and not new[4:].any() and not new[:, 4:].any()
        else:
            assert torch.equal(new, old)
    x, t = torch.randn(2, 4, 6), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(wide(x, t, input_concat_cond=torch.randn(2, 5, 6)), narrow(x, t), rtol=0, atol=0)


def test_train_init_mismatches_name_both_sides(tmp_path: Path) -> None:
    from lmdm.checkpoints.compat import check_init
    from lmdm.checkpoints.format import TrainedWith, read_checkpoint_info

    args = DiTArgs(io_channels=4, width=64, depth=1, head_dim=32, cond_token_dim=32, input_concat_dim=5)
    base = TrainedWith(stage="base", objective="v", autoencoder="a" * 64, text_encoder="t" * 64)
    folder = save_checkpoint(tmp_path / "base", DiT(args), trained=base)
    info = read_checkpoint_info(folder)
    ok = dict(stage="lmdm", args=args, objective="v", autoencoder="a" * 64, text_encoder="t" * 64)
    check_init(info, **ok)  # type: ignore[arg-type]
    cases = [
        (dict(args=DiTArgs(io_channels=8, width=128, depth=1, head_dim=32, cond_token_dim=32, input_concat_dim=9)),
         r"set:\n  autoencoder.latent_channels: config 8, checkpoint 4\n  dit.width: config 128, checkpoint 64"),
        (dict(objective="rectified_flow"), "objective 'v', but dit.objective is 'rectified_flow'"),
        (dict(autoencoder="b" * 64), "autoencoder aaaaaaaaaaaa .* uses the autoencoder bbbbbbbbbbbb"),
        (dict(text_encoder="u" * 64), "text encoder tttttttttttt, but .* uses the text encoder uuuuuuuuuuuu"),
        (dict(stage="autoencoder"), "kind 'dit', but stage 'autoencoder' trains kind 'autoencoder'"),
    ]  # fmt: skip
    for changes, error in cases:
        with pytest.raises(CheckpointError, match=error):
            check_init(info, **{**ok, **changes})  # type: ignore[arg-type]
    assert read_checkpoint_info(save_checkpoint(tmp_path / "old", DiT(args))).trained == TrainedWith()  # unknown: not checked
    with pytest.raises(CheckpointError, match="kind 'dit' where kind 'autoencoder' is needed"):
        load_checkpoint(folder, kind="autoencoder")
