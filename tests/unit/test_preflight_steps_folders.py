"""plan() (issue 22, groups 4, 5 and 7): step counts that cannot be right, folders that collide, and legal values that
are almost surely a mistake. Each case is refused (a ConfigError naming the file or field, the value and the fix) or
warned about, before anything is loaded or written; no exception but spyke-lora's leaves plan()."""

import os
from pathlib import Path

import pytest

from spyke_lora import ConfigError, SpykeLoraError, _engine, doctor, plan
from spyke_lora._cli import main

from .conftest import write_images


def refused(cfg) -> str:
    """plan(cfg)'s ConfigError message; nothing written to output_dir."""
    before = sorted(cfg.output_dir.rglob("*")) if cfg.output_dir.is_dir() else None
    with pytest.raises(ConfigError) as info:
        plan(cfg)
    after = sorted(cfg.output_dir.rglob("*")) if cfg.output_dir.is_dir() else None
    assert after == before
    return str(info.value)


def dataset_toml(cfg, body: str, name: str = "my_dataset.toml"):
    """``cfg`` on a dataset TOML of ``body`` written next to its training folder."""
    path = cfg.train_dir.parent / name
    path.write_text(body)
    return cfg.replace(train_dir=None, reg_dir=None, dataset_config=path)


def subset(folder, **keys) -> str:
    lines = [f'image_dir = "{folder}"', *(f"{k} = {v}" for k, v in keys.items())]
    return "[[datasets.subsets]]\n" + "\n".join(lines) + "\n"


# --- group 4: a run of 0 or fewer steps is refused, whatever the cause, with the cause -----------------------------


def test_a_zero_repeats_folder_is_refused(good):
    zero = good.train_dir.with_name("0_spyke_plasma_v1")
    good.train_dir.rename(zero)
    message = refused(good.replace(train_dir=zero))
    assert "`train_dir`" in message and str(zero) in message and "0 repeats" in message
    assert "'10_spyke_plasma_v1'" in message  # the fix: a folder name with repeats


@pytest.mark.parametrize("repeats", [0, -1])
def test_a_dataset_toml_subset_with_no_repeats_is_refused(good, repeats):
    body = "[[datasets]]\n" + subset(good.train_dir, num_repeats=repeats) + subset(good.reg_dir, is_reg="true")
    message = refused(dataset_toml(good, body))
    assert "my_dataset.toml datasets[0].subsets[0]" in message and f"num_repeats = {repeats}" in message
    assert "ignores" in message and "num_repeats = 1" in message


def test_a_zero_repeats_subset_among_others_is_refused(good):
    other = good.train_dir.parent / "5_other"
    write_images(other, 2, "spyke_plasma_v1, other")
    body = "[[datasets]]\n" + subset(good.train_dir, num_repeats=2) + subset(other, num_repeats=0)
    message = refused(dataset_toml(good, body))
    assert "datasets[0].subsets[1]" in message and "num_repeats = 0" in message and "subsets[0]" not in message


@pytest.mark.parametrize(
    "value, found",
    [(0, "0"), (-1, "-1"), (2.5, "2.5"), ("4", "'4'"), (True, "True")],
    ids=["zero", "negative", "float", "string", "bool"],
)
def test_gradient_accumulation_steps_must_be_a_positive_integer(good, value, found):
    message = refused(good.replace(extra_args={"gradient_accumulation_steps": value}))
    assert f"`extra_args.gradient_accumulation_steps` must be a whole number of at least 1, got {found}" in message
    assert "gradient_accumulation_steps = 1" in message


def test_gradient_accumulation_within_the_run_plans(good):
    p = plan(good.replace(extra_args={"gradient_accumulation_steps": 2}))
    assert (p.batches_per_epoch, p.steps_per_epoch) == (60, 30)


def test_a_dataset_of_regularisation_images_only_has_no_steps(good):
    body = "[[datasets]]\n" + subset(good.reg_dir, is_reg="true", class_tokens='"person"')
    message = refused(dataset_toml(good, body))
    assert "0 steps" in message and "regularisation" in message and "is_reg = false" in message


def test_zero_planned_steps_in_general_are_refused(good, monkeypatch):
    real = _engine.count_steps

    def no_steps(cfg, device, processes=1):
        import dataclasses

        return dataclasses.replace(real(cfg, device, processes), steps_per_epoch=0, total_steps=0, epochs=0)

    monkeypatch.setattr(_engine, "count_steps", no_steps)
    message = refused(good)
    assert "the run has 0 steps" in message and "0 per epoch" in message


def test_an_error_inside_sd_scripts_dataset_code_names_the_file(good):
    caption = good.train_dir / "img001.txt"
    caption.write_text("spyke_plasma_v1, red disc", encoding="utf-16")
    with pytest.raises(ConfigError) as info:
        _engine.count_steps(good, _engine.device_choice(good))
    message = str(info.value)
    assert str(caption) in message and "UnicodeDecodeError" in message


def test_an_error_inside_sd_scripts_without_a_file_names_the_folder(good, monkeypatch):
    host = _engine.host_for(good.sd_scripts_dir)
    with host.active():
        config_util = host.train_network().config_util

    def broken(*args, **kwargs):
        raise KeyError("something sd-scripts did not expect")

    monkeypatch.setattr(config_util, "generate_dataset_group_by_blueprint", broken)
    with pytest.raises(ConfigError) as info:
        _engine.count_steps(good, _engine.device_choice(good))
    assert "KeyError" in str(info.value) and str(good.train_dir) in str(info.value)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\xef\xbb\xbf[[datasets]]\n", "byte-order mark"),
        ("[[datasets]]\n".encode("utf-16"), "UTF-16"),
        (b'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "caf\xe9"\n', "not UTF-8"),
    ],
    ids=["utf8-bom", "utf16", "latin1"],
)
def test_a_dataset_toml_sd_scripts_cannot_read_is_refused(good, data, why):
    path = good.train_dir.parent / "my_dataset.toml"
    path.write_bytes(data)
    message = refused(good.replace(train_dir=None, reg_dir=None, dataset_config=path))
    assert str(path) in message and why in message and "save it as UTF-8" in message


def test_a_dataset_config_that_is_a_folder_is_refused(good):
    folder = good.train_dir.parent / "a_folder.toml"
    folder.mkdir()
    message = refused(good.replace(train_dir=None, reg_dir=None, dataset_config=folder))
    assert str(folder) in message and "is a folder" in message


# --- group 5: folders that collide -------------------------------------------------------------------------------


def test_reg_dir_equal_to_train_dir_is_refused(good):
    message = refused(good.replace(reg_dir=good.train_dir))
    assert "`reg_dir`" in message and "`train_dir`" in message and str(good.train_dir) in message
    assert "the same folder" in message and "no regularisation" in message


@pytest.mark.parametrize("spelling", ["symlink", "trailing slash", "dotdot"])
def test_reg_dir_equal_to_train_dir_by_another_path_is_refused(good, spelling):
    if spelling == "symlink":
        other = good.train_dir.parent / "link_to_train"
        other.symlink_to(good.train_dir, target_is_directory=True)
    elif spelling == "trailing slash":
        other = Path(str(good.train_dir) + "/")
    else:
        other = good.reg_dir / ".." / ".." / good.train_dir.name
    message = refused(good.replace(reg_dir=other))
    assert "`reg_dir`" in message and "the same folder as `train_dir`" in message


def test_two_subsets_of_one_folder_are_refused(good):
    body = "[[datasets]]\n" + subset(good.train_dir, num_repeats=2) + subset(good.train_dir, num_repeats=3)
    message = refused(dataset_toml(good, body))
    assert "datasets[0].subsets[0]" in message and "datasets[0].subsets[1]" in message
    assert str(good.train_dir) in message and "ignores" in message


def test_two_subsets_of_one_folder_by_a_symlink_are_refused(good):
    link = good.train_dir.parent / "link"
    link.symlink_to(good.train_dir, target_is_directory=True)
    body = "[[datasets]]\n" + subset(good.train_dir, num_repeats=2) + subset(link, is_reg="true")
    message = refused(dataset_toml(good, body))
    assert "datasets[0].subsets[0]" in message and "datasets[0].subsets[1]" in message and "same folder" in message


def test_one_folder_in_two_datasets_is_a_multi_resolution_run(good):
    body = "[[datasets]]\n" + subset(good.train_dir) + "[[datasets]]\n" + subset(good.train_dir)
    p = plan(dataset_toml(good, body))
    assert [s.folder for s in p.subsets] == [good.train_dir, good.train_dir]


@pytest.mark.parametrize("which", ["train_dir", "reg_dir", "validation_dir"])
def test_output_dir_in_a_dataset_folder_is_refused(good, which):
    cfg = good
    if which == "validation_dir":
        val = good.train_dir.parent / "val" / "1_spyke_plasma_v1"
        write_images(val, 1, "spyke_plasma_v1, held out", start=50)
        cfg = good.replace(validation_dir=val)
    folder = getattr(cfg, which)
    message = refused(cfg.replace(output_dir=folder))
    assert f"`output_dir` {str(folder)!r} is the `{which}` folder" in message
    assert "choose an output_dir outside the dataset" in message


def test_output_dir_equal_to_a_subset_by_a_symlink_is_refused(good):
    link = good.train_dir.parent / "out_link"
    link.symlink_to(good.train_dir, target_is_directory=True)
    body = "[[datasets]]\n" + subset(good.train_dir)
    message = refused(dataset_toml(good, body).replace(output_dir=link))
    assert "`output_dir`" in message and "my_dataset.toml datasets[0].subsets[0]" in message


def test_output_dir_that_is_a_file_is_refused(good):
    good.output_dir.write_text("not a folder")
    message = refused(good)
    assert f"`output_dir` {str(good.output_dir)!r} is a file" in message


def test_output_dir_inside_a_file_is_refused(good):
    good.output_dir.write_text("not a folder")
    message = refused(good.replace(output_dir=good.output_dir / "loras"))
    assert str(good.output_dir / "loras") in message and f"{str(good.output_dir)!r} is a file" in message


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-be-created"])
def test_output_dir_that_cannot_be_written_is_refused(good, monkeypatch, exists):
    if exists:
        good.output_dir.mkdir()
    target = good.output_dir if exists else good.output_dir.parent
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == target else real(p, mode, **kw))
    message = refused(good)
    assert str(good.output_dir) in message and "cannot be written" in message and str(target) in message


def test_doctor_is_not_ready_for_an_output_dir_it_cannot_write(good, monkeypatch):
    good.output_dir.write_text("not a folder")
    report = doctor(good)
    assert not report.ok and any("is a file" in p for p in report.problems)
    assert "ready to train" not in str(report)


def test_doctor_is_ready_for_a_writable_output_dir(good):
    assert not any("output_dir" in p for p in doctor(good).problems)


def test_a_relative_image_dir_is_read_from_the_working_directory(good, monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    body = "[[datasets]]\n" + subset(good.train_dir.name)
    message = refused(dataset_toml(good, body))
    assert "my_dataset.toml datasets[0].subsets[0]" in message and "relative" in message
    assert str(elsewhere / good.train_dir.name) in message  # where sd-scripts looks
    assert str(good.train_dir) in message  # where the TOML's folder would put it: the fix
    assert f"image_dir = '{good.train_dir}'" in message


def test_a_relative_image_dir_from_the_tomls_own_folder_plans(good, monkeypatch):
    monkeypatch.chdir(good.train_dir.parent)
    p = plan(dataset_toml(good, "[[datasets]]\n" + subset(good.train_dir.name, num_repeats=2)))
    assert [(s.folder.resolve(), s.images) for s in p.subsets] == [(good.train_dir.resolve(), 3)]


def test_a_relative_dotdot_image_dir_is_refused(good, monkeypatch, tmp_path):
    sub = good.train_dir.parent / "configs"
    sub.mkdir()
    monkeypatch.chdir(good.reg_dir)  # from here, '../10_spyke_plasma_v1' is reg/10_spyke_plasma_v1
    path = sub / "ds.toml"
    path.write_text("[[datasets]]\n" + subset(f"../{good.train_dir.name}"))
    message = refused(good.replace(train_dir=None, reg_dir=None, dataset_config=path))
    assert "ds.toml datasets[0].subsets[0]" in message and f"'../{good.train_dir.name}'" in message
    assert str(good.reg_dir.parent / good.train_dir.name) in message and f"image_dir = '{good.train_dir}'" in message


def test_a_home_relative_image_dir_is_refused(good, monkeypatch):
    monkeypatch.setenv("HOME", str(good.train_dir.parent))
    message = refused(dataset_toml(good, "[[datasets]]\n" + subset(f"~/{good.train_dir.name}")))
    assert "starts with '~', which sd-scripts does not expand" in message and str(good.train_dir) in message


def test_a_relative_mask_folder_is_refused_too(good, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)
    body = "[[datasets]]\n" + subset(good.train_dir, conditioning_data_dir='"masks"')
    message = refused(dataset_toml(good, body))
    assert (
        "datasets[0].subsets[0] conditioning_data_dir 'masks' is relative" in message
        and "conditioning_data_dir = " in message
    )


# --- group 7: legal values that are almost surely a mistake -------------------------------------------------------


def test_learning_rate_zero_is_a_warning(good):
    warnings = plan(good.replace(learning_rate=0)).warnings
    assert any("`learning_rate` is 0" in w for w in warnings)


@pytest.mark.parametrize(
    "changes",
    [
        {"learning_rate": 0, "unet_lr": None, "text_encoder_lr": None},
        {"unet_lr": 0, "text_encoder_lr": 0},
        {"learning_rate": 0, "unet_lr": 0, "text_encoder_lr": None},
    ],
    ids=["all-defaulted", "both-zero", "mixed"],
)
def test_learning_rates_that_train_nothing_are_a_warning(good, changes):
    warnings = plan(good.replace(**changes)).warnings
    assert any("nothing is trained" in w and "`unet_lr`" in w and "`text_encoder_lr`" in w for w in warnings)


def test_a_unet_learning_rate_of_zero_is_a_warning(good):
    warnings = plan(good.replace(unet_lr=0)).warnings
    assert any("`unet_lr` is 0" in w and "the U-Net is not trained" in w for w in warnings)


def test_a_text_encoder_learning_rate_of_zero_trains_the_unet_alone(good):
    assert plan(good.replace(text_encoder_lr=0)).warnings == ()


@pytest.mark.parametrize("warmup", [5, 6, 100])
def test_a_warm_up_as_long_as_the_run_is_a_warning(good, warmup):
    warnings = plan(good.replace(lr_warmup_steps=warmup)).warnings
    assert any(f"`lr_warmup_steps` {warmup}" in w and "5 steps" in w for w in warnings)


def test_a_short_warm_up_is_no_warning(good):
    assert plan(good.replace(lr_warmup_steps=4)).warnings == ()


@pytest.mark.parametrize("name", ["spyke.safetensors", "spyke.SafeTensors", "spyke.ckpt", "spyke.pt"])
def test_an_output_name_with_an_extension_is_a_warning(good, name):
    warnings = plan(good.replace(output_name=name)).warnings
    assert any(f"`output_name` {name!r}" in w and f"{name}.safetensors" in w and "'spyke'" in w for w in warnings)


def test_an_output_name_with_a_dot_is_no_warning(good):
    assert plan(good.replace(output_name="spyke_v1.5")).warnings == ()


# --- no exception but spyke-lora's leaves plan() or the CLI ---------------------------------------------------------


def test_the_cli_refuses_with_exit_2_and_no_traceback(good, tmp_path, capsys):
    cfg_path = good.replace(extra_args={"gradient_accumulation_steps": 0}).to_toml(tmp_path / "cfg.toml")
    assert main(["plan", str(cfg_path)]) == 2
    assert "gradient_accumulation_steps" in capsys.readouterr().err


def test_every_refusal_is_a_spyke_lora_error(good):
    caption = good.train_dir / "img002.txt"
    caption.write_bytes(b"spyke_plasma_v1, caf\xe9")
    with pytest.raises(SpykeLoraError):
        plan(good)
