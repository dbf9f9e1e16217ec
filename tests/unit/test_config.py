import dataclasses
from pathlib import Path

import pytest

from spyke_lora import ConfigError, SpykeLoraError, TrainConfig


def make(tmp_path, **changes):
    values = dict(
        base_model=tmp_path / "model.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        output_dir=tmp_path / "out",
        output_name="spyke_plasma_v1",
    )
    values.update(changes)
    return TrainConfig(**values)


def test_defaults_are_the_lora01_recipe(tmp_path):
    cfg = make(tmp_path)
    recipe = {
        "num_repeats": None,
        "reg_dir": None,
        "reg_repeats": 1,
        "dataset_config": None,
        "resolution": 512,
        "train_batch_size": 1,
        "enable_bucket": True,
        "caption_extension": ".txt",
        "shuffle_caption": True,
        "keep_tokens": 1,
        "flip_aug": False,
        "network_module": "networks.lora",
        "network_dim": 32,
        "network_alpha": 16,
        "optimizer_type": "AdamW",
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
        "max_train_epochs": 4,
        "max_train_steps": None,
        "save_every_n_steps": 200,
        "mixed_precision": "auto",
        "save_precision": "float",
        "clip_skip": 2,
        "prior_loss_weight": 1.0,
        "gradient_checkpointing": "auto",
        "seed": 42,
        "device": "auto",
        "cache_latents": True,
        "cache_latents_to_disk": False,
        "tokenizer_cache_dir": None,
        "sd_scripts_dir": None,
        "overwrite": False,
        "max_nonfinite_steps": 1,
        "save_state": False,
        "sample_prompts": (
            "spyke_plasma_v1, standing in a forest, dramatic lighting, anime style",
            "spyke_plasma_v1, crouching, looking up, urban environment",
            "spyke_plasma_v1, full body, front view, detailed character study",
        ),
        "sample_cfg_scales": (5.0, 7.0, 9.0),
        "sample_seed": 1234,
        "sample_steps": 20,
        "sample_size": None,
        "sample_sampler": "euler_a",
        "sample_negative_prompt": "",
        "sample_at_first": False,
        "tensorboard": False,
        "extra_args": {},
        "validation_dir": None,
        "validation_split": 0.0,
        "validate_every_n_steps": None,
        "validation_seed": None,
        "max_validation_steps": None,
        "memory_limit": None,
    }
    actual = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for required in ("base_model", "train_dir", "output_dir", "output_name"):
        actual.pop(required)
    assert actual == recipe
    assert cfg.resolved_num_repeats() == 10  # from the folder name 10_spyke_plasma_v1


def test_config_is_frozen(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        make(tmp_path).resolution = 768


def test_toml_round_trip_is_exact(tmp_path):
    cfg = make(
        tmp_path,
        reg_dir=tmp_path / "reg" / "1_person",
        learning_rate=3e-4,
        text_encoder_lr=None,
        max_train_steps=920,
        extra_args={"noise_offset": 0.05, "network_args": ["conv_dim=4", "conv_alpha=1"], "vae_batch_size": 4},
    )
    path = cfg.to_toml(tmp_path / "cfg.toml")
    again = TrainConfig.from_toml(path)
    assert again == cfg
    assert again.to_toml_string() == cfg.to_toml_string()
    text = path.read_text()
    assert 'text_encoder_lr = "none"' in text  # TOML has no null: an unset optional field is written "none"
    assert "max_train_epochs" in text and "num_repeats" not in text  # a None default is simply left out
    assert "[extra_args]" in text


def test_relative_paths_in_toml_are_relative_to_the_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "spyke.toml"
    path.write_text(
        'base_model = "../models/sd15.safetensors"\ntrain_dir = "data/10_spyke"\n'
        'output_dir = "out"\noutput_name = "spyke"\n'
    )
    cfg = TrainConfig.from_toml(path)
    assert cfg.base_model == tmp_path / "models" / "sd15.safetensors"
    assert cfg.train_dir == tmp_path / "conf" / "data" / "10_spyke"
    assert TrainConfig.from_toml(cfg.to_toml(tmp_path / "elsewhere.toml")) == cfg


def test_unknown_key_names_the_key_and_suggests_the_fix(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        'base_model = "m.safetensors"\ntrain_dir = "10_x"\noutput_dir = "o"\noutput_name = "x"\n'
        "learning_rat = 0.0001\nnetwork_dimm = 16\nresolution = 500\n"
    )
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)
    message = str(info.value)
    assert "unknown key `learning_rat`; did you mean `learning_rate`?" in message
    assert "unknown key `network_dimm`; did you mean `network_dim`?" in message
    assert "`resolution` must be a multiple of 64, got 500; try 512" in message  # reported together
    assert str(path) in message
    assert len(info.value.problems) == 3
    assert isinstance(info.value, SpykeLoraError)


def test_bad_values_are_all_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        make(tmp_path, network_dim=0, mixed_precision="fp32", flip_aug="no", learning_rate="1e-4")
    problems = info.value.problems
    assert "`network_dim` must be at least 1, got 0" in problems
    assert any(
        p.startswith("`mixed_precision` must be one of 'auto', 'no', 'fp16', 'bf16', got 'fp32'") for p in problems
    )
    assert "`flip_aug` must be true or false, got 'no'" in problems
    assert "`learning_rate` must be a number, got '1e-4'" in problems


def test_missing_required_keys_in_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('train_dir = "10_x"\n')
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)
    assert "`base_model` is required but missing; add `base_model = ...`" in info.value.problems
    assert "`output_name` is required but missing; add `output_name = ...`" in info.value.problems


def test_replace_checks_names_and_values(tmp_path):
    cfg = make(tmp_path)
    assert cfg.replace(network_dim=16).network_dim == 16
    assert cfg.network_dim == 32
    with pytest.raises(ConfigError, match="unknown key `lerning_rate`; did you mean `learning_rate`"):
        cfg.replace(lerning_rate=1e-3)
    with pytest.raises(ConfigError, match="`train_batch_size` must be at least 1, got 0"):
        cfg.replace(train_batch_size=0)


def test_num_repeats_needs_a_prefix_or_a_value(tmp_path):
    with pytest.raises(ConfigError, match=r"set `num_repeats = 10` or rename the folder to '10_spyke'"):
        make(tmp_path, train_dir=tmp_path / "spyke")
    assert make(tmp_path, train_dir=tmp_path / "spyke", num_repeats=3).resolved_num_repeats() == 3
    assert make(tmp_path, num_repeats=4).resolved_num_repeats() == 4  # an explicit value wins over the prefix


def test_dataset_sources_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="use one"):
        make(tmp_path, dataset_config=tmp_path / "d.toml")
    with pytest.raises(ConfigError, match="no dataset"):
        make(tmp_path, train_dir=None)
    assert make(tmp_path, train_dir=None, dataset_config=tmp_path / "d.toml").dataset_config == tmp_path / "d.toml"


def test_extra_args_are_checked(tmp_path):
    with pytest.raises(ConfigError) as info:
        make(tmp_path, extra_args={"--noise_offset": 0.1, "seed": 1, "network_args": {"a": 1}})
    problems = info.value.problems
    assert "`extra_args` key '--noise_offset' is not an sd-scripts option name; write 'noise_offset'" in problems
    assert "`extra_args.seed` duplicates the config field `seed`; set the field instead" in problems
    assert any(p.startswith("`extra_args.network_args` must be") for p in problems)


def test_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(base_model="m.safetensors", train_dir="10_x", output_dir="~/out", output_name="x")
    assert cfg.base_model == tmp_path / "m.safetensors"
    assert cfg.output_dir == Path.home() / "out"
    assert isinstance(cfg.train_dir, Path)


def test_toml_that_does_not_parse(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("resolution = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        TrainConfig.from_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_toml(tmp_path / "nope.toml")


def test_example_spyke_config_loads():
    example = Path(__file__).parents[2] / "examples" / "spyke.toml"
    cfg = TrainConfig.from_toml(example)
    assert cfg.output_name == "spyke_plasma_v1"
    assert cfg.max_train_epochs == 2  # 460 steps per epoch with 100 regularisation images: 920 steps
    assert cfg.resolved_num_repeats() == 10 and cfg.reg_repeats == 1
    defaults = make(Path("/x"))
    for field in (
        "network_dim",
        "network_alpha",
        "learning_rate",
        "unet_lr",
        "text_encoder_lr",
        "lr_scheduler",
        "save_every_n_steps",
        "clip_skip",
        "seed",
        "keep_tokens",
        "flip_aug",
    ):
        assert getattr(cfg, field) == getattr(defaults, field), field
