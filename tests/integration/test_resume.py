"""save_state + resume on the real engine: a stopped run continues exactly where an uninterrupted one would be."""

import json
from types import SimpleNamespace

import pytest

from spyke_lora import ConfigError, StepEnded, Stop, TrainStarted, plan, train
from spyke_lora._lock import lock_path, output_in_use
from spyke_lora._preflight import STATE_BYTES_PER_DIM

from .helpers import NAME, SHORT


def stop_at(step):
    return lambda e: Stop(f"test: step {step}") if isinstance(e, StepEnded) and e.step == step else None


def schedule(history):
    return [(s.step, s.epoch, s.lr, s.lr_text_encoder) for s in history]


def refusal(call):
    """The ConfigError ``call()`` raises, or None."""
    try:
        call()
    except ConfigError as e:
        return e
    return None


@pytest.fixture(scope="module")
def resumed(world, tmp_path_factory):
    """The short run (``SHORT``) stopped at step 3 (the end of epoch 1), resumed and stopped mid epoch 2 at step 5,
    and resumed to its end. While its latest state is step 3's, a resume with a changed training and one with an
    edited caption are tried (both refused before anything loads), and the resume is planned."""
    cfg = world.config(output_dir=tmp_path_factory.mktemp("resume") / "out", save_state=True, **SHORT)
    run = SimpleNamespace(cfg=cfg, events=[])
    run.first = train(cfg, callbacks=stop_at(3))
    changed = cfg.replace(learning_rate=1e-3, unet_lr=1e-3, network_dim=8, save_every_n_steps=3)
    run.changed_refusal = refusal(lambda: train(changed, resume="latest"))
    caption = sorted(world.train_dir.glob("*.txt"))[0]
    original = caption.read_text()
    caption.write_text(original + ", extra tag")  # an edited caption is a different dataset
    try:
        run.caption, run.caption_refusal = caption, refusal(lambda: plan(cfg, resume="latest"))
    finally:
        caption.write_text(original)
    run.resumed_plan = plan(cfg, resume="latest")  # unchanged again: resumable
    run.second = train(cfg, resume="latest", callbacks=[run.events.append, stop_at(5)])  # stops mid epoch 2
    run.third = train(cfg, resume="latest")  # from the step-5 state, saved at the stop
    return run


def test_stop_at_3_then_resume_twice_matches_an_uninterrupted_run(resumed, uninterrupted):
    cfg, first, second, third, events = resumed.cfg, resumed.first, resumed.second, resumed.third, resumed.events
    reference = uninterrupted.result
    out = cfg.output_dir
    assert (first.status, first.steps) == ("stopped", 3)
    state3 = out / f"{NAME}-step00000003-state"
    assert json.loads((state3 / "train_state.json").read_text()) == {"current_epoch": 1, "current_step": 3}
    assert (out / f"{NAME}-step00000002-state").is_dir()  # saved with the step-2 checkpoint
    # the plan's disk estimate for a state (fp32 weights + AdamW's two moments) is what sd-scripts writes
    size = sum(p.stat().st_size for p in state3.iterdir())
    assert STATE_BYTES_PER_DIM * cfg.network_dim == pytest.approx(size, rel=0.05)
    assert sorted(p.name for p in state3.iterdir()) == [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.bin",
        "spyke-lora.json",
        "train_state.json",
    ]

    resumed_plan = resumed.resumed_plan  # planned after the first run
    assert (resumed_plan.resume_from, resumed_plan.resume_step) == (state3, 3)
    assert [step for step, _ in resumed_plan.checkpoints] == [4, 6]
    assert "resume          after step 3" in str(resumed_plan) and "3 steps left" in str(resumed_plan)
    assert "--resume" in resumed_plan.argv and "--skip_until_initial_step" in resumed_plan.argv

    assert isinstance(events[0], TrainStarted) and events[0].resumed_from_step == 3
    assert (second.status, second.steps, second.resumed_from_step) == ("stopped", 5, 3)
    assert (third.status, third.steps, third.resumed_from_step) == ("completed", 6, 5)

    # step numbers, epochs and both learning rates of every step: those of the uninterrupted run, exactly
    assert schedule(first.history + second.history + third.history) == schedule(reference.history)
    # the checkpoint schedule too: step files 2, 4, 6 and the final file, written by the run that reached them
    names = lambda result: [(c.step, c.path.name) for c in result.checkpoints]  # noqa: E731
    assert names(first) + names(second) + names(third) == [
        (2, f"{NAME}-step00000002.safetensors"),
        (3, f"{NAME}.safetensors"),
        (4, f"{NAME}-step00000004.safetensors"),
        (5, f"{NAME}.safetensors"),
        (6, f"{NAME}-step00000006.safetensors"),
        (6, f"{NAME}.safetensors"),
    ]
    assert [c.step for c in reference.checkpoints] == [2, 4, 6, 6]
    states = sorted(p.name for p in out.iterdir() if p.name.endswith("-state"))
    assert states == [f"{NAME}-state"] + [f"{NAME}-step0000000{n}-state" for n in (2, 3, 4, 5, 6)]
    assert json.loads((out / f"{NAME}-state" / "train_state.json").read_text())["current_step"] == 6
    # no temporary file or folder left; the lock file stays, free (an OS lock: it means nothing unheld)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [lock_path(cfg).name]
    assert not output_in_use(cfg)

    # a finished run has nothing left to resume
    with pytest.raises(ConfigError, match="nothing left to train"):
        plan(cfg, resume="latest")


def test_resuming_with_a_changed_training_is_refused(resumed):
    """Tried on the shared run's step-3 state, before it was resumed."""
    assert resumed.changed_refusal is not None
    message = str(resumed.changed_refusal)
    assert "`learning_rate` was 0.0001, now 0.001" in message
    assert "`network_dim` was 32, now 8" in message
    assert "`unet_lr` was 0.0001, now 0.001" in message
    assert "save_every_n_steps" not in message  # how often to save does not change what is learned
    # an edited caption is a different dataset
    assert resumed.caption_refusal is not None
    assert f"1 file(s) changed ({resumed.caption.name})" in str(resumed.caption_refusal)
    assert resumed.resumed_plan.resume_step == 3  # unchanged again: resumable
