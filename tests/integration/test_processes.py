"""Two CPU processes with gloo, started by accelerate's launcher: the real engine on the tiny world (docs/scaling.md).

Each run costs about a minute and a half on this 2-core machine (three processes start, two load the model)."""

import math

import psutil
import pytest

from spyke_lora import (
    CheckpointSaved,
    ConfigError,
    StepEnded,
    Stop,
    TrainEnded,
    TrainStarted,
    WorkerFailed,
    plan,
    train,
)

from .helpers import read_lora


@pytest.fixture(scope="module")
def two(world, tmp_path_factory):
    """A 2-process run of 4 steps, a checkpoint every 2, and its events."""
    cfg = world.config(output_dir=tmp_path_factory.mktemp("two") / "out", max_train_steps=4)
    events = []
    result = train(cfg, events.append, processes=2)
    return cfg, events, result


def test_two_processes_train_with_rank_0s_events_in_order(two):
    cfg, events, result = two
    planned = plan(cfg.replace(overwrite=True), processes=2)
    assert result.status == "completed" and result.steps == planned.total_steps == 4
    assert planned.steps_per_epoch == math.ceil(planned.batches_per_epoch / 2)  # sd-scripts' math for 2 processes
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TrainStarted", "StepEnded", "StepEnded", "CheckpointSaved", "StepEnded", "StepEnded",
                     "CheckpointSaved", "CheckpointSaved", "TrainEnded"]  # fmt: skip
    started = events[0]
    assert isinstance(started, TrainStarted) and (started.processes, started.total_steps) == (2, 4)
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert [s.step for s in steps] == [1, 2, 3, 4] and all(math.isfinite(s.loss) for s in steps)
    assert [s.elapsed_s for s in steps] == sorted(s.elapsed_s for s in steps)
    assert events[-1] == TrainEnded("completed", 4, result.final_path)
    assert result.peak_memory_bytes and result.peak_memory_bytes > 2**30  # rank 0's own, not the caller's


def test_two_processes_write_one_file_per_checkpoint_and_the_records(two):
    cfg, events, result = two
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    names = [c.path.name for c in saved]
    assert len(names) == len(set(names)) == 3  # step 2, step 4, the final file: each once, by rank 0
    for checkpoint in saved:
        tensors, metadata = read_lora(checkpoint.path)
        assert tensors and all(t.isfinite().all() for t in tensors.values())
    assert sorted(p.name for p in cfg.output_dir.glob("*.safetensors")) == sorted(names)
    assert not list(cfg.output_dir.glob("*.partial*"))
    command = (cfg.output_dir / f"{cfg.output_name}.command.sh").read_text()
    assert "accelerate.commands.launch" in command and "--num_processes 2" in command
    assert "train_network.py" in command
    recorded = (cfg.output_dir / f"{cfg.output_name}.events.jsonl").read_text().splitlines()
    assert len(recorded) == len(events)
    for log in (f"{cfg.output_name}.engine.log", f"{cfg.output_name}.engine.rank1.log"):  # each rank's sd-scripts
        assert "preparing accelerator" in (cfg.output_dir / log).read_text(errors="replace")


def test_a_stop_at_step_2_stops_both_ranks_with_the_step_2_lora_saved_once(world, tmp_path):
    cfg = world.config(output_dir=tmp_path / "out", max_train_steps=6, save_state=True)
    events = []

    def stop_at_2(event):
        events.append(event)
        return Stop("enough") if isinstance(event, StepEnded) and event.step == 2 else None

    result = train(cfg, stop_at_2, processes=2)
    assert (result.status, result.steps, result.stop_reason) == ("stopped", 2, "enough")
    assert [e.step for e in events if isinstance(e, StepEnded)] == [1, 2]
    # the stop comes before sd-scripts' own save of step 2: the final file holds step 2's weights, written once
    saved = [(e.step, e.path.name, e.final) for e in events if isinstance(e, CheckpointSaved)]
    assert saved == [(2, f"{cfg.output_name}.safetensors", True)]
    assert [p.name for p in cfg.output_dir.glob("*.safetensors")] == [result.final_path.name]
    tensors, metadata = read_lora(result.final_path)
    assert metadata["ss_steps"] == "2" and all(t.isfinite().all() for t in tensors.values())
    assert events[-1] == TrainEnded("stopped", 2, result.final_path)
    # the state of step 2, saved once; resuming it with another number of processes is refused
    assert [p.name for p in cfg.output_dir.glob("*-state")] == [f"{cfg.output_name}-step00000002-state"]
    with pytest.raises(ConfigError, match=r"saved by a run of 2 process\(es\), and this one has 1"):
        plan(cfg, resume="latest")
    assert plan(cfg, resume="latest", processes=2).resume_step == 2


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
