"""Training states without the engine: finding them, refusing a resume that would train differently, cleanup."""

import json
import struct
import sys

import pytest

from spyke_lora import ConfigError, plan
from spyke_lora._engine import existing_outputs
from spyke_lora._engine._frames import set_frame_local
from spyke_lora._engine._state import (
    RECORD_NAME,
    find_states,
    remove_partial_states,
    resolve_resume,
    state_record,
)

NAME = "spyke_plasma_v1"


def write_state(cfg, name, step, epoch=1, record=True):
    folder = cfg.output_dir / name
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
    if record:
        (folder / RECORD_NAME).write_text(json.dumps(dict(state_record(cfg), step=step, epoch=epoch)))
    return folder


def write_lora(path, steps):
    meta = {
        "__metadata__": {"ss_steps": str(steps)},
        "lora_unet_x.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
    }
    header = json.dumps(meta).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def test_latest_is_the_highest_step(good):
    for name, step in ((f"{NAME}-step00000002-state", 2), (f"{NAME}-step00000004-state", 4), (f"{NAME}-state", 3)):
        write_state(good, name, step)
    write_state(good, "other_name-step00000009-state", 9)  # another output_name
    assert [s.step for s in find_states(good)] == [2, 3, 4]
    assert resolve_resume(good, "latest").path.name == f"{NAME}-step00000004-state"
    assert resolve_resume(good, good.output_dir / f"{NAME}-state").step == 3


def test_no_state_names_the_folder_and_the_fix(good):
    with pytest.raises(ConfigError, match=r"no saved training state of `spyke_plasma_v1` in .*save_state = true"):
        resolve_resume(good, "latest")
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_resume(good, good.output_dir / "nope")


def test_a_state_from_another_tool_is_not_resumed_blindly(good):
    folder = write_state(good, f"{NAME}-step00000002-state", 2, record=False)
    with pytest.raises(ConfigError, match="was not saved by spyke-lora"):
        resolve_resume(good, folder)


def test_every_training_difference_is_listed_and_harmless_ones_are_not(good):
    write_state(good, f"{NAME}-step00000002-state", 2)
    changed = good.replace(
        text_encoder_lr=1e-5,
        lr_scheduler="constant",
        resolution=128,
        save_every_n_steps=1,
        save_state=True,
        overwrite=True,
        extra_args={"noise_offset": 0.1, "max_data_loader_n_workers": 2},
    )
    with pytest.raises(ConfigError) as refused:
        resolve_resume(changed, "latest")
    problems = refused.value.problems
    assert any("`text_encoder_lr` was 5e-05, now 1e-05" in p for p in problems)
    assert any("`lr_scheduler` was 'cosine', now 'constant'" in p for p in problems)
    assert any("`resolution` was 64, now 128" in p for p in problems)
    assert any("`extra_args` was {}, now {'noise_offset': 0.1}" in p for p in problems)
    assert not any(k in " ".join(problems) for k in ("save_every_n_steps", "overwrite", "save_state`", "workers"))
    assert all(p.startswith("cannot resume from ") for p in problems)


def test_a_changed_dataset_is_listed_file_by_file(good):
    write_state(good, f"{NAME}-step00000002-state", 2)
    (good.train_dir / "img000.txt").write_text("spyke_plasma_v1, blue disc")
    (good.train_dir / "img002.png").unlink()
    (good.train_dir / "img002.txt").unlink()
    with pytest.raises(ConfigError) as refused:
        resolve_resume(good, "latest")
    text = str(refused.value)
    assert "1 file(s) changed (img000.txt)" in text and "2 file(s) removed (img002.png, img002.txt)" in text


def test_gradient_accumulation_resumes_are_refused(good):
    cfg = good.replace(extra_args={"gradient_accumulation_steps": 2})
    write_state(cfg, f"{NAME}-step00000002-state", 2)
    with pytest.raises(ConfigError, match="kohya-ss/sd-scripts#2407"):
        resolve_resume(cfg, "latest")


def test_plan_of_a_resume(good):
    write_state(good, f"{NAME}-step00000002-state", 2)
    write_lora(good.output_dir / f"{NAME}-step00000002.safetensors", 2)
    write_lora(good.output_dir / f"{NAME}.safetensors", 3)  # a stop at step 3 saved the final name...
    with pytest.raises(ConfigError, match=r"would replace 1 file\(s\) saved later \(spyke_plasma_v1.safetensors\)"):
        plan(good, resume="latest")  # ...so resuming from step 2 would lose step 3's LoRA
    write_lora(good.output_dir / f"{NAME}.safetensors", 2)
    p = plan(good, resume="latest")
    assert (p.resume_step, [s for s, _ in p.checkpoints]) == (2, [4])
    i = p.argv.index("--resume")
    assert p.argv[i + 1] == str(good.output_dir / f"{NAME}-step00000002-state")
    assert "--skip_until_initial_step" in p.argv
    with pytest.raises(ConfigError, match="already exist"):
        plan(good)  # without resume the same files are an earlier run's: refused
    write_state(good, f"{NAME}-step00000005-state", 5)
    with pytest.raises(ConfigError, match="it is at step 5 and this run ends at step 5, so there is nothing left"):
        plan(good, resume="latest")


def test_existing_outputs_after_a_step(good):
    write_lora(good.output_dir / f"{NAME}-step00000002.safetensors", 2)
    write_lora(good.output_dir / f"{NAME}-step00000004.safetensors", 4)
    write_lora(good.output_dir / f"{NAME}.safetensors", 4)
    write_state(good, f"{NAME}-step00000004-state", 4)
    later = {p.name for p in existing_outputs(good, after_step=2)}
    assert later == {f"{NAME}-step00000004.safetensors", f"{NAME}.safetensors", f"{NAME}-step00000004-state"}
    assert existing_outputs(good, after_step=4) == []


def test_resume_options_are_managed(good):
    with pytest.raises(ConfigError, match=r"`extra_args.resume` cannot be set: pass `resume=` to train\(\)"):
        plan(good.replace(extra_args={"resume": "x"}))
    with pytest.raises(ConfigError, match="`extra_args.save_state` duplicates the config field `save_state`"):
        plan(good.replace(extra_args={"save_state": True}))


def test_leftover_state_folders_are_cleaned_up(good):
    out = good.output_dir
    final = write_state(good, f"{NAME}-step00000002-state", 2)
    (out / f".{NAME}-step00000004-state.123.partial").mkdir()  # killed while writing: removed
    # killed between moving the previous state aside and renaming the new one: the previous one comes back
    moved = out / f".{NAME}-state.123.old"
    moved.mkdir()
    (moved / "train_state.json").write_text("{}")
    (out / f".{NAME}-state.123.partial").mkdir()
    (out / ".other-state.1.partial").mkdir()  # another output_name's: left alone
    remove_partial_states(good)
    assert sorted(p.name for p in out.iterdir()) == [".other-state.1.partial", f"{NAME}-state", final.name]
    assert (out / f"{NAME}-state" / "train_state.json").read_text() == "{}"


def test_a_running_frames_local_can_be_corrected():
    def caller():
        value = 1
        callee()
        return value

    def callee():
        set_frame_local(sys._getframe(1), "value", 7)

    assert caller() == 7


def test_cli_plan_resume(good, tmp_path, capsys):
    from spyke_lora._cli import main

    config = good.to_toml(tmp_path / "run.toml")
    assert main(["plan", str(config), "--resume"]) == 2
    assert "no saved training state of `spyke_plasma_v1`" in capsys.readouterr().err
    state = write_state(good, f"{NAME}-step00000002-state", 2)
    assert main(["plan", str(config), "--resume"]) == 0
    assert f"resume          after step 2 from {state}; 3 steps left" in capsys.readouterr().out
    assert main(["plan", str(config), "--resume", str(state)]) == 0
