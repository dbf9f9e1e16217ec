"""The real engine, the tiny model, 64 px, 5 steps, a checkpoint every 2 steps.

Tests that inspect a run read one of the suite's shared runs (shared_runs.py: ``first_run``, ``sampled_run``,
``uninterrupted``, ``stopped_at_start``); a test whose run ends its own way (a stop, an exception, a full disk)
trains its own."""

import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import shlex
import struct
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from spyke_lora import (
    CheckpointSaved,
    NonFiniteLoss,
    SampleSaved,
    StepEnded,
    Stop,
    TrainConfig,
    TrainEnded,
    TrainingError,
    TrainStarted,
    ValidationEnded,
    plan,
    runs,
    sample,
    sd_scripts_argv,
    train,
    validation_loss,
)
from spyke_lora._device import device_name
from spyke_lora._engine._host import PINNED_COMMIT, VENDORED, host_for
from spyke_lora._lock import output_in_use

from .helpers import NAME, PROMPTS, assert_same_tensors, read_lora


def test_events_arrive_in_order(first_run):
    cfg, events = first_run.cfg, first_run.events
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "TrainStarted",
        "StepEnded", "StepEnded", "CheckpointSaved", "ValidationEnded",
        "StepEnded", "StepEnded", "CheckpointSaved", "ValidationEnded",
        "StepEnded", "CheckpointSaved", "ValidationEnded",
        "TrainEnded",
    ]  # fmt: skip
    started = events[0]
    assert started == TrainStarted(
        total_steps=5,
        device="cpu",
        mixed_precision="no",
        output_dir=cfg.output_dir,
        device_name=device_name("cpu"),
        gradient_checkpointing=started.gradient_checkpointing,
    )
    # gradient_checkpointing "auto": what the event says is what the engine ran (the recorded command line)
    command = (cfg.output_dir / f"{NAME}.command.sh").read_text()
    assert ("--gradient_checkpointing" in command) is started.gradient_checkpointing
    assert started.device_name  # LORA-04: what the device is, in words (the CPU's model here)
    # the dry run said the same: 6 training + 6 regularisation batches per epoch (sd-scripts logs 12), 5 steps
    planned = plan(cfg.replace(overwrite=True))
    assert (planned.steps_per_epoch, planned.total_steps, planned.device) == (12, 5, "cpu")
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert all(s.total_steps == 5 and s.epoch == 1 for s in steps)
    assert all(math.isfinite(s.loss) and s.loss > 0 for s in steps)
    # avg_loss is sd-scripts' running mean over the epoch
    for i, s in enumerate(steps):
        assert s.avg_loss == pytest.approx(sum(x.loss for x in steps[: i + 1]) / (i + 1))
    # cosine schedule without warm-up: starts at the configured rates and decreases
    assert steps[0].lr == pytest.approx(1e-4) and steps[0].lr_text_encoder == pytest.approx(5e-5)
    assert all(a.lr > b.lr for a, b in zip(steps, steps[1:]))
    assert all(a.elapsed_s < b.elapsed_s for a, b in zip(steps, steps[1:]))
    # the memory in use after each step: on the CPU the process's resident memory, which holds the loaded model
    # (the tiny SD1.5 in fp32: over 3 GB) and is no more than this machine has
    assert all(3 * 2**30 < s.memory_bytes < psutil.virtual_memory().total for s in steps)
    assert events[-1] == TrainEnded("completed", 5, cfg.output_dir / f"{NAME}.safetensors")
    # the run's measured peak (resident memory from loading to the end) against plan()'s prediction: the model is
    # not more than 15 % low (a warning would say so), and the peak holds the loaded model (over 5 GiB here)
    ended = events[-1]
    assert 5 * 2**30 < ended.peak_memory_bytes <= 1.15 * ended.predicted_peak_bytes
    # and the budget plan() measured for it (the loss chart's dashed line): the plan's own figure
    assert ended.memory_budget_bytes == first_run.result.memory.budget_bytes > 0


def test_held_out_validation_follows_every_saved_file(first_run):
    """One pass per saved file, on that file's weights: a figure per step, its divergence from the running training
    loss, in the result, the run's records and its loss chart; the dry run announced the same steps."""
    cfg, events, result = first_run.cfg, first_run.events, first_run.result
    validations = [e for e in events if isinstance(e, ValidationEnded)]
    assert [(v.step, v.epoch) for v in validations] == [(2, 1), (4, 1), (5, 1)]
    assert plan(cfg.replace(overwrite=True)).validation.steps == (2, 4, 5)
    assert result.validations == tuple(validations)
    average = {e.step: e.avg_loss for e in events if isinstance(e, StepEnded)}
    for v in validations:
        assert math.isfinite(v.loss) and 0.5 < v.loss < 2
        assert v.divergence == pytest.approx(v.loss - average[v.step], abs=1e-12)
    recorded = [json.loads(line) for line in (cfg.output_dir / f"{NAME}.events.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in recorded if r["event"] == "ValidationEnded"] == [
        (v.step, v.loss) for v in validations
    ]


def test_validation_loss_of_the_files_gives_the_runs_own_figures(first_run):
    """validation_loss() of the files on disk, loaded afresh, reproduces the figures the run reported (to 1e-5;
    on the CPU, exactly), with the base model alone as the step-0 reference."""
    cfg, result, reference = first_run.cfg, first_run.result, first_run.reference
    files = [reference / c.path.name for c in result.checkpoints]
    figures = validation_loss([None, *files], cfg)
    assert [(f.step, f.checkpoint, f.images, f.folder) for f in figures] == [
        (0, None, 2, cfg.validation_dir),
        *((s, p, 2, cfg.validation_dir) for s, p in zip((2, 4, 5), files)),
    ]
    assert [f.loss for f in figures[1:]] == pytest.approx([v.loss for v in result.validations], abs=1e-5)
    assert math.isfinite(figures[0].loss) and figures[0].loss not in [v.loss for v in result.validations]


def test_checkpoints_and_files(first_run):
    cfg, events = first_run.cfg, first_run.events
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert saved == [
        CheckpointSaved(2, 1, cfg.output_dir / f"{NAME}-step00000002.safetensors", False),
        CheckpointSaved(4, 1, cfg.output_dir / f"{NAME}-step00000004.safetensors", False),
        CheckpointSaved(5, 1, cfg.output_dir / f"{NAME}.safetensors", True),
    ]
    assert sorted(p.name for p in cfg.output_dir.glob("*.safetensors")) == [
        f"{NAME}-step00000002.safetensors",
        f"{NAME}-step00000004.safetensors",
        f"{NAME}.safetensors",
    ]
    for event in saved:
        tensors, metadata = read_lora(event.path)
        assert len(tensors) == 792
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
        assert metadata["ss_network_dim"] == "32"
        assert float(metadata["ss_network_alpha"]) == 16.0
        assert metadata["ss_steps"] == str(event.step)
        assert all(
            t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in tensors.values()
        )  # save_precision float


def test_result_summarises_the_run(first_run):
    cfg, result, events = first_run.cfg, first_run.result, first_run.events
    assert result.status == "completed"
    assert result.steps == 5
    assert result.final_path == cfg.output_dir / f"{NAME}.safetensors"
    assert result.checkpoints == tuple(e for e in events if isinstance(e, CheckpointSaved))
    assert result.history == tuple(e for e in events if isinstance(e, StepEnded))
    assert (result.device, result.mixed_precision) == ("cpu", "no")


def test_host_process_is_left_as_it_was(first_run):
    assert first_run.logging_after == first_run.logging_before
    random_before, torch_before, env_before = first_run.process_before
    random_after, torch_after, env_after = first_run.process_after
    assert random_after == random_before and torch.equal(torch_after, torch_before)  # the caller's generators
    # the first run imports cv2 and torch's inductor, which set LD_LIBRARY_PATH / TORCHINDUCTOR_CACHE_DIR themselves
    changed = {k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k)}
    assert changed <= {"LD_LIBRARY_PATH", "TORCHINDUCTOR_CACHE_DIR"}  # the caller's root handlers and level
    assert "library" not in sys.modules and "networks" not in sys.modules and "train_network" not in sys.modules
    assert str(VENDORED) not in sys.path
    gc.collect()  # the models are gone: no tensor of the 2 GB base model (or of the LoRA) is still alive
    assert not [o for o in gc.get_objects() if torch.is_tensor(o) and o.numel() > 10_000]


def test_command_line_reproduces_the_run_bit_for_bit(first_run, tmp_path):
    """The run's recorded NAME.command.sh (sd-scripts' command line: `python vendor/sd-scripts/train_network.py
    *sd_scripts_argv(cfg)`), run from another folder after train(cfg), gives the same LoRA."""
    cfg, result, reference = first_run.cfg, first_run.result, first_run.reference
    library_final = reference / result.final_path.name
    for path in cfg.output_dir.glob("*.safetensors"):
        path.unlink()
    command = cfg.output_dir / f"{NAME}.command.sh"
    words = shlex.split(command.read_text().splitlines()[-1])
    assert words[:3] == ["ACCELERATE_USE_CPU=true", sys.executable, str(VENDORED / "train_network.py")]
    assert words[3:] == sd_scripts_argv(cfg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(command)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(library_final, cfg.output_dir / f"{NAME}.safetensors")
    _, meta_cli = read_lora(cfg.output_dir / f"{NAME}.safetensors")
    _, meta_lib = read_lora(library_final)
    assert meta_cli["ss_steps"] == meta_lib["ss_steps"] == "5"


def test_the_run_leaves_its_records(first_run):
    cfg, events = first_run.cfg, first_run.events
    out = cfg.output_dir
    # the run's own config: gradient_checkpointing "auto" as the memory plan resolved it (docs/memory.md)
    assert TrainConfig.from_toml(out / f"{NAME}.config.toml") == cfg.replace(
        gradient_checkpointing=first_run.result.memory.gradient_checkpointing
    )
    environment = json.loads((out / f"{NAME}.environment.json").read_text())
    assert (environment["device"], environment["mixed_precision"]) == ("cpu", "no")
    assert environment["sd_scripts_commit"] == PINNED_COMMIT
    assert environment["packages"]["torch"] == importlib.metadata.version("torch")
    recorded = [json.loads(line) for line in (out / f"{NAME}.events.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recorded] == [type(e).__name__ for e in events]
    assert [r["step"] for r in recorded if r["event"] == "StepEnded"] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in recorded if r["event"] == "StepEnded"] == first_run.result.losses
    with Image.open(out / f"{NAME}.loss.png") as chart:
        assert chart.size == (800, 400)
    (record,) = runs(out)
    assert (record.name, record.status, record.steps, record.total_steps, record.checkpoints) == (
        NAME,
        "completed",
        5,
        5,
        3,
    )
    assert record.final_loss == first_run.result.losses[-1] and record.duration_s > 0


def test_second_run_in_the_same_process_is_identical(first_run, sampled_run):
    """A later run in the same process (this one with no logging configured, and samples, which change nothing that
    is trained) gives the same files."""
    result, reference, again = first_run.result, first_run.reference, sampled_run.result
    env_before, env_after = sampled_run.env
    assert env_after == env_before  # a run leaves the environment as it was
    # the ~6 GB the run used go back to the system: without malloc_trim, glibc kept 1.5 GB more after every run
    resident_before, resident_after = sampled_run.resident
    assert resident_after - resident_before < 400 * 2**20
    assert again.status == "completed" and again.steps == 5
    assert again.losses == result.losses
    assert again.validations == result.validations  # the held-out figures are deterministic too
    assert [c.path.name for c in again.checkpoints] == [c.path.name for c in result.checkpoints]
    for second in again.checkpoints:
        assert_same_tensors(reference / second.path.name, second.path)


def test_stop_at_step_3_takes_exactly_3_steps(world, out):
    events = []

    def stop_at_3(event):
        events.append(event)
        if isinstance(event, StepEnded) and event.step == 3:
            return Stop("enough")

    result = train(world.config(output_dir=out), callbacks=stop_at_3)
    steps = [e.step for e in events if isinstance(e, StepEnded)]
    assert steps == [1, 2, 3]
    assert result.status == "stopped" and result.steps == 3 and result.stop_reason == "enough"
    final = out / f"{NAME}.safetensors"
    assert result.final_path == final
    assert [type(e).__name__ for e in events[-2:]] == ["CheckpointSaved", "TrainEnded"]
    assert events[-2] == CheckpointSaved(3, 1, final, True)
    assert events[-1] == TrainEnded("stopped", 3, final)
    _, metadata = read_lora(final)
    assert metadata["ss_steps"] == "3"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"{NAME}-step00000002.safetensors",
        f"{NAME}.safetensors",
    ]


def test_callback_exception_propagates_unchanged(world, out):
    class Boom(Exception):
        pass

    events = []

    def explode(event):
        events.append(event)
        if isinstance(event, TrainStarted):
            raise Boom("from the callback")

    with pytest.raises(Boom, match="from the callback"):
        train(world.config(output_dir=out), callbacks=explode)
    assert [type(e).__name__ for e in events] == ["TrainStarted", "TrainEnded"]
    assert events[-1] == TrainEnded("failed", 0, None)
    assert not list(out.glob("*.safetensors"))
    assert "library" not in sys.modules


def test_engine_failure_is_a_training_error(world, out, tmp_path):
    # an SD1.x header with one tensor: the preflight accepts it, sd-scripts fails to load the missing weights
    header = json.dumps({"cond_stage_model.transformer.x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})
    bad_model = tmp_path / "incomplete.safetensors"
    bad_model.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(TrainingError, match="sd-scripts failed"):
        train(world.config(output_dir=out, base_model=bad_model))
    assert "library" not in sys.modules


def test_ctrl_c_delivers_interrupted_and_reraises(world, out):
    events = []

    def press_ctrl_c(event):
        events.append(event)
        if isinstance(event, TrainStarted):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(world.config(output_dir=out), callbacks=press_ctrl_c)
    assert events[-1] == TrainEnded("interrupted", 0, None)
    assert "library" not in sys.modules


def test_epochs_and_sd_scripts_running_average(uninterrupted):
    """3 images x 1 repeat, no regularisation: 3 steps per epoch, so 6 steps span epochs 1 and 2. avg_loss is
    sd-scripts' LossRecorder: in epoch 2 each step replaces the loss at its position of epoch 1. (The resume tests'
    uninterrupted reference: a file every 2 steps.)"""
    cfg, result = uninterrupted.cfg, uninterrupted.result
    assert plan(cfg.replace(overwrite=True)).steps_per_epoch == 3
    steps = result.history
    assert [s.epoch for s in steps] == [1, 1, 1, 2, 2, 2]
    l1, l2, l3, l4, l5, l6 = (s.loss for s in steps)
    assert steps[2].avg_loss == pytest.approx((l1 + l2 + l3) / 3)
    assert steps[3].avg_loss == pytest.approx((l4 + l2 + l3) / 3)
    assert steps[4].avg_loss == pytest.approx((l4 + l5 + l3) / 3)
    assert steps[5].avg_loss == pytest.approx((l4 + l5 + l6) / 3)
    out = cfg.output_dir
    assert result.checkpoints == (
        CheckpointSaved(2, 1, out / f"{NAME}-step00000002.safetensors", False),
        CheckpointSaved(4, 2, out / f"{NAME}-step00000004.safetensors", False),
        CheckpointSaved(6, 2, out / f"{NAME}-step00000006.safetensors", False),
        CheckpointSaved(6, 2, out / f"{NAME}.safetensors", True),
    )


def test_stop_from_a_checkpoint_event_ends_at_that_step(world, out):
    """A Stop returned for a step checkpoint takes effect after sd-scripts' bookkeeping for that save, before the
    next epoch begins: step 3 is the last step of epoch 1 here."""
    events = []

    def stop_on_checkpoint(event):
        events.append(event)
        if isinstance(event, CheckpointSaved) and not event.final:
            return Stop("first checkpoint is enough")

    config = world.config(output_dir=out, num_repeats=1, reg_dir=None, save_every_n_steps=3)
    result = train(config, callbacks=stop_on_checkpoint)
    assert [type(e).__name__ for e in events] == [
        "TrainStarted",
        "StepEnded",
        "StepEnded",
        "StepEnded",
        "CheckpointSaved",
        "CheckpointSaved",
        "TrainEnded",
    ]
    assert events[4] == CheckpointSaved(3, 1, out / f"{NAME}-step00000003.safetensors", False)
    assert events[5] == CheckpointSaved(3, 1, out / f"{NAME}.safetensors", True)
    assert result.status == "stopped" and result.steps == 3
    assert read_lora(out / f"{NAME}.safetensors")[1]["ss_steps"] == "3"
    assert_same_tensors(out / f"{NAME}-step00000003.safetensors", out / f"{NAME}.safetensors")


def test_stop_before_the_first_step_writes_nothing(stopped_at_start):
    run = stopped_at_start
    assert [type(e).__name__ for e in run.events] == ["TrainStarted", "TrainEnded"]
    assert (run.result.status, run.result.steps, run.result.final_path, run.result.checkpoints) == (
        "stopped",
        0,
        None,
        (),
    )
    assert run.result.stop_reason == "changed my mind"
    # nothing written: the one file of that kind left is another output's temporary file, not ours to delete
    assert list(run.out.glob("*.safetensors")) == [run.other]


def test_a_second_run_while_one_is_active_is_refused(stopped_at_start):
    refused = stopped_at_start.refused_nested
    assert len(refused) == 1 and "another spyke-lora run is active in this process" in refused[0]
    assert not (stopped_at_start.root / "nested").exists()  # refused before anything was written


def test_a_nan_loss_stops_the_run_and_keeps_earlier_checkpoints(world, out):
    """A learning rate of 1e30 blows the weights up after the first update: the loss of step 2 is not finite."""
    events = []
    config = world.config(output_dir=out, learning_rate=1e30, unet_lr=1e30, text_encoder_lr=1e30, save_every_n_steps=1)
    with pytest.raises(NonFiniteLoss) as info:
        train(config, callbacks=events.append)
    steps = [e for e in events if isinstance(e, StepEnded)]
    bad = steps[-1]
    assert not math.isfinite(bad.loss) and all(math.isfinite(s.loss) for s in steps[:-1])  # delivered, then stopped
    assert info.value.step == bad.step and f"at step {bad.step}" in str(info.value)
    assert "learning rate too high" in str(info.value)
    assert events[-1] == TrainEnded("failed", bad.step, None)
    written = sorted(p.name for p in out.glob("*.safetensors"))
    assert written == [f"{NAME}-step{s.step:08d}.safetensors" for s in steps[:-1]]  # nothing from broken weights
    assert not list(out.glob(".*partial*"))  # no temporary file left


def test_leftover_partial_files_are_cleaned_up(stopped_at_start):
    """A run's own temporary files left by a run killed while saving go as the next run starts; another output's
    stay."""
    assert not stopped_at_start.leftover.exists() and stopped_at_start.other.exists()


def test_ctrl_c_from_a_callback_at_step_3_keeps_the_step_3_lora(world, out):
    events = []

    def ctrl_c_at_3(event):
        events.append(event)
        if isinstance(event, StepEnded) and event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(world.config(output_dir=out), callbacks=ctrl_c_at_3)
    final = out / f"{NAME}.safetensors"
    assert [e.step for e in events if isinstance(e, StepEnded)] == [1, 2, 3]
    assert events[-2:] == [CheckpointSaved(3, 1, final, True), TrainEnded("interrupted", 3, final)]
    assert read_lora(final)[1]["ss_steps"] == "3"


def test_a_real_ctrl_c_stops_after_the_current_step(world, out, monkeypatch):
    """SIGINT while a step runs: the step finishes, its LoRA and its training state are saved, then
    KeyboardInterrupt; the caller's SIGINT handler is back afterwards."""
    import os
    import signal

    from spyke_lora._engine._probe import Probe

    before = signal.getsignal(signal.SIGINT)
    events = []
    real_after_micro_batch = Probe.after_micro_batch

    def press_ctrl_c_during_step_2(probe, loss):
        real_after_micro_batch(probe, loss)
        if probe.steps_done == 1:  # step 2's forward pass is done, its backward pass and update are not
            # a real SIGINT to this process; CPython runs the handler in this (main) thread before os.kill returns,
            # so it lands mid-step 2 however fast or slow a step is
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Probe, "after_micro_batch", press_ctrl_c_during_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(world.config(output_dir=out, save_state=True), callbacks=events.append)
    final = out / f"{NAME}.safetensors"
    assert [e.step for e in events if isinstance(e, StepEnded)] == [1, 2]  # step 2 ran to its end
    assert events[-2:] == [CheckpointSaved(2, 1, final, True), TrainEnded("interrupted", 2, final)]
    assert read_lora(final)[1]["ss_steps"] == "2"
    assert not (out / f"{NAME}-step00000002.safetensors").exists()  # stopped before step 2's own checkpoint
    state = out / f"{NAME}-step00000002-state"  # resumable: train(cfg, resume="latest") continues at step 3
    assert json.loads((state / "train_state.json").read_text()) == {"current_epoch": 1, "current_step": 2}
    assert json.loads((state / "spyke-lora.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_a_full_disk_mid_run_stops_with_earlier_files_intact(world, out, monkeypatch):
    import errno

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def disk_full_at_step_4(tensors, filename, metadata=None):
        if "step00000004" in filename:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_step_4)
    with pytest.raises(TrainingError) as info:
        train(world.config(output_dir=out))
    message = str(info.value)
    assert f"could not write {out / f'{NAME}-step00000004.safetensors'} at step 4" in message
    assert "No space left on device" in message and f"intact: {NAME}-step00000002.safetensors" in message
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [f"{NAME}-step00000002.safetensors"]
    assert not list(out.glob(".*partial*")) and not output_in_use(out, NAME)
    assert read_lora(out / f"{NAME}-step00000002.safetensors")[1]["ss_steps"] == "2"


def test_sigkill_while_saving_leaves_no_partial_file_under_a_final_name(stopped_at_start):
    """A process killed in the middle of writing step 2's file: the final name never holds a truncated file; the
    half-written temporary file is removed by the next run."""
    out, killed = stopped_at_start.out, stopped_at_start.killed
    assert killed.partial.parent == out and killed.partial.name.startswith(f".{NAME}-step00000002.")
    assert killed.existed  # the half-written file is under its temporary name ...
    assert killed.final_names == []  # ... and no final name holds anything
    assert stopped_at_start.result.status == "stopped"  # the next run took over the dead process's lock ...
    assert not killed.partial.exists()  # ... and cleaned the file up


def test_every_saved_file_is_sampled_by_sd_scripts_without_changing_the_lora(sampled_run, first_run, tmp_path):
    """2 prompts x 2 CFG scales, sampled before training (step 0) and right after each of the 3 files is saved (and
    validated); sampling restores the random generators, so the LoRA files are those of the same run without
    samples."""
    cfg, events, result, prompts = sampled_run.cfg, sampled_run.events, sampled_run.result, PROMPTS
    kinds = [type(e).__name__[0] + (str(e.step) if hasattr(e, "step") else "") for e in events]
    four = lambda step: [f"S{step}"] * 4  # noqa: E731 - SampleSaved: 2 prompts x 2 CFG scales
    assert kinds == [
        "T", *four(0),                      # TrainStarted, then the samples before the first step
        "S1", "S2", "C2", "V2", *four(2),   # StepEnded 1 and 2, the step-2 file, its validation, its samples
        "S3", "S4", "C4", "V4", *four(4),
        "S5", "C5", "V5", *four(5),
        "T",                                # TrainEnded
    ]  # fmt: skip
    samples = [e for e in events if isinstance(e, SampleSaved)]
    checkpoints = {
        0: None,
        2: cfg.output_dir / f"{NAME}-step00000002.safetensors",
        4: cfg.output_dir / f"{NAME}-step00000004.safetensors",
        5: cfg.output_dir / f"{NAME}.safetensors",
    }
    assert [(s.step, s.prompt, s.cfg_scale, s.seed, s.checkpoint) for s in samples] == [
        (step, prompt, scale, 1234, checkpoints[step])
        for step in (0, 2, 4, 5)
        for prompt in prompts
        for scale in (5, 9)
    ]
    pixels = {}
    for s in samples:
        assert s.path.parent == cfg.output_dir / "sample" and s.path.name.startswith(f"{NAME}_{s.step:06d}_")
        with Image.open(s.path) as image:
            assert image.size == (64, 64)
            pixels[s.path] = np.asarray(image.convert("RGB"), dtype=np.int16)
    # the images are not all the same: CFG and prompt change them
    first_step = [pixels[s.path] for s in samples[:4]]
    assert all(np.abs(a - b).max() > 0 for i, a in enumerate(first_step) for b in first_step[i + 1 :])
    manifest = [json.loads(line) for line in (cfg.output_dir / f"{NAME}.samples.jsonl").read_text().splitlines()]
    assert manifest == [
        {
            "step": s.step,
            "prompt": s.prompt,
            "cfg_scale": s.cfg_scale,
            "seed": 1234,
            "path": f"sample/{s.path.name}",
            "checkpoint": s.checkpoint.name if s.checkpoint else None,
            # the file's identity (issue 23): the step and hash sd-scripts stored in it when it was saved
            **(
                {"ss_steps": s.step, "sshs_model_hash": read_lora(s.checkpoint)[1]["sshs_model_hash"]}
                if s.checkpoint
                else {}
            ),
        }
        for s in samples
    ]
    prompt_file = (cfg.output_dir / f"{NAME}_sample_prompts.txt").read_text().splitlines()[1:]
    assert prompt_file[1] == "spyke_plasma_v1, standing in a forest --w 64 --h 64 --d 1234 --l 9.0 --s 1"
    for saved in result.checkpoints:
        assert_same_tensors(saved.path, first_run.reference / saved.path.name)
    # sampling the files afterwards, with the same settings, gives the training run's images, bit for bit
    later = cfg.replace(output_dir=tmp_path / "later", sample_at_first=False)
    again = sample([cfg.output_dir / f"{NAME}.safetensors", cfg.output_dir], later)
    assert [(s.step, s.prompt, s.cfg_scale, s.checkpoint) for s in again] == [
        (s.step, s.prompt, s.cfg_scale, s.checkpoint) for s in samples if s.step
    ]
    for before, after in zip([s for s in samples if s.step], again):
        assert after.path.parent == later.output_dir / "sample"
        with Image.open(after.path) as image:
            assert (np.asarray(image.convert("RGB"), dtype=np.int16) == pixels[before.path]).all(), after.path.name
    lines = (later.output_dir / f"{NAME}.samples.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["checkpoint"] == str(cfg.output_dir / f"{NAME}-step00000002.safetensors")
    # sd-scripts extends this class list in place when it builds a network from a file; left so, the next run's
    # LoRA would also wrap the layers of every ResNet block (another LoRA, other losses)
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        lora_module = importlib.import_module("networks.lora")
        assert lora_module.LoRANetwork.UNET_TARGET_REPLACE_MODULE == ["Transformer2DModel"]


def _without_time(event):
    return dataclasses.replace(event, elapsed_s=0.0, memory_bytes=None) if isinstance(event, StepEnded) else event


def _moved(event, folder):
    """``event`` as the same run writing into ``folder`` delivers it."""
    if isinstance(event, TrainStarted):
        return dataclasses.replace(event, output_dir=folder)
    if isinstance(event, CheckpointSaved):
        return dataclasses.replace(event, path=folder / event.path.name)
    if isinstance(event, TrainEnded) and event.final_path is not None:
        return dataclasses.replace(event, final_path=folder / event.final_path.name)
    return event


def test_iter_events_yields_what_callbacks_get(sampled_run, first_run):
    """The stream's events are the callbacks' ones. The sampled run streams the first run's config (which got its
    events through a callback) with samples added: less its SampleSaved events, the stream yields the first run's
    events, in the same order, with the same losses, held-out figures and files."""
    folder = sampled_run.cfg.output_dir
    expected = [_moved(_without_time(e), folder) for e in first_run.events]
    streamed = [_without_time(e) for e in sampled_run.events if not isinstance(e, SampleSaved)]
    assert streamed == expected  # same order, same losses, same files
    assert sampled_run.result.status == "completed" and sampled_run.result.steps == 5


def test_tensorboard_logs_the_losses_of_every_step(sampled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = sampled_run.cfg.output_dir, sampled_run.result
    (run,) = (out / "tensorboard").iterdir()
    assert run.name.startswith(f"{NAME}-")  # sd-scripts appends the start time
    (logs,) = {p.parent for p in run.rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(logs)).Reload()
    current = scalars.Scalars("loss/current")
    assert [s.step for s in current] == [1, 2, 3, 4, 5]
    assert [s.value for s in current] == pytest.approx(result.losses, rel=1e-6)
