"""Issue 22, groups 6 and 9: names and files that sd-scripts resolves only after the model is loaded are resolved by
plan() first (sd-scripts' own lookups, no model), and the base model's path problems name their real cause."""

import importlib.metadata
import json
import os
import struct
import sys
from pathlib import Path

import pytest

from spyke_lora import ConfigError, plan
from spyke_lora._cli import main

from .conftest import CUDA_BOX, SD1_KEY, write_model

UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_KEY = "first_stage_model.encoder.conv_in.weight"


def refused(cfg) -> str:
    """The problems plan() refuses ``cfg`` with, as one text."""
    with pytest.raises(ConfigError) as e:
        plan(cfg)
    return str(e.value)


def write_checkpoint(path: Path, tensors: dict[str, list[int]]) -> Path:
    """A header-valid safetensors file with these tensors (name -> shape), fp16, zeros."""
    entries, offset = {}, 0
    for name, shape in tensors.items():
        size = 2
        for n in shape:
            size *= n
        entries[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * offset)
    return path


def full_sd15(path: Path, in_channels: int = 4, vae: bool = True) -> Path:
    tensors = {SD1_KEY: [4], UNET_CONV_IN: [2, in_channels, 1, 1]}
    if vae:
        tensors[VAE_KEY] = [2, 3, 1, 1]
    return write_checkpoint(path, tensors)


# --- optimizer_type: sd-scripts' get_optimizer on one dummy parameter ------------------------------------------------


@pytest.mark.parametrize("name", ["AdamW", "adamw", "ADAMW", "SGDNesterov", "AdaFactor", "SGD", "torch.optim.RMSprop"])
def test_optimizer_names_sd_scripts_accepts_plan(good, name):
    plan(good.replace(optimizer_type=name, lr_scheduler="constant" if name == "AdaFactor" else "cosine"))


@pytest.mark.parametrize(("name", "close"), [("AdamWW", "AdamW"), ("Adamw9bit", "AdamW8bit"), ("SDGNesterov", "SGD")])
def test_an_unknown_optimizer_is_refused_with_the_names_accepted(good, name, close):
    text = refused(good.replace(optimizer_type=name))
    assert f"`optimizer_type` {name!r}" in text
    assert f"did you mean {close!r}" in text or f"did you mean '{close}" in text
    assert "AdamW, AdamW8bit" in text and "torch.optim" in text  # the names it accepts


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [
        ("AdamW8bit", "bitsandbytes", "bitsandbytes"),
        ("PagedAdamW", "bitsandbytes", "bitsandbytes"),
        ("Lion", "lion_pytorch", "lion-pytorch"),
        ("Prodigy", "prodigyopt", "prodigyopt"),
        ("DAdaptAdam", "dadaptation", "dadaptation"),
        ("AdamWScheduleFree", "schedulefree", "schedulefree"),
    ],
)
def test_an_optimizer_whose_package_is_missing_names_the_pip_package(good, monkeypatch, machine, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # not installed, whatever this machine has
    cfg = good.replace(optimizer_type=name)
    if module == "bitsandbytes":  # the device policy refuses bitsandbytes off CUDA before the names are looked up
        machine(CUDA_BOX)
        cfg = cfg.replace(device="cuda")
    text = refused(cfg)
    assert f"`optimizer_type` {name!r}" in text and f"pip install {package}" in text


@pytest.mark.parametrize(
    ("name", "found"),
    [("torch.optim.Nope", "torch.optim has no Nope"), ("no_such_pkg.Opt", "no_such_pkg cannot be imported")],
)
def test_a_module_class_optimizer_that_does_not_resolve_is_refused(good, name, found):
    text = refused(good.replace(optimizer_type=name))
    assert f"`optimizer_type` {name!r}" in text and found in text


@pytest.mark.parametrize("args", [["betas=(0.9"], ["nonsense=1"], ["weight_decay"]])
def test_optimizer_args_the_optimizer_rejects_are_refused(good, args):
    text = refused(good.replace(extra_args={"optimizer_args": args}))
    assert "`extra_args.optimizer_args`" in text and str(args[0]) in text


def test_good_optimizer_args_plan(good):
    plan(good.replace(extra_args={"optimizer_args": ["weight_decay=0.1", "betas=(0.9,0.99)"]}))


# --- lr_scheduler: sd-scripts' get_scheduler_fix ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial", "warmup_stable_decay"]
)
def test_scheduler_names_plan(good, name):
    plan(good.replace(lr_scheduler=name, lr_warmup_steps=1))


@pytest.mark.parametrize(("name", "close"), [("cosin", "cosine"), ("Cosine", "cosine"), ("linaer", "linear")])
def test_an_unknown_scheduler_is_refused_with_the_names_accepted(good, name, close):
    text = refused(good.replace(lr_scheduler=name))
    assert f"`lr_scheduler` {name!r}" in text and f"did you mean {close!r}" in text
    assert "constant_with_warmup" in text  # the names it accepts


def test_constant_with_warm_up_steps_is_refused(good):
    text = refused(good.replace(lr_scheduler="constant", lr_warmup_steps=10))
    assert "`lr_scheduler` 'constant'" in text and "lr_warmup_steps" in text and "constant_with_warmup" in text


def test_the_adafactor_scheduler_needs_the_adafactor_optimizer(good):
    text = refused(good.replace(lr_scheduler="adafactor"))
    assert "`lr_scheduler` 'adafactor'" in text and 'optimizer_type = "Adafactor"' in text


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        ({"lr_scheduler_type": "torch.optim.lr_scheduler.Nope"}, "has no Nope"),
        ({"lr_scheduler_type": "nopkg.Sched"}, "nopkg cannot be imported"),
        ({"lr_scheduler_type": "StepLR"}, "step_size"),  # a required argument missing from lr_scheduler_args
    ],
)
def test_an_lr_scheduler_type_that_does_not_resolve_is_refused(good, extra, found):
    text = refused(good.replace(extra_args=extra))
    assert f"`extra_args.lr_scheduler_type` {extra['lr_scheduler_type']!r}" in text and found in text


def test_an_lr_scheduler_type_with_its_arguments_plans(good):
    plan(good.replace(extra_args={"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"]}))


def test_a_schedule_free_optimizer_ignores_the_scheduler_name_as_sd_scripts_does(good, monkeypatch):
    """sd-scripts gives a schedule-free optimizer a dummy scheduler (train_util.get_scheduler_fix): no check."""
    import types

    import torch

    fake = types.ModuleType("schedulefree")
    fake.AdamWScheduleFree = torch.optim.AdamW
    monkeypatch.setitem(sys.modules, "schedulefree", fake)
    plan(good.replace(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine"))


# --- network_module --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["networks.lora", "networks.dylora", "networks.lora_fa"])
def test_sd_scripts_network_modules_plan(good, name):
    plan(good.replace(network_module=name))


@pytest.mark.parametrize(
    ("name", "close"), [("networks.lroa", "networks.lora"), ("networks.dylroa", "networks.dylora")]
)
def test_a_misspelt_network_module_gets_a_did_you_mean(good, name, close):
    text = refused(good.replace(network_module=name))
    assert f"`network_module` {name!r} cannot be imported" in text and f"did you mean {close!r}" in text


def test_lycoris_without_the_package_says_how_to_install_it(good, monkeypatch):
    monkeypatch.setitem(sys.modules, "lycoris", None)
    real = importlib.metadata.version

    def version(name):
        if name == "lycoris-lora":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    text = refused(good.replace(network_module="lycoris.kohya"))
    assert "`network_module` 'lycoris.kohya'" in text and "pip install 'spyke-lora[lycoris]'" in text


@pytest.mark.parametrize("bad", ["4.1.3", "4.0.0", "5.0"])
def test_a_lycoris_version_known_to_fail_is_refused_naming_the_one_that_works(good, monkeypatch, bad):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: bad if name == "lycoris-lora" else real(name))
    text = refused(good.replace(network_module="lycoris.kohya"))
    assert f"lycoris-lora {bad}" in text and "3.4.0" in text and "duplicated lora name" in text
    assert "pip install 'spyke-lora[lycoris]'" in text


@pytest.mark.parametrize(
    ("source", "found"), [("X = 1\n", "has no create_network"), ("raise ValueError('boom')\n", "boom")]
)
def test_a_user_network_module_is_imported_and_checked(good, tmp_path, monkeypatch, source, found):
    (tmp_path / "my_net_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_net_mod", raising=False)
    text = refused(good.replace(network_module="my_net_mod"))
    assert "`network_module` 'my_net_mod'" in text and found in text


def test_a_user_network_module_with_create_network_plans(good, tmp_path, monkeypatch):
    (tmp_path / "my_good_net.py").write_text("def create_network(*a, **k):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan(good.replace(network_module="my_good_net"))


def test_a_network_module_needing_a_missing_package_names_it(good, tmp_path, monkeypatch):
    (tmp_path / "needs_pkg_net.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = refused(good.replace(network_module="needs_pkg_net"))
    assert "`network_module` 'needs_pkg_net'" in text and "not_installed_pkg_xyz" in text


# --- files named in options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["vae", "network_weights"])
def test_a_missing_file_named_in_extra_args_is_refused(good, tmp_path, key):
    missing = tmp_path / "nowhere" / "x.safetensors"
    text = refused(good.replace(extra_args={key: str(missing)}))
    assert f"`extra_args.{key}` {str(missing)!r} does not exist" in text


def test_a_missing_base_weights_file_is_refused_naming_its_index(good, tmp_path):
    there = write_model(tmp_path / "b0.safetensors", "lora_unet_x.lora_down.weight")
    text = refused(good.replace(extra_args={"base_weights": [str(there), str(tmp_path / "b1.safetensors")]}))
    assert f"`extra_args.base_weights[1]` {str(tmp_path / 'b1.safetensors')!r} does not exist" in text
    assert "b0.safetensors" not in text


def test_a_dangling_symlink_named_in_extra_args_names_the_link(good, tmp_path):
    link = tmp_path / "vae.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    text = refused(good.replace(extra_args={"vae": str(link)}))
    assert "`extra_args.vae`" in text and "symbolic link" in text and "gone.safetensors" in text


def test_a_truncated_network_weights_file_is_refused(good, tmp_path):
    lora = write_model(tmp_path / "start.safetensors", "lora_unet_x.lora_down.weight")
    lora.write_bytes(lora.read_bytes()[:-3])
    text = refused(good.replace(extra_args={"network_weights": str(lora)}))
    assert "`extra_args.network_weights`" in text and "truncated" in text


def test_files_named_in_extra_args_that_exist_plan(good, tmp_path):
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text("{}")
    lora = write_model(tmp_path / "start.safetensors", "lora_unet_x.lora_down.weight")
    plan(good.replace(extra_args={"vae": str(vae_dir), "network_weights": str(lora), "base_weights": [str(lora)]}))


def test_a_vae_folder_that_is_no_diffusers_vae_is_refused(good, tmp_path):
    (tmp_path / "empty_vae").mkdir()
    text = refused(good.replace(extra_args={"vae": str(tmp_path / "empty_vae")}))
    assert "`extra_args.vae`" in text and "config.json" in text


# --- the base model: what sd-scripts' U-Net and VAE conversion need --------------------------------------------------


def test_a_full_sd15_checkpoint_plans(good):
    full_sd15(good.base_model)
    plan(good)


@pytest.mark.parametrize(("channels", "kind"), [(9, "inpainting"), (8, "instruct-pix2pix"), (5, "")])
def test_a_checkpoint_whose_unet_does_not_take_4_channels_is_refused(good, channels, kind):
    full_sd15(good.base_model, in_channels=channels)
    text = refused(good)
    assert f"`base_model` {str(good.base_model)!r}" in text and f"{channels} input channels" in text
    assert kind in text and "4" in text


@pytest.mark.parametrize("vae", [None, "x"])
def test_a_checkpoint_without_vae_keys_is_refused_even_with_extra_args_vae(good, tmp_path, vae):
    full_sd15(good.base_model, vae=False)
    extra = {}
    if vae:
        extra = {"vae": str(write_model(tmp_path / "vae.safetensors", "encoder.conv_in.weight"))}
    text = refused(good.replace(extra_args=extra))
    assert f"`base_model` {str(good.base_model)!r}" in text and "first_stage_model" in text
    assert "extra_args.vae" in text  # does not rescue it: said so


# --- group 9: the base model's path, its real cause ------------------------------------------------------------------


def test_a_diffusers_folder_as_base_model_says_so(good, tmp_path):
    folder = tmp_path / "sd15-diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    text = refused(good.replace(base_model=folder))
    assert "diffusers" in text and "does not exist" not in text and ".safetensors" in text


def test_a_plain_folder_as_base_model_names_the_checkpoints_in_it(good, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    write_model(folder / "anything.safetensors")
    text = refused(good.replace(base_model=folder))
    assert "is a folder" in text and "anything.safetensors" in text and "does not exist" not in text


def test_a_symlink_loop_as_base_model_says_so(good, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    text = refused(good.replace(base_model=a))
    assert "loop" in text and "does not exist" not in text


def test_a_dangling_symlink_as_base_model_names_its_target(good, tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "moved" / "model.safetensors")
    text = refused(good.replace(base_model=link))
    assert "symbolic link" in text and str(tmp_path / "moved" / "model.safetensors") in text


def test_an_unreadable_base_model_says_permission_denied(good, monkeypatch):
    real_open = Path.open

    def guarded(self, *args, **kwargs):
        if self == good.base_model:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
    text = refused(good)
    assert f"`base_model` {str(good.base_model)!r}" in text and "permission denied" in text.lower()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_chmod_000_base_model_says_permission_denied(good):
    good.base_model.chmod(0)
    try:
        assert "permission denied" in refused(good).lower()
    finally:
        good.base_model.chmod(0o644)


def test_the_cli_exits_2_with_the_message(good, tmp_path, capsys):
    path = tmp_path / "c.toml"
    good.replace(optimizer_type="AdamWW").to_toml(path)
    assert main(["plan", str(path)]) == 2
    assert "`optimizer_type` 'AdamWW'" in capsys.readouterr().err


def test_another_lycoris_3_version_plans_with_a_warning_naming_the_tested_one(good, monkeypatch):
    pytest.importorskip("lycoris")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.3.0" if name == "lycoris-lora" else real(name))
    warnings = [w for w in plan(good.replace(network_module="lycoris.kohya")).warnings if "lycoris" in w]
    assert len(warnings) == 1 and "lycoris-lora 3.3.0" in warnings[0] and "3.4.0" in warnings[0]


def test_the_pinned_lycoris_plans_without_a_warning(good):
    pytest.importorskip("lycoris")
    assert not [w for w in plan(good.replace(network_module="lycoris.kohya")).warnings if "lycoris" in w]
