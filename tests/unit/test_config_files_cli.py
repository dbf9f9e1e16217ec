"""Issue 22, groups 8 and 9 and part of 6: config files as a Windows editor saves them, the CLI's messages and its
last-resort handler, `argv` writing nothing, run records and contact sheets that cannot be read or written, the
kohya habit of a `train_dir` one folder too high, and the seeds and `clip_skip` sd-scripts cannot use."""

import json
import os
import shlex
from pathlib import Path

import pytest

from spyke_lora import SpykeLoraWarning, TrainConfig, runs
from spyke_lora._cli import main
from spyke_lora._compare import contact_sheet
from spyke_lora._deploy import deploy
from spyke_lora._errors import ConfigError, DeployError, SpykeLoraError
from spyke_lora.events import StepEnded, TrainEnded, TrainStarted

from .conftest import write_images, write_model
from .test_compare import fake_run
from .test_deploy import comfy, lora  # noqa: F401  (fixtures)
from .test_records import write_events

TEXT = (
    "# spyke-lora config, saved by a Windows editor\n"
    'base_model = "m.safetensors"\n'
    'train_dir = "10_spyke_plasma_v1"\n'
    'output_dir = "out"\n'
    'output_name = "spyke_plasma_v1"\n'
    'sample_negative_prompt = "lowres, café"\n'
)


def expected(tmp_path):
    return TrainConfig.from_dict(tomllib_loads(TEXT), base_dir=tmp_path)


def tomllib_loads(text):
    from spyke_lora._config import tomllib

    return tomllib.loads(text)


# --- group 8: config files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: b"\xef\xbb\xbf" + t.encode("utf-8"),  # Notepad's "UTF-8 with BOM"
        lambda t: b"\xef\xbb\xbf" + t.replace("\n", "\r\n").encode("utf-8"),  # ... with Windows line ends
        lambda t: t.encode("utf-16"),  # Notepad's "Unicode": UTF-16 LE with its BOM
        lambda t: b"\xfe\xff" + t.encode("utf-16-be"),  # UTF-16 BE with its BOM
        lambda t: t.replace("\n", "\r\n").encode("utf-16"),
        lambda t: t.encode("utf-32"),  # UTF-32 with its BOM
    ],
    ids=["utf8-bom", "utf8-bom-crlf", "utf16le-bom", "utf16be-bom", "utf16-bom-crlf", "utf32-bom"],
)
def test_a_config_with_a_byte_order_mark_is_read(tmp_path, encode):
    path = tmp_path / "c.toml"
    path.write_bytes(encode(TEXT))
    assert TrainConfig.from_toml(path) == expected(tmp_path)


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_byte_order_mark_says_save_it_as_utf8(tmp_path, codec):
    path = tmp_path / "c.toml"
    path.write_bytes(TEXT.encode(codec))
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(path)
    message = str(e.value)
    assert str(path) in message and "UTF-16" in message and "save it as UTF-8" in message


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        (TEXT.encode("latin-1"), 0xE9),  # Latin-1 "é"
        (TEXT.replace("café", "“café”").encode("cp1252"), 0x93),  # Windows-1252 quotes
        (b'output_name = "x"\n\xff\xfe\xfa = 1\n', 0xFF),  # garbage, and not a BOM (not at the start)
    ],
    ids=["latin-1", "cp1252-quotes", "garbage"],
)
def test_bytes_that_are_not_utf8_are_named_with_their_offset(tmp_path, text, bad):
    offset = text.index(bytes([bad]))
    path = tmp_path / "c.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(path)
    message = str(e.value)
    assert str(path) in message and "not UTF-8" in message
    assert f"0x{bad:02X}" in message and f"offset {offset}" in message and "save it as UTF-8" in message


def test_a_binary_file_given_as_the_config_is_refused(tmp_path):
    path = write_model(tmp_path / "model.safetensors")  # the base model, passed in the config's place
    with pytest.raises(ConfigError, match="model.safetensors") as e:
        TrainConfig.from_toml(path)
    assert "TOML" in str(e.value) or "UTF-8" in str(e.value)


def test_a_config_path_that_is_a_folder_names_it_and_its_toml_files(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "spyke.toml").write_text(TEXT)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(tmp_path / "runs")
    message = str(e.value)
    assert repr(str(tmp_path / "runs")) in message and "is a folder" in message and "spyke.toml" in message
    with pytest.raises(ConfigError, match="is a folder, not a TOML file"):
        TrainConfig.from_toml(tmp_path)  # no .toml inside: still named, no traceback


def test_a_missing_config_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.toml' does not exist; check the path"):
        TrainConfig.from_toml(tmp_path / "nope.toml")


def test_an_unreadable_config_names_it(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(TEXT)
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(path)
    assert repr(str(path)) in str(e.value) and "cannot be read" in str(e.value) and "ermission" in str(e.value)


def test_a_symlink_loop_as_the_config_names_it(tmp_path):
    loop = tmp_path / "loop.toml"
    loop.symlink_to(tmp_path / "loop.toml")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(loop)
    assert repr(str(loop)) in str(e.value) and "cannot be read" in str(e.value)


@pytest.mark.parametrize("command", ["plan", "train", "argv", "doctor", "sample", "validate"])
def test_every_cli_command_names_a_bad_config_file_without_a_traceback(tmp_path, capsys, command):
    folder = tmp_path / "cfgdir"
    folder.mkdir()
    extra = [str(tmp_path / "x.safetensors")] if command == "sample" else []
    assert main([command, str(folder), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spyke-lora: error: ") and "is a folder" in err and "Traceback" not in err
    bad = tmp_path / "c.toml"
    bad.write_bytes(TEXT.encode("utf-16-le"))
    assert main([command, str(bad), *extra]) == 2
    assert "save it as UTF-8" in capsys.readouterr().err


def test_diff_of_a_folder_and_a_latin1_file(tmp_path, capsys):
    good = tmp_path / "a.toml"
    good.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    bad = tmp_path / "b.toml"
    bad.write_bytes(TEXT.encode("latin-1"))
    assert main(["diff", str(good), str(bad)]) == 2
    assert "offset" in capsys.readouterr().err
    assert main(["diff", str(good), str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# --- group 8: run records ----------------------------------------------------------------------------------------


def a_run(folder, name="a"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.events.jsonl"
    write_events(
        path,
        [
            TrainStarted(4, "cpu", "no", folder),
            StepEnded(1, 4, 1, 0.3, 0.3, 1e-4, 5e-5, 1.0),
            StepEnded(2, 4, 1, 0.2, 0.25, 1e-4, 5e-5, 2.0),
            TrainEnded("completed", 2, folder / f"{name}.safetensors"),
        ],
    )
    return path


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b.replace(b'"cpu"', b'"cp\xe9u"'),  # a non-UTF-8 byte inside an event
        lambda b: b + b"\xff\xfe garbage \x80\n",  # a line of garbage bytes
        lambda b: b + b'{"event": "StepEnded", "ti',  # a torn last line (a kill mid-write)
        lambda b: b.replace(b"\n", b"\n42\n", 1),  # JSON, but not an event
        lambda b: b.replace(b"\n", b'\n{"time": 1}\n', 1),  # an object without its event name
        lambda b: b + b'{"event": "StepEnded", "time": 2000.0}\n',  # an event without its fields
        lambda b: b + b'{"event": "TrainEnded", "time": "soon", "status": 3}\n',  # fields of the wrong type
        lambda b: b[: b.index(b"\n") + 1] + b'{"event": "StepEnded", "time": 1001, "step": "x", "loss": 1}\n',
    ],
    ids=["latin1-byte", "garbage-line", "torn-line", "not-an-object", "no-event", "no-fields", "bad-types", "bad-step"],
)
def test_runs_reads_damaged_records_without_a_traceback(tmp_path, capsys, damage):
    path = a_run(tmp_path / "out")
    path.write_bytes(damage(path.read_bytes()))
    a_run(tmp_path / "out", name="b")  # an intact run beside it is still listed
    with pytest.warns(SpykeLoraWarning, match=r"a\.events\.jsonl") as caught:
        found = runs(tmp_path)
    assert "b" in [r.name for r in found]
    assert any(word in str(w.message) for w in caught for word in ("skipped", "replaced", "cannot be read"))
    assert main(["runs", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and any(line.startswith("b ") for line in captured.out.splitlines())
    assert "a.events.jsonl" in captured.err  # said so


def test_runs_skips_a_record_that_is_a_folder_and_says_so(tmp_path, capsys):
    a_run(tmp_path / "out")
    (tmp_path / "out" / "weird.events.jsonl").mkdir()
    with pytest.warns(SpykeLoraWarning, match="weird.events.jsonl"):
        assert [r.name for r in runs(tmp_path / "out")] == ["a"]


def test_runs_of_a_file_or_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    path = a_run(tmp_path / "out")
    assert main(["runs", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "invalid configuration" not in err
    assert main(["runs", str(tmp_path / "nope")]) == 2


# --- group 8: contact sheets, compare ----------------------------------------------------------------------------


def test_a_contact_sheet_into_a_read_only_folder_is_refused_before_the_samples_are_read(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    import spyke_lora._compare._sheet as sheet

    def no_review(*args, **kwargs):
        raise AssertionError("the samples were read before the folder was checked")

    monkeypatch.setattr(sheet, "review", no_review)
    with pytest.raises(SpykeLoraError) as e:
        contact_sheet(run, out=locked / "sheet.png", cell=64)
    assert repr(str(locked)) in str(e.value) and "cannot be written" in str(e.value)
    with pytest.raises(SpykeLoraError, match="cannot be written"):
        contact_sheet(run, out=locked, cell=64)  # the folder itself as `out`


def test_a_contact_sheet_into_the_run_folder_when_it_is_read_only(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != run and real_access(p, mode, **kw))
    with pytest.raises(SpykeLoraError, match="cannot be written") as e:
        contact_sheet(run, cell=64)
    assert str(run) in str(e.value) and "--out" in str(e.value)


def test_a_contact_sheet_whose_write_fails_names_the_folder(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    import spyke_lora._compare._sheet as sheet

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(sheet, "atomic_path", read_only)
    with pytest.raises(SpykeLoraError) as e:
        contact_sheet(run, cell=64)
    assert str(run) in str(e.value) and "Read-only file system" in str(e.value)


def test_a_contact_sheet_under_a_file_is_refused(tmp_path):
    run = fake_run(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SpykeLoraError) as e:
        contact_sheet(run, out=tmp_path / "notes.txt" / "sheet.png", cell=64)
    assert "notes.txt" in str(e.value) and "is a file" in str(e.value)


def test_compare_read_only_out_from_the_cli(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("x")
    assert main(["compare", str(run), "--out", str(tmp_path / "notes.txt" / "s.png"), "--cell", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spyke-lora: error: ") and "is a file" in err and "invalid configuration" not in err


@pytest.mark.parametrize("layout", ["empty-folder", "empty-manifest", "wrong-name"])
def test_compare_without_samples_says_what_is_missing_and_how_to_make_them(tmp_path, capsys, layout):
    run = tmp_path / "run"
    run.mkdir()
    args = ["compare", str(run)]
    if layout == "empty-manifest":
        (run / "x.samples.jsonl").write_text("")
    if layout == "wrong-name":
        args += ["--name", "nope"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" not in err and "Traceback" not in err
    assert err.startswith("spyke-lora: error: ") and "spyke-lora sample" in err and "sample_prompts" in err


# --- group 8: argv writes nothing ---------------------------------------------------------------------------------


def argv_config(tmp_path, **changes):
    write_model(tmp_path / "m.safetensors")
    write_images(tmp_path / "10_spyke_plasma_v1", 2, "spyke_plasma_v1")
    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        output_dir=tmp_path / "o",
        output_name="spyke_plasma_v1",
        **changes,
    )
    return cfg.to_toml(tmp_path / "c.toml")


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("existing_output", [False, True])
def test_argv_prints_the_command_and_the_files_it_reads_but_writes_nothing(tmp_path, capsys, existing_output):
    config = argv_config(tmp_path)
    if existing_output:
        (tmp_path / "o").mkdir()
    before = files_under(tmp_path)
    assert main(["argv", str(config), "--device", "cpu"]) == 0
    assert files_under(tmp_path) == before  # not even output_dir is created
    captured = capsys.readouterr()
    words = shlex.split(captured.out)
    dataset = words[words.index("--dataset_config") + 1]
    prompts = words[words.index("--sample_prompts") + 1]
    assert dataset == str(tmp_path / "o" / "spyke_plasma_v1_dataset.toml")
    assert dataset in captured.err and prompts in captured.err and "not written" in captured.err
    assert "num_repeats = 10" in captured.err and "spyke_plasma_v1, standing in a forest" in captured.err
    assert "spyke-lora train" in captured.err  # who writes them


def test_argv_without_samples_names_only_the_dataset_toml(tmp_path, capsys):
    config = argv_config(tmp_path, sample_prompts=())
    before = files_under(tmp_path)
    assert main(["argv", str(config), "--device", "cpu"]) == 0
    assert files_under(tmp_path) == before
    captured = capsys.readouterr()
    assert "--sample_prompts" not in captured.out and "sample prompts" not in captured.err


def test_argv_with_a_dataset_config_writes_nothing_and_names_the_users_file(tmp_path, capsys):
    write_model(tmp_path / "m.safetensors")
    write_images(tmp_path / "img", 2, "x")
    (tmp_path / "d.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n')
    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors",
        dataset_config=tmp_path / "d.toml",
        output_dir=tmp_path / "o",
        output_name="x",
        sample_prompts=(),
    )
    config = cfg.to_toml(tmp_path / "c.toml")
    before = files_under(tmp_path)
    assert main(["argv", str(config), "--device", "cpu"]) == 0
    assert files_under(tmp_path) == before
    assert str(tmp_path / "d.toml") in capsys.readouterr().out


# --- group 9: messages that point at the wrong cause --------------------------------------------------------------


def kohya_parent(tmp_path, *names):
    parent = tmp_path / "img"
    for name in names:
        write_images(parent / name, 2, "spyke_plasma_v1")
    write_model(tmp_path / "m.safetensors")
    return parent


def config_with(tmp_path, **changes):
    values = dict(base_model=tmp_path / "m.safetensors", output_dir=tmp_path / "o", output_name="spyke_plasma_v1")
    return TrainConfig(**{**values, **changes})


def test_train_dir_one_folder_too_high_offers_the_folder_inside(tmp_path):
    parent = kohya_parent(tmp_path, "10_spyke_plasma_v1")
    with pytest.raises(ConfigError) as e:
        config_with(tmp_path, train_dir=parent)
    message = str(e.value)
    assert "holds" in message and f"train_dir = '{parent / '10_spyke_plasma_v1'}'" in message
    assert "'10_img'" not in message  # the old fix renamed the parent


def test_train_dir_above_several_kohya_folders_offers_one_or_a_dataset_toml(tmp_path):
    parent = kohya_parent(tmp_path, "10_spyke_plasma_v1", "5_spyke_alt")
    with pytest.raises(ConfigError) as e:
        config_with(tmp_path, train_dir=parent)
    message = str(e.value)
    assert "10_spyke_plasma_v1" in message and "5_spyke_alt" in message
    assert "dataset_config" in message and "'10_img'" not in message


def test_train_dir_above_a_kohya_folder_in_a_toml_file(tmp_path):
    parent = kohya_parent(tmp_path, "10_spyke_plasma_v1")
    path = tmp_path / "c.toml"
    path.write_text(TEXT.replace('"10_spyke_plasma_v1"', '"img"'))
    with pytest.raises(ConfigError, match=r"train_dir = '.*10_spyke_plasma_v1'") as e:
        TrainConfig.from_toml(path)
    assert str(path) in str(e.value) and parent.name in str(e.value)


def test_a_folder_without_kohya_subfolders_keeps_the_rename_fix(tmp_path):
    write_images(tmp_path / "img" / "misc", 1, "x")  # a subfolder, but not an N_ one
    with pytest.raises(ConfigError, match=r"set `num_repeats = 10` or rename the folder to '10_img'"):
        config_with(tmp_path, train_dir=tmp_path / "img")


def test_deploy_config_given_a_folder_names_the_config_inside(comfy, lora, tmp_path, capsys):  # noqa: F811
    run_dir = lora.parent
    (run_dir / "spyke_plasma_v1.config.toml").write_text(TEXT)
    with pytest.raises(DeployError) as e:
        deploy(lora, comfy, config=run_dir)
    message = str(e.value)
    assert "is a folder" in message and "does not exist" not in message
    assert str(run_dir / "spyke_plasma_v1.config.toml") in message
    assert main(["deploy", str(lora), "--comfyui", str(comfy), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "NAME.config.toml" in err


def test_deploy_config_in_utf16_is_read(comfy, lora, tmp_path):  # noqa: F811
    path = tmp_path / "c.toml"
    path.write_bytes(TEXT.encode("utf-16"))
    record = json.loads(deploy(lora, comfy, config=path).sidecar.read_text())
    assert record["config"]["output_name"] == "spyke_plasma_v1"


# --- group 6 (part): seeds and clip_skip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("seed", -42),
        ("seed", 2**32),
        ("seed", 2**63 - 1),
        ("sample_seed", -1),
        ("sample_seed", 2**32),
        ("validation_seed", -1),
        ("validation_seed", 2**40),
    ],
)
def test_a_seed_numpy_cannot_take_is_refused(tmp_path, field, value):
    with pytest.raises(ConfigError) as e:
        config_with(tmp_path, train_dir=tmp_path / "10_x", **{field: value})
    message = str(e.value)
    assert f"`{field}`" in message and str(value) in message and "4294967295" in message
    if value == -1:
        assert "random" in message  # the UI habit, named


@pytest.mark.parametrize(("field", "value"), [("seed", 0), ("seed", 2**32 - 1), ("sample_seed", 0)])
def test_seeds_at_the_ends_of_the_range_are_kept(tmp_path, field, value):
    assert getattr(config_with(tmp_path, train_dir=tmp_path / "10_x", **{field: value}), field) == value


@pytest.mark.parametrize("value", [13, 14, 24, 100])
def test_clip_skip_beyond_the_text_encoders_layers_is_refused(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        config_with(tmp_path, train_dir=tmp_path / "10_x", clip_skip=value)
    message = str(e.value)
    assert "`clip_skip`" in message and str(value) in message and "12 layers" in message and "try 2" in message


def test_clip_skip_of_twelve_is_kept_and_the_set_option_is_checked_too(tmp_path, capsys):
    assert config_with(tmp_path, train_dir=tmp_path / "10_x", clip_skip=12).clip_skip == 12
    config = argv_config(tmp_path)
    assert main(["plan", str(config), "--set", "clip_skip=13"]) == 2
    assert "`clip_skip`" in capsys.readouterr().err
    assert main(["plan", str(config), "--set", "seed=-1"]) == 2
    assert "`seed`" in capsys.readouterr().err


# --- the CLI's last resort -----------------------------------------------------------------------------------------


def test_an_unexpected_exception_is_one_line_with_where_to_report_it(tmp_path, capsys, monkeypatch):
    import spyke_lora._plan as plan_module

    def broken(*args, **kwargs):
        raise RuntimeError("something no check foresaw")

    monkeypatch.setattr(plan_module, "plan", broken)
    assert main(["plan", str(argv_config(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("spyke-lora: internal error: RuntimeError: something no check foresaw")
    assert "report" in err


def test_ctrl_c_is_still_exit_130(tmp_path, capsys, monkeypatch):
    import spyke_lora._plan as plan_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_module, "plan", interrupted)
    assert main(["plan", str(argv_config(tmp_path))]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("resolutions", ["abc", "64,,128", "64,-128", "0"])
def test_calibrate_with_bad_resolutions_is_refused_before_it_measures(capsys, resolutions, monkeypatch):
    import spyke_lora._calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "calibrate", lambda *a, **k: pytest.fail("it measured"))
    assert main(["calibrate", "--device", "cpu", "--resolutions", resolutions]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spyke-lora: error: ") and "--resolutions" in err and repr(resolutions) in err


def test_argv_with_an_unreadable_train_dir_still_prints_the_command(tmp_path, capsys, monkeypatch):
    config = argv_config(tmp_path)
    real_iterdir = Path.iterdir

    def denied(self):
        if self.name == "10_spyke_plasma_v1":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert main(["argv", str(config), "--device", "cpu"]) == 0
    assert "--dataset_config" in capsys.readouterr().out
