"""The notebook path on the real engine: streams let go of at any moment, a loop body that plans and prints while
the run goes on, a refused run that leaves the live run's log alone, a callback's own exit, and a run whose last
step was not finite."""

import gc
import math
import threading

import pytest

import spyke_lora.callbacks
from spyke_lora import (
    SpykeLoraError,
    SpykeLoraWarning,
    StepEnded,
    Stop,
    TrainEnded,
    TrainStarted,
    iter_events,
    plan,
    sd_scripts_argv,
    train,
)
from spyke_lora._engine._host import host_for
from spyke_lora._lock import output_in_use

NAME = "spyke_plasma_v1"


def at_most(seconds, call):
    """``call()`` in a helper thread; fails (instead of hanging the suite) when it does not return in time."""
    box = {}

    def body():
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            box["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s: a deadlock"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_letting_go_of_a_stream_before_its_first_event_ends_its_run(world, out):
    """close() before the first next(), a `with` block left at once, and a stream dropped unused: each ends the run
    before the model is loaded and frees its locks; then the next train() in the process works."""
    cfg = world.config(output_dir=out)
    stream = iter_events(cfg)
    stream.close()
    assert (stream.result.status, stream.result.steps, stream.result.final_path) == ("stopped", 0, None)
    assert not output_in_use(cfg)

    with iter_events(cfg) as again:
        pass
    assert again.result.status == "stopped" and not output_in_use(cfg)

    iter_events(cfg)  # dropped at once: its finalizer asks the run to stop and waits for it
    gc.collect()
    assert not output_in_use(cfg)
    assert not list(out.glob("*.safetensors"))  # nothing was trained, nothing written

    result = train(cfg, callbacks=lambda e: Stop() if isinstance(e, StepEnded) else None)
    assert (result.status, result.steps) == ("stopped", 1) and result.final_path.is_file()


def test_a_loop_body_plans_and_prints_while_the_run_waits_for_it(world, out, tmp_path, monkeypatch, capsys):
    """In a notebook (sd-scripts' output goes to NAME.engine.log), the loop body's print reaches the cell, plan()
    and sd_scripts_argv() return while the run's thread holds the engine, and a second run is refused at once."""
    monkeypatch.setattr(spyke_lora.callbacks, "in_notebook", lambda: True)
    cfg = world.config(output_dir=out)
    seen = []
    for event in iter_events(cfg):
        seen.append(type(event).__name__)
        if isinstance(event, TrainStarted):
            print("loop body: the run started")
            argv = at_most(120, lambda: sd_scripts_argv(cfg))
            other = at_most(120, lambda: plan(cfg.replace(output_dir=tmp_path / "other")))
            with pytest.raises(SpykeLoraError, match="another spyke-lora run is active in this process"):
                at_most(120, lambda: train(world.config(output_dir=tmp_path / "second")))
            break
    assert seen == ["TrainStarted"]
    assert "--output_name" in argv and other.total_steps == 5
    assert not (tmp_path / "second").exists()  # refused before anything was written
    log = (out / f"{NAME}.engine.log").read_text()
    assert "loop body" not in log and "running training" in log  # sd-scripts' output, and only that
    assert "loop body: the run started" in capsys.readouterr().out
    assert not output_in_use(cfg)


def test_a_refused_run_leaves_the_live_runs_log_alone(world, out):
    log = out.parent / "engine.log"
    refused, log_then = [], []

    def second_run_on_the_same_log(event):
        if isinstance(event, TrainStarted):
            log_then.append(log.read_text())
            try:  # another output, so only the one-run-per-process rule refuses it
                train(world.config(output_dir=out, output_name="other"), engine_log=log)
            except SpykeLoraError as e:
                refused.append(str(e))
            return Stop()

    train(world.config(output_dir=out), callbacks=second_run_on_the_same_log, engine_log=log)
    assert refused and "another spyke-lora run is active" in refused[0]
    assert "running training" in log_then[0]
    assert log.read_text().startswith(log_then[0])  # not emptied by the refused run


def test_a_callbacks_system_exit_propagates_as_itself(world, out):
    """And a run with --highvram (which sets library.train_util.HIGH_VRAM with `global`) leaves it as it was."""
    events = []

    def leave(event):
        events.append(event)
        if isinstance(event, TrainStarted):
            raise SystemExit(3)

    with pytest.raises(SystemExit) as info:
        train(world.config(output_dir=out, extra_args={"highvram": True}), callbacks=leave)
    assert info.value.code == 3
    assert events[-1] == TrainEnded("failed", 0, None)
    host = host_for(None)
    with host.active():
        assert host.train_network().train_util.HIGH_VRAM is False


def test_a_last_step_with_a_nonfinite_loss_names_no_final_file(world, out):
    """max_nonfinite_steps = 0 trains on through NaN; the final save, from NaN weights, is skipped, so neither the
    result nor the events name a final file, and an older final file of that name is not passed off as this run's."""
    out.mkdir(parents=True)
    older = out / f"{NAME}.safetensors"
    older.write_bytes(b"an older run's final LoRA")
    cfg = world.config(output_dir=out, learning_rate=1e30, unet_lr=1e30, text_encoder_lr=1e30, max_train_steps=2,
                       save_every_n_steps=1, max_nonfinite_steps=0, overwrite=True)  # fmt: skip
    events = []
    with pytest.warns(SpykeLoraWarning, match="no final LoRA was written at step 2: the loss was not finite"):
        result = train(cfg, callbacks=events.append)
    losses = [e.loss for e in events if isinstance(e, StepEnded)]
    assert math.isfinite(losses[0]) and not math.isfinite(losses[1])
    assert (result.status, result.steps, result.final_path) == ("completed", 2, None)
    assert events[-1] == TrainEnded("completed", 2, None)
    assert [c.step for c in result.checkpoints] == [1]
    assert older.read_bytes() == b"an older run's final LoRA"
