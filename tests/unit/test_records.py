"""Run records without the engine: reading runs back, comparing configs, the loss chart."""

import json
import math
import os
import signal

import numpy as np
from PIL import Image

from spyke_lora import StepEnded, TrainConfig, config_diff, loss_chart, runs
from spyke_lora._cli import main
from spyke_lora._lock import output_lock
from spyke_lora._records import event_to_json, read_run
from spyke_lora.events import CheckpointSaved, TrainEnded, TrainStarted

from .test_lock import held_by_another_process


def write_events(path, events, start=1000.0):
    lines = []
    for i, event in enumerate(events):
        record = event_to_json(event)
        record["time"] = start + 10 * i
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def step(n, loss, total=4):
    return StepEnded(n, total, 1, loss, loss, 1e-4, 5e-5, float(n))


def test_a_run_is_read_back_from_its_events(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_events(out / "a.events.jsonl", [
        TrainStarted(4, "mps", "no", out), step(1, 0.3), step(2, 0.2), CheckpointSaved(2, 1, out / "a.st", False),
        TrainEnded("stopped", 2, out / "a.safetensors"),
        TrainStarted(4, "mps", "no", out, resumed_from_step=2), step(3, 0.1), step(4, 0.05),
        TrainEnded("completed", 4, out / "a.safetensors"),
    ], start=1000.0)  # fmt: skip
    record = read_run(out / "a.events.jsonl")
    assert (record.name, record.status, record.steps, record.total_steps, record.checkpoints) == ("a", "completed", 4, 4, 1)
    assert record.final_loss == 0.05 and record.duration_s == 40 + 30  # the pause between the parts is not counted
    assert record.config == out / "a.config.toml"


def test_a_run_without_an_end_is_running_while_locked_else_killed(tmp_path):
    write_events(tmp_path / "b.events.jsonl", [TrainStarted(9, "cpu", "no", tmp_path), step(1, float("nan"), 9)])
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"
    assert math.isnan(read_run(tmp_path / "b.events.jsonl").final_loss)
    cfg = TrainConfig(base_model=tmp_path / "m", train_dir=tmp_path / "1_x", output_dir=tmp_path, output_name="b")
    with output_lock(cfg):  # held in this process
        assert read_run(tmp_path / "b.events.jsonl").status == "running"
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"  # released, no end recorded
    (tmp_path / ".b.lock").write_text("{}")  # a lock file alone means nothing
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"


def test_a_sigkilled_run_reads_killed_not_running_forever(tmp_path, capsys):
    """Bug 4: the lock file a SIGKILLed run leaves behind does not make it look alive in `spyke-lora runs`."""
    write_events(tmp_path / "b.events.jsonl", [TrainStarted(9, "cpu", "no", tmp_path), step(1, 0.5, 9)])
    with held_by_another_process(tmp_path, "b") as holder:
        assert read_run(tmp_path / "b.events.jsonl").status == "running"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".b.lock").exists()
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("b                        killed ")


def test_runs_lists_a_folder_and_its_subfolders_oldest_first(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    write_events(tmp_path / "x" / "late.events.jsonl", [TrainStarted(2, "cpu", "no", tmp_path), step(1, 0.4, 2)], 2000)
    write_events(tmp_path / "early.events.jsonl", [TrainStarted(2, "cpu", "no", tmp_path), step(1, 0.5, 2),
                                                     TrainEnded("failed", 1, None)], 1000)  # fmt: skip
    (tmp_path / "junk.events.jsonl").write_text("not json\n")
    assert [r.name for r in runs(tmp_path)] == ["early", "late"]
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("early") and " failed " in lines[1] and "1/2" in lines[1]


def test_config_diff_names_each_changed_field(tmp_path, capsys):
    a = TrainConfig(base_model=tmp_path / "m", train_dir=tmp_path / "10_x", output_dir=tmp_path, output_name="a")
    b = a.replace(learning_rate=5e-5, output_name="b", sample_cfg_scales=(7,))
    assert config_diff(a, b) == ["output_name: \"a\" -> \"b\"", "learning_rate: 0.0001 -> 5e-05",
                                 "sample_cfg_scales: [5.0, 7.0, 9.0] -> [7.0]"]  # fmt: skip
    assert main(["diff", str(a.to_toml(tmp_path / "a.toml")), str(b.to_toml(tmp_path / "b.toml"))]) == 0
    assert "learning_rate: 0.0001 -> 5e-05" in capsys.readouterr().out


def test_loss_chart_draws_both_lines_and_marks_a_nan(tmp_path):
    history = [StepEnded(i, 10, 1, 1.0 / i, 0.5, 1e-4, None, 0.0) for i in range(1, 10)]
    history.append(StepEnded(10, 10, 1, float("nan"), 0.5, 1e-4, None, 0.0))
    path = loss_chart(history, tmp_path / "loss.png", title="t")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape == (400, 800, 3)
    grey = (np.abs(pixels - [0xAA, 0xAA, 0xAA]).sum(axis=2) == 0).sum()
    blue = (np.abs(pixels - [0x1F, 0x5F, 0xBF]).sum(axis=2) == 0).sum()
    red = (np.abs(pixels - [0xD6, 0x27, 0x28]).sum(axis=2) == 0).sum()
    assert grey > 300 and blue > 300 and red > 100  # the loss, the flat average, the NaN step's marker
    assert not list(tmp_path.glob(".*"))
