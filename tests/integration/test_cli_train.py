"""`spyke-lora train`: exit 0 with one line per event, 1 when the run fails."""

import json
import struct

from spyke_lora._cli import main
from spyke_lora._device import device_name


def test_train_command_runs_and_prints_each_event(world, out, tmp_path, capsys):
    config = world.config(output_dir=out).to_toml(tmp_path / "tiny.toml")
    log = tmp_path / "engine.log"
    code = main(
        [
            "train",
            str(config),
            "--set",
            "max_train_steps=2",
            "--set",
            "save_every_n_steps=none",
            "--engine-log",
            str(log),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        f"started: 2 steps on cpu ({device_name('cpu')}, mixed precision no, gradient checkpointing "
    )
    assert lines[1].startswith("step 1/2  epoch 1  loss ") and lines[2].startswith("step 2/2")
    assert lines[3] == f"final (step 2): {out / 'spyke_plasma_v1.safetensors'}"
    assert lines[4].startswith(
        f"ended: completed after 2 steps; final LoRA {out / 'spyke_plasma_v1.safetensors'}; peak memory "
    )
    assert "num batches per epoch" in log.read_text()  # sd-scripts' own output went to the log
    # save_every_n_steps = none: the final file alone (moved here from the epochs test, whose run now saves every 2)
    assert [p.name for p in out.glob("*.safetensors")] == ["spyke_plasma_v1.safetensors"]


def test_a_failed_run_exits_1(world, out, tmp_path, capsys):
    header = json.dumps({"cond_stage_model.transformer.x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})
    model = tmp_path / "incomplete.safetensors"
    model.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    config = world.config(output_dir=out, base_model=model).to_toml(tmp_path / "bad.toml")
    assert main(["train", str(config), "--engine-log", str(tmp_path / "engine.log")]) == 1
    assert "spyke-lora: error: sd-scripts failed" in capsys.readouterr().err
