"""Config loading: every error path names the file or override, the dotted key and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmdm.config import Config, ConfigError, default_config_dir, dump_config, load_config, parse_override


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configs_load() -> None:
    names = sorted(p.stem for p in default_config_dir().glob("*.yaml"))
    assert "quickstart" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "audio: {sample_rate: 22050}\n", "myrun.yaml"))
    assert cfg.name == "myrun"
    assert cfg.audio.sample_rate == 22050


def test_missing_file_lists_shipped_configs() -> None:
    with pytest.raises(ConfigError, match=r"'nope.yaml': no such file.*shipped: .*quickstart"):
        load_config("nope.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "audio:\n  sample_rate: 16000\n  channels: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "invalid YAML at line" in str(info.value)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  corpus:\n    num_clip: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}: data.corpus.num_clip" in msg
    assert "did you mean 'num_clips'" in msg
    assert "allowed keys here:" in msg and "clip_seconds" in msg


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"traning: unknown key \(did you mean 'train'\?\); allowed keys here: .*train"):
        load_config(write(tmp_path, "traning: {steps: 3}\n"))


def test_wrong_type_names_value(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: train.steps: got 'many': Input should be a valid integer" in str(info.value)


def test_out_of_range_value_says_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audio.sample_rate: got 100: Input should be greater than or equal to 8000"):
        load_config(write(tmp_path, "audio: {sample_rate: 100}\n"))


def test_literal_lists_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stream.variant: got 'causal': Input should be 'outpainting', 'encdec' or 'block_causal'"):
        load_config(write(tmp_path, "stream: {variant: causal}\n"))


def test_list_element_error_has_index(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.corpus.ensembles.1: got 'kazoo': Input should be 'piano'"):
        load_config(write(tmp_path, "data: {corpus: {ensembles: [piano, kazoo]}}\n"))


def test_cross_field_rule_suggests_values(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"\(top level\): data.frame_rate \(60\) must divide audio.sample_rate \(16000\).*e.g. 40, 50, 64"
    ):
        load_config(write(tmp_path, "data: {frame_rate: 60}\n"))


def test_section_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dit: .*width \(100\) must be a multiple of head_dim \(64\)"):
        load_config(write(tmp_path, "dit: {width: 100}\n"))


def test_folder_source_needs_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"source='folder' needs data.path"):
        load_config(write(tmp_path, "data: {source: folder}\n"))


def test_overrides_are_typed_and_applied_in_order() -> None:
    cfg = load_config("quickstart", ["train.steps=7", "train.lr=1e-3", "data.corpus.sources=[bach]", "train.steps=9", "serve.host=0.0.0.0"])
    assert cfg.train.steps == 9
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.corpus.sources == ["bach"]
    assert cfg.serve.host == "0.0.0.0"


def test_override_errors_name_the_override() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", ["train.stepz=5", "audio.channels=3"])
    msg = str(info.value)
    assert "override 'train.stepz=5': train.stepz: got 5: unknown key (did you mean 'steps'?)" in msg
    assert "override 'audio.channels=3': audio.channels: got 3: Input should be 1 or 2" in msg


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"audio.sample_rate is a value, not a section"):
        load_config("quickstart", ["audio.sample_rate.x=1"])


@pytest.mark.parametrize("text", ["train.steps", "=3", "train..steps=3"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override(text)


def test_override_value_must_be_yaml() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("data.corpus.sources=[bach")


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config("quickstart", ["train.steps=11", "stream.variant=encdec", "data.corpus.tempo_bpm=[70, 90]"])
    again = load_config(write(tmp_path, dump_config(cfg), "again.yaml"))
    assert again == cfg.model_copy(update={"name": cfg.name})
    assert again.model_dump() == cfg.model_dump()


def test_defaults_are_valid() -> None:
    assert Config().audio.sample_rate == 16000


@pytest.mark.parametrize("value", ["0", "-3e-4", "2"])
def test_autoencoder_lr_out_of_range_names_the_key(value: str) -> None:
    # YAML reads "-3e-4" as a string; pydantic still checks its value.
    with pytest.raises(ConfigError, match=rf"quickstart.autoencoder_lr: got '?{re.escape(value)}'?: Input should be"):
        load_config("quickstart", [f"quickstart.autoencoder_lr={value}"])


@pytest.mark.parametrize("value", ["-1", "2000000", "many"])
def test_shuffle_buffer_out_of_range_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"train.shuffle_buffer: got '?{re.escape(value)}'?: Input should be"):
        load_config("quickstart", [f"train.shuffle_buffer={value}"])


@pytest.mark.parametrize("value", ["0", "-1e-4", "2"])
def test_lmdm_fine_tune_lr_out_of_range_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"quickstart.lmdm_lr: got '?{re.escape(value)}'?: Input should be"):
        load_config("quickstart", [f"quickstart.lmdm_lr={value}"])


@pytest.mark.timeout(30, method="thread")  # the expansion runs in C, which a signal cannot interrupt
@pytest.mark.parametrize("key", ["stft_ffts", "discriminator_ffts"])
@pytest.mark.parametrize("value", ["[1000]", "[8]", "[32768]"])
def test_autoencoder_fft_sizes_must_be_powers_of_two(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"train.autoencoder.*{key} must be powers of two from 16 to 16384, got \[{value[1:-1]}\]"):
        load_config("corpus-base", [f"train.autoencoder.{key}={value}"])
    assert load_config("corpus-base", [f"train.autoencoder.{key}=[16, 16384]"])


def test_a_billion_laughs_config_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    """Nine anchors, each a list of nine aliases of the previous: refused at the first alias, not expanded
    (before, ``lmdm config show`` ran for over 100 s)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join([*lines, "train: {steps: *a8}"]) + "\n")
    with pytest.raises(ConfigError, match=r"laughs.yaml: YAML alias '\*a0' at line 2, column \d+: aliases are not allowed"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train.steps=.*: YAML alias"):
        load_config("quick", ["train.steps=[&x 1, *x]"])


def test_training_precision_is_checked_against_the_hardware_and_strategy() -> None:
    from lmdm.pipelines.train import process_group_backend

    assert load_config("quick", ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="precision 'fp16' needs GPUs"):
        load_config("quick", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="precision 'bf16' with strategy 'deepspeed' is not supported yet"):
        load_config("quick", ["train.precision=bf16", "train.strategy=deepspeed"])
    assert process_group_backend(load_config("quick")) == "gloo"
    assert process_group_backend(load_config("quick", ["train.use_gpu=true", "train.precision=fp16"])) == "nccl"


def test_eval_settings_that_cannot_work_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"eval.window_seconds \(20\) is longer than eval.rollout_seconds \(10\)"):
        load_config("quickstart", ["eval.rollout_seconds=10", "eval.window_seconds=20"])
    with pytest.raises(ConfigError, match=r"eval.rollouts.*greater than or equal to 2"):
        load_config("quickstart", ["eval.rollouts=1"])
    twice = '[{"name": "a", "variant": "outpainting", "dit": "x"}, {"name": "a", "variant": "encdec", "dit": "y"}]'
    with pytest.raises(ConfigError, match=r"names must differ"):
        load_config("quickstart", [f"eval.engines={twice}"])
    with pytest.raises(ConfigError, match=r"variant"):
        load_config("quickstart", ['eval.engines=[{"name": "a", "variant": "lmm", "dit": "x"}]'])
