"""``build_argv``: the sd-scripts arguments of a wide set of configs, devices and resumes, against a golden file.

``tests/unit/data/argv_cases.json`` holds what ``build_argv`` produced for every case below before its one-to-one
options became a table (issue 21): the table must give the same list, word for word, for every config. Paths are
stored with the test's folder written as ``<root>``. A deliberate change of the arguments regenerates the file:
``.venv/bin/python tests/unit/test_argv.py --write`` (and the diff of the JSON shows what changed).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from spyke_lora import ConfigError, DeviceError, TrainConfig
from spyke_lora._device import DeviceChoice, choose_device
from spyke_lora._engine import build_argv

EXPECTED = Path(__file__).parent / "data" / "argv_cases.json"
ROOT = "<root>"
SD2_KEY = "cond_stage_model.model.ln_final.weight"

# The device choices a run can get: the policy's own, and every value of the fields build_argv writes.
DEVICES = {
    "cpu": choose_device("cpu", mixed_precision="auto", optimizer_type="AdamW"),
    "mps": choose_device("mps", mixed_precision="fp16", optimizer_type="AdamW"),
    "cuda": choose_device("cuda", mixed_precision="auto", optimizer_type="AdamW"),
    "cuda-bf16": choose_device("cuda", mixed_precision="bf16", optimizer_type="AdamW8bit"),
    "cuda-no": choose_device("cuda", mixed_precision="no", optimizer_type="AdamW"),
    "cuda-xformers": choose_device("cuda", mixed_precision="fp16", optimizer_type="AdamW", xformers=True),
    "cuda-workers": DeviceChoice("cuda", "fp16", True, "sdpa", 4),
}

EVERY_OPTIONAL = dict(
    num_repeats=3, reg_repeats=2, resolution=768, train_batch_size=4, enable_bucket=False, caption_extension=".caption",
    shuffle_caption=False, keep_tokens=0, flip_aug=True, network_module="networks.lora_fa", network_dim=8,
    network_alpha=4.5, optimizer_type="Lion", learning_rate=3e-4, unet_lr=None, text_encoder_lr=None,
    lr_scheduler="constant_with_warmup", lr_warmup_steps=25, max_train_epochs=None, max_train_steps=333,
    save_every_n_steps=None, save_precision="bf16", save_state=True, tensorboard=True, overwrite=True,
    max_nonfinite_steps=0, sample_prompts=("a", "b"), sample_cfg_scales=(7.5,), sample_seed=7, sample_steps=4,
    sample_size=96, sample_sampler="ddim", sample_negative_prompt="lowres", sample_at_first=True,
    validation_split=0.25, validation_seed=3, mixed_precision="bf16", clip_skip=None, prior_loss_weight=0.5,
    gradient_checkpointing=False, cache_latents=False, seed=0, memory_limit="12GB",
)  # fmt: skip

EXTRA_ARGS = {
    "noise_offset": 0.05,
    "min_snr_gamma": 5,
    "network_args": ["conv_dim=4", "conv_alpha=1"],
    "persistent_data_loader_workers": True,
    "debiased_estimation_loss": False,
    "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"],
    "lr_scheduler_num_cycles": 3,
    "v_parameterization": True,
    "scale_v_pred_loss_like_noise_pred": True,
    "max_token_length": 225,
    "ip_noise_gamma": 0.1,
    "vae": "/models/vae.safetensors",
}


def _config(root: Path, **changes) -> TrainConfig:
    fields = dict(
        base_model=root / "m.safetensors", train_dir=root / "10_spyke_plasma_v1", output_dir=root / "o",
        output_name="spyke_plasma_v1",
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def _recipe(root: Path) -> TrainConfig:
    return TrainConfig.from_toml(Path(__file__).parents[2] / "examples" / "spyke.toml").replace(
        base_model=root / "m.safetensors", train_dir=root / "10_spyke_plasma_v1", reg_dir=root / "reg" / "1_person",
        output_dir=root / "loras" / "spyke", validation_dir=root / "val" / "1_spyke_plasma_v1",
    )  # fmt: skip


def cases(root: Path) -> dict[str, tuple[TrainConfig, DeviceChoice, Path | None]]:
    """Every case: (config, device choice, resume_from). ``root`` holds an SD1 and an SD2 model header."""
    state = root / "o" / "spyke_plasma_v1-step00000200-state"
    base, recipe = _config(root), _recipe(root)
    every = _config(root, reg_dir=root / "reg" / "1_person", tokenizer_cache_dir=root / "tok", **EVERY_OPTIONAL)
    out = {f"defaults-{name}": (base, device, None) for name, device in DEVICES.items()}
    out |= {f"recipe-{name}": (recipe, device, None) for name, device in DEVICES.items()}
    out |= {f"every-optional-{name}": (every, device, None) for name, device in DEVICES.items()}
    out |= {
        "recipe-resume-cpu": (recipe, DEVICES["cpu"], state),
        "recipe-resume-cuda": (recipe, DEVICES["cuda"], state),
        "every-optional-resume-mps": (every, DEVICES["mps"], state),
        "sd2": (_config(root, base_model=root / "sd2.safetensors"), DEVICES["cpu"], None),
        "missing-model": (_config(root, base_model=root / "absent.safetensors"), DEVICES["cpu"], None),
        "dataset-config": (
            _config(root, train_dir=None, dataset_config=root / "my_dataset.toml"), DEVICES["cuda"], None
        ),
        "epochs-and-steps": (_config(root, max_train_epochs=3, max_train_steps=10), DEVICES["cpu"], None),
        "epochs-only": (_config(root, max_train_epochs=6), DEVICES["cpu"], None),
        "no-sampling": (_config(root, sample_prompts=()), DEVICES["cpu"], None),
        "checkpointing-on": (_config(root, gradient_checkpointing=True), DEVICES["cpu"], None),
        "cached-to-disk": (_config(root, cache_latents_to_disk=True), DEVICES["cpu"], None),
        "learning-rates-float": (_config(root, learning_rate=1, unet_lr=0.0002, network_alpha=1), DEVICES["cpu"], None),
        "fp16-save": (_config(root, save_precision="fp16", clip_skip=1), DEVICES["cpu"], None),
        "validation-dir": (_config(root, validation_dir=root / "val" / "1_x"), DEVICES["cpu"], None),
    }  # fmt: skip
    extras = {
        "extra-args-cpu": (EXTRA_ARGS, "cpu"),
        "extra-args-cuda": (EXTRA_ARGS, "cuda"),
        "extra-xformers-cuda": ({"xformers": True}, "cuda-xformers"),
        "extra-xformers-off-cuda": ({"xformers": False}, "cuda"),
        "extra-no-half-vae-mps": ({"no_half_vae": True}, "mps"),
        "extra-no-half-vae-cuda": ({"no_half_vae": True}, "cuda"),
        "extra-no-half-vae-false-cpu": ({"no_half_vae": False}, "cpu"),
        "extra-full-fp16-cuda": ({"full_fp16": True, "fp8_base": True}, "cuda"),
        "extra-full-bf16-off-cpu": ({"full_bf16": False}, "cpu"),
        "extra-workers-cpu": ({"max_data_loader_n_workers": 2}, "cpu"),
        "extra-logging-no-tensorboard": ({"logging_dir": "/logs", "log_with": "wandb", "log_prefix": "x"}, "cpu"),
        "extra-empty-list": ({"network_args": []}, "cpu"),
        "extra-scalars": ({"a_float": 1.0, "an_int": 0, "a_string": "", "zero_float": 0.0}, "cpu"),
        # refused: each case records the error's class and message
        "refused-managed": ({"resume": "x", "sdpa": True, "v2": True, "console_log_simple": False}, "cpu"),
        "refused-cuda-only": ({"full_fp16": True}, "cpu"),
        "refused-cuda-only-mps": ({"fp8_base": True}, "mps"),
        "refused-mps-workers": ({"max_data_loader_n_workers": 0}, "mps"),
        "refused-managed-then-cuda-only": ({"resume": "x", "full_fp16": True}, "cpu"),
        "refused-cuda-only-and-workers-mps": (
            {"max_data_loader_n_workers": 1, "fp8_base": True, "in_json": "j"},
            "mps",
        ),
    }
    out |= {name: (_config(root, extra_args=extra), DEVICES[device], None) for name, (extra, device) in extras.items()}
    tensorboard = _config(root, tensorboard=True, extra_args={"logging_dir": "/x", "log_prefix": "p"})
    out["refused-tensorboard"] = (tensorboard, DEVICES["cpu"], None)
    out["refused-tensorboard-and-managed"] = (
        _config(root, tensorboard=True, extra_args={"log_with": "all", "in_json": "x.json"}), DEVICES["cpu"], None
    )  # fmt: skip
    return out


def outcome(cfg: TrainConfig, device: DeviceChoice, resume_from: Path | None, root: Path) -> list[str] | dict:
    """``build_argv``'s list with ``root`` written as ``<root>``, or the error it raised."""
    try:
        argv = build_argv(cfg, device, resume_from)
    except Exception as e:  # noqa: BLE001 - the class and message are what is compared
        return {"error": type(e).__name__, "message": str(e).replace(str(root), ROOT)}
    return [word.replace(str(root), ROOT) for word in argv]


def _models(root: Path) -> None:
    """An SD1 and an SD2 model header (``build_argv`` reads the family from the header for ``--v2``)."""
    for name, key in (("m", "cond_stage_model.transformer.text_model.final_layer_norm.weight"), ("sd2", SD2_KEY)):
        header = json.dumps({key: {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
        (root / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)


def test_the_table_gives_the_same_argv_for_every_case(tmp_path):
    _models(tmp_path)
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    found = {name: outcome(*case, tmp_path) for name, case in cases(tmp_path).items()}
    assert sorted(found) == sorted(expected)  # every case has its golden list, and every golden list its case
    for name, argv in found.items():
        assert argv == expected[name], name
    assert len(found) >= 50


def test_the_golden_file_covers_every_field_written_one_to_one():
    """Every config field that maps to one flag appears, as its flag, in some case's argv."""
    words = {
        w for argv in json.loads(EXPECTED.read_text(encoding="utf-8")).values() if isinstance(argv, list) for w in argv
    }
    for flag in ("--reg_data_dir", "--train_data_dir"):
        assert flag not in words  # folders go through the dataset TOML
    for flag in (
        "--v2", "--flip_aug", "--shuffle_caption", "--unet_lr", "--text_encoder_lr", "--max_train_steps",
        "--max_train_epochs", "--save_state", "--logging_dir", "--sample_prompts", "--sample_at_first", "--resume",
        "--skip_until_initial_step", "--no_half_vae", "--xformers", "--sdpa", "--max_data_loader_n_workers",
        "--clip_skip", "--gradient_checkpointing", "--cache_latents", "--cache_latents_to_disk",
        "--validate_every_n_epochs", "--tokenizer_cache_dir", "--console_log_simple", "--full_fp16", "--noise_offset",
    ):  # fmt: skip
        assert flag in words, flag


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:  # regenerate the golden file (a deliberate change only)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _models(root)
        golden = {name: outcome(*case, root) for name, case in cases(root).items()}
    EXPECTED.parent.mkdir(exist_ok=True)
    EXPECTED.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(golden)} cases to {EXPECTED}")


@pytest.mark.parametrize("key", ["fp8_base", "fp8_base_unet"])
def test_fp8_is_refused_off_cuda_and_without_mixed_precision(tmp_path, key):
    _models(tmp_path)
    cfg = _config(tmp_path, extra_args={key: True})
    with pytest.raises(DeviceError, match=f"`extra_args.{key}` needs CUDA and this run is on 'mps'"):
        build_argv(cfg, DEVICES["mps"])
    with pytest.raises(ConfigError, match=f"`extra_args.{key}` needs fp16 or bf16 mixed precision.*'no'"):
        build_argv(cfg, DEVICES["cuda-no"])
    assert f"--{key}" in build_argv(cfg, DEVICES["cuda-bf16"])
