"""The notebook path on the real engine: streams let go of at any moment, a loop body that plans and prints while
the run goes on, a refused run that leaves the live run's log alone, a callback's own exit, and a run whose last
step was not finite."""

import contextlib
import gc
import io
import json
import math
import threading
from types import SimpleNamespace

import pytest

import spyke_lora.callbacks
from spyke_lora import (
    SpykeLoraError,
    SpykeLoraWarning,
    StepEnded,
    TrainEnded,
    TrainStarted,
    iter_events,
    plan,
    sd_scripts_argv,
    train,
)
from spyke_lora._engine._host import host_for
from spyke_lora._lock import output_in_use

from .helpers import NAME, read_lora


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


@pytest.fixture(scope="module")
def stream_run(world, tmp_path_factory):
    """Streams let go of before their first event, then the next run into the same output, in a notebook (so
    sd-scripts' output goes to NAME.engine.log): at ``TrainStarted`` the loop body prints, plans, asks for the
    command line and tries a second run while the run's thread holds the engine; after step 3 it breaks out."""
    root = tmp_path_factory.mktemp("stream")
    cfg = world.config(output_dir=root / "out")
    let_go = SimpleNamespace()
    stream = iter_events(cfg)
    stream.close()
    let_go.closed = (stream.result.status, stream.result.steps, stream.result.final_path), output_in_use(cfg)
    with iter_events(cfg) as again:
        pass
    let_go.left = again.result.status, output_in_use(cfg)
    iter_events(cfg)  # dropped at once: its finalizer asks the run to stop and waits for it
    gc.collect()
    let_go.dropped = output_in_use(cfg)
    let_go.written = list(cfg.output_dir.glob("*.safetensors"))

    seen, body = [], SimpleNamespace(refused=None)
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr(spyke_lora.callbacks, "in_notebook", lambda: True)
        for event in iter_events(cfg):  # no other reference to the stream: leaving the loop lets go of it
            seen.append(event)
            if isinstance(event, TrainStarted):
                print("loop body: the run started")
                body.argv = at_most(120, lambda: sd_scripts_argv(cfg))
                body.other = at_most(120, lambda: plan(cfg.replace(output_dir=root / "other")))
                try:
                    at_most(120, lambda: train(world.config(output_dir=root / "second")))
                except SpykeLoraError as e:
                    body.refused = str(e)
            if isinstance(event, StepEnded) and event.step == 3:
                break
    body.printed = printed.getvalue()
    return SimpleNamespace(cfg=cfg, root=root, let_go=let_go, seen=seen, body=body)


def test_letting_go_of_a_stream_before_its_first_event_ends_its_run(stream_run):
    """close() before the first next(), a `with` block left at once, and a stream dropped unused: each ends the run
    before the model is loaded and frees its locks; then the next run in the process works."""
    let_go = stream_run.let_go
    assert let_go.closed == (("stopped", 0, None), False)
    assert let_go.left == ("stopped", False)
    assert let_go.dropped is False
    assert let_go.written == []  # nothing was trained, nothing written
    final = stream_run.cfg.output_dir / f"{NAME}.safetensors"
    assert [e.step for e in stream_run.seen if isinstance(e, StepEnded)] == [1, 2, 3] and final.is_file()


def test_a_loop_body_plans_and_prints_while_the_run_waits_for_it(stream_run):
    """In a notebook (sd-scripts' output goes to NAME.engine.log), the loop body's print reaches the cell, plan()
    and sd_scripts_argv() return while the run's thread holds the engine, and a second run is refused at once."""
    body, cfg = stream_run.body, stream_run.cfg
    assert isinstance(stream_run.seen[0], TrainStarted)
    assert body.refused and "another spyke-lora run is active in this process" in body.refused
    assert "--output_name" in body.argv and body.other.total_steps == 5
    assert not (stream_run.root / "second").exists()  # refused before anything was written
    log = (cfg.output_dir / f"{NAME}.engine.log").read_text()
    assert "loop body" not in log and "running training" in log  # sd-scripts' output, and only that
    assert "loop body: the run started" in body.printed
    assert not output_in_use(cfg)


def test_breaking_out_of_iter_events_stops_after_that_step(stream_run):
    out = stream_run.cfg.output_dir
    assert [e.step for e in stream_run.seen if isinstance(e, StepEnded)] == [1, 2, 3]
    _, metadata = read_lora(out / f"{NAME}.safetensors")
    assert metadata["ss_steps"] == "3"  # the run ended after step 3, its LoRA saved, like Stop at step 3
    recorded = [json.loads(line) for line in (out / f"{NAME}.events.jsonl").read_text().splitlines()]
    assert recorded[-1]["event"] == "TrainEnded" and recorded[-1]["status"] == "stopped"
    assert not output_in_use(out, NAME)  # the run is over: the next one may start
    with pytest.raises(SpykeLoraError, match="already exist"):
        next(iter(iter_events(stream_run.cfg)))  # a refusal comes out of the loop


def test_a_refused_run_leaves_the_live_runs_log_alone(stopped_at_start):
    """The shared run stopped at its start (conftest.py) tried another run on its own engine log."""
    run = stopped_at_start
    assert run.refused_on_the_log and "another spyke-lora run is active" in run.refused_on_the_log[0]
    assert "running training" in run.log_then[0]
    assert run.log.read_text().startswith(run.log_then[0])  # not emptied by the refused run


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
    cfg = world.config(
        output_dir=out,
        learning_rate=1e30,
        unet_lr=1e30,
        text_encoder_lr=1e30,
        max_train_steps=2,
        save_every_n_steps=1,
        max_nonfinite_steps=0,
        overwrite=True,
    )
    events = []
    with pytest.warns(SpykeLoraWarning, match="no final LoRA was written at step 2: the loss was not finite"):
        result = train(cfg, callbacks=events.append)
    losses = [e.loss for e in events if isinstance(e, StepEnded)]
    assert math.isfinite(losses[0]) and not math.isfinite(losses[1])
    assert (result.status, result.steps, result.final_path) == ("completed", 2, None)
    assert events[-1] == TrainEnded("completed", 2, None)
    assert [c.step for c in result.checkpoints] == [1]
    assert older.read_bytes() == b"an older run's final LoRA"
