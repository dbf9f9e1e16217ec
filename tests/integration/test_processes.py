"""Two CPU processes with gloo, started by accelerate's launcher: the real engine on the tiny world (docs/scaling.md).

A 2-process run costs a minute or more on this 2-core machine (three processes start, two load the model), so the
runs are shared: one run, caching its latents to disk, is stopped by a callback at its first saved file (step 2) and
resumed to its end (a completed run, its steps, its events, one file per checkpoint, samples and validation on rank
0), and one has a worker killed."""

import math
import shutil

import psutil
import pytest

from spyke_lora import (
    CheckpointSaved,
    ConfigError,
    SampleSaved,
    StepEnded,
    Stop,
    TrainEnded,
    TrainStarted,
    ValidationEnded,
    WorkerFailed,
    plan,
    train,
)

from .helpers import read_lora

PROMPTS = ("spyke_plasma_v1, a red disc", "spyke_plasma_v1, a blue square")


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """A 2-process run of 4 steps (a checkpoint every 2, a state with each, a validation pass at each saved file,
    latents cached to disk beside the images: sd-scripts splits that caching between the processes) stopped by a
    callback at its first saved file and resumed to its end, also in 2 processes, with 2 prompts sampled (sampling
    may change on a resume, and costs time): the events of both."""
    root = tmp_path_factory.mktemp("two")
    train_dir, validation_dir = root / world.train_dir.name, root / "val" / world.validation_dir.name
    shutil.copytree(world.train_dir, train_dir)  # the latents' .npz files land beside the images: copies
    shutil.copytree(world.validation_dir, validation_dir)
    cfg = world.config(
        output_dir=root / "out",
        train_dir=train_dir,
        max_train_steps=4,
        save_state=True,
        validation_dir=validation_dir,
        max_validation_steps=1,  # one of the two held-out images per pass: rank 1 waits for rank 0's pass
        cache_latents=True,
        cache_latents_to_disk=True,
    )
    stopped, resumed = [], []

    def stop_at_the_first_file(event):  # early stopping as a user writes it: at a save-time event
        first = isinstance(event, CheckpointSaved) and not any(isinstance(e, CheckpointSaved) for e in stopped)
        stopped.append(event)
        return Stop("enough") if first else None

    first = train(cfg, stop_at_the_first_file, processes=2)
    stopped_final_steps = read_lora(first.final_path)[1]["ss_steps"]  # before the resumed run replaces that file
    planned = plan(cfg, resume="latest", processes=2)
    cfg = cfg.replace(sample_prompts=PROMPTS, sample_cfg_scales=(5,), sample_steps=1)
    second = train(cfg, resumed.append, resume="latest", processes=2)
    return cfg, (first, stopped, stopped_final_steps), (second, resumed), planned


def test_a_stop_at_the_first_saved_file_stops_both_ranks_at_its_step(runs):
    cfg, (result, events, final_steps), _, _ = runs
    assert (result.status, result.steps, result.stop_reason) == ("stopped", 2, "enough")  # as one process: not 3
    assert isinstance(events[0], TrainStarted) and (events[0].processes, events[0].total_steps) == (2, 4)
    assert [e.step for e in events if isinstance(e, StepEnded)] == [1, 2]
    saved = [(e.step, e.path.name, e.final) for e in events if isinstance(e, CheckpointSaved)]
    assert saved == [
        (2, f"{cfg.output_name}-step00000002.safetensors", False),
        (2, f"{cfg.output_name}.safetensors", True),
    ]
    assert final_steps == "2"  # the final LoRA is the step the callback saw
    # rank 0 validated the file with every held-out latent it needs, cached alone (not 1/2 of them)
    validations = [e for e in events if isinstance(e, ValidationEnded)]
    assert [v.step for v in validations] == [2] and math.isfinite(validations[0].loss)
    assert events[-1] == TrainEnded("stopped", 2, result.final_path)
    assert list(cfg.validation_dir.glob("*.npz"))  # the held-out latents were cached to disk
    # the state of step 2, saved once by rank 0; another number of processes may not resume it
    state = cfg.output_dir / f"{cfg.output_name}-step00000002-state"
    assert state.is_dir()
    with pytest.raises(ConfigError, match=r"saved by a run of 2 process\(es\), and this one has 1"):
        plan(cfg.replace(overwrite=True), resume=state)


def test_the_resumed_run_completes_sd_scripts_steps_for_2_processes_with_rank_0s_events_in_order(runs):
    cfg, _, (result, events), planned = runs
    assert planned.resume_step == 2 and planned.steps_per_epoch == math.ceil(planned.batches_per_epoch / 2)
    assert result.status == "completed" and result.steps == planned.total_steps == 4
    kinds = [type(e).__name__ for e in events]
    # step 4's file is validated and sampled; the final file (the same weights, step 4) is not again
    assert kinds == [
        "TrainStarted",
        "StepEnded",
        "StepEnded",
        "CheckpointSaved",
        "ValidationEnded",
        "SampleSaved",
        "SampleSaved",
        "CheckpointSaved",
        "TrainEnded",
    ]
    started = events[0]
    assert (started.processes, started.total_steps, started.resumed_from_step) == (2, 4, 2)
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert [s.step for s in steps] == [3, 4] and all(math.isfinite(s.loss) for s in steps)
    assert events[-1] == TrainEnded("completed", 4, result.final_path)
    assert result.peak_memory_bytes and result.peak_memory_bytes > 2**30  # rank 0's own, not the caller's


def test_rank_0_writes_one_file_per_checkpoint_samples_every_prompt_and_validates(runs):
    cfg, _, (result, events), _ = runs
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    names = [c.path.name for c in saved]
    assert names == [f"{cfg.output_name}-step00000004.safetensors", f"{cfg.output_name}.safetensors"]
    for checkpoint in saved:
        tensors, metadata = read_lora(checkpoint.path)
        assert metadata["ss_steps"] == "4" and all(t.isfinite().all() for t in tensors.values())
    first_file = f"{cfg.output_name}-step00000002.safetensors"  # the stopped run's, kept
    assert sorted(p.name for p in cfg.output_dir.glob("*.safetensors")) == sorted([first_file, *names])
    assert not list(cfg.output_dir.glob("*.partial*"))
    # sd-scripts would split the prompts between the 2 processes; rank 0 samples both, for every file
    samples = [e for e in events if isinstance(e, SampleSaved)]
    assert [(s.step, s.prompt, s.checkpoint) for s in samples] == [(4, p, saved[0].path) for p in PROMPTS]
    assert all(s.path.is_file() for s in samples)
    validations = [v for v in events if isinstance(v, ValidationEnded)]
    assert [v.step for v in validations] == [4] and math.isfinite(validations[0].loss)


def test_a_multi_process_run_keeps_its_records(runs):
    cfg, (_, stopped, _), (_, resumed), _ = runs
    command = (cfg.output_dir / f"{cfg.output_name}.command.sh").read_text()
    assert "accelerate.commands.launch" in command and "--num_processes 2" in command
    assert "train_network.py" in command
    recorded = (cfg.output_dir / f"{cfg.output_name}.events.jsonl").read_text().splitlines()
    assert len(recorded) == len(stopped) + len(resumed)
    for log in (f"{cfg.output_name}.engine.log", f"{cfg.output_name}.engine.rank1.log"):  # each rank's sd-scripts
        assert "preparing accelerator" in (cfg.output_dir / log).read_text(errors="replace")


def test_a_killed_worker_ends_the_run_with_an_error_naming_its_rank(world, tmp_path):
    cfg = world.config(output_dir=tmp_path / "out", max_train_steps=4)

    def kill_rank_1(event):
        if isinstance(event, StepEnded) and event.step == 1:
            for process in psutil.Process().children(recursive=True):
                if "spyke_lora._engine._worker" in " ".join(process.cmdline()):
                    if process.environ().get("RANK") == "1":
                        process.kill()

    with pytest.raises(WorkerFailed) as failed:
        train(cfg, kill_rank_1, processes=2)
    error = failed.value
    assert error.rank == 1, str(error)
    assert str(error).startswith("worker rank 1 (pid ") and "after step 1" in str(error)
    assert error.log.endswith(f"{cfg.output_name}.engine.rank1.log") and error.lines
    assert not [p for p in psutil.Process().children(recursive=True) if "_worker" in " ".join(p.cmdline())]
    assert not list(cfg.output_dir.glob("*.safetensors"))  # nothing was saved: the first checkpoint is step 2
    plan(cfg)  # the output's lock was let go
