"""The engine's run parts, each on its own, without sd-scripts: the probe's step, the guarded save, the epoch watch,
the work after each save, the loss window and the learning rates (the real engine drives them in tests/integration)."""

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spyke_lora import SpykeLoraWarning
from spyke_lora._engine._after_save import AfterSave
from spyke_lora._engine._hooks import EpochWatch, GuardedSave, install_hooks
from spyke_lora._engine._probe import LearningRates, LossWindow, NonFiniteStop, Probe, StopRun
from spyke_lora._errors import EngineError, TrainingError
from spyke_lora._user_warnings import caller_stacklevel, warn_caller
from spyke_lora.events import CheckpointSaved, StepEnded, ValidationEnded


def probe_with(events, stop=lambda: False, **kw):
    return Probe(events.append, stop, 0.0, lambda: None, **kw)


def one_step(probe, step, *losses):
    for loss in losses:
        probe.after_micro_batch(torch.tensor(loss))
    probe.step_ends(step)


def test_a_step_delivers_its_mean_loss_and_the_running_average():
    events = []
    probe = probe_with(events)
    probe.losses.size_to(2)  # two batches an epoch: the average is over the last two
    one_step(probe, 1, 1.0, 3.0)
    one_step(probe, 2, 5.0)
    one_step(probe, 3, 7.0)
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert [s.step for s in steps] == [1, 2, 3]
    assert [s.loss for s in steps] == [2.0, 5.0, 7.0]
    assert [s.avg_loss for s in steps] == [2.0, 4.0, 6.0]  # micro-batches count one by one: (1+3)/2, (3+5)/2, (5+7)/2
    assert probe.steps_done == 3


def test_a_nan_step_is_delivered_then_ends_the_run():
    events = []
    probe = probe_with(events, max_nonfinite_steps=2)
    one_step(probe, 1, float("nan"))  # one bad step is tolerated
    with pytest.raises(NonFiniteStop):
        one_step(probe, 2, float("inf"))
    assert [math.isfinite(e.loss) for e in events] == [False, False]  # both delivered, so a notebook shows them
    assert probe.losses.nonfinite_streak == 2


def test_the_step_is_a_stop_point_after_its_event_and_the_held_out_pass():
    events, order = [], []
    stop = [False]
    probe = probe_with(events, stop=lambda: stop[0])
    probe.held_out_every = order.append
    one_step(probe, 1, 1.0)
    stop[0] = True
    with pytest.raises(StopRun):
        one_step(probe, 2, 1.0)
    assert order == [1, 2] and [e.step for e in events] == [1, 2]


def test_a_first_ctrl_c_ends_the_run_at_the_next_stop_point():
    probe = probe_with([])
    probe.interrupt_requested = True
    with pytest.raises(KeyboardInterrupt):
        probe.before_micro_batch(SimpleNamespace())
    assert probe.interrupted_at_boundary


def test_a_callbacks_exception_is_remembered_and_passed_on():
    def bad(event):
        raise ValueError("the callback's own")

    probe = Probe(bad, lambda: False, 0.0, lambda: None)
    with pytest.raises(ValueError):
        one_step(probe, 1, 1.0)
    assert isinstance(probe.callback_error, ValueError)


def test_the_learning_rates_are_told_apart_by_the_unet_parameters():
    unet_param, text_param = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    rates = LearningRates()
    rates.know_network(SimpleNamespace(unet_loras=[SimpleNamespace(parameters=lambda: [unet_param])]))
    groups = [{"params": [text_param], "lr": 5e-5}, {"params": [unet_param], "lr": 1e-4}]
    rates.read(SimpleNamespace(_optimizers=[SimpleNamespace(param_groups=groups)]))
    assert rates.current == (1e-4, 5e-5)
    without = LearningRates()  # a network module without unet_loras: the last group, no text-encoder rate
    without.read(SimpleNamespace(_optimizers=[SimpleNamespace(param_groups=groups)]))
    assert without.current == (1e-4, None)


def test_the_loss_window_falls_back_to_the_last_loss():
    window = LossWindow()
    assert math.isnan(window.average())
    window.add_micro_batch(torch.tensor(4.0))
    assert window.end_step(mean=lambda loss: loss / 2) == 2.0  # averaged over the ranks
    assert window.average() == 2.0


def saving(tmp_path, events, after):
    probe = probe_with(events)
    probe.steps_done, probe.epoch = 4, 1

    def save_weights(file, dtype, metadata):
        Path(file).write_bytes(b"weights")

    return probe, GuardedSave(save_weights, probe, "spyke.safetensors", lambda path, final: after.append((path, final)))


def test_a_guarded_save_writes_whole_then_announces_then_hands_over(tmp_path):
    events, after = [], []
    probe, save = saving(tmp_path, events, after)
    save(str(tmp_path / "spyke-step00000004.safetensors"), None, {})
    save(str(tmp_path / "spyke.safetensors"), None, {})
    assert [(e.step, e.path.name, e.final) for e in events] == [
        (4, "spyke-step00000004.safetensors", False),
        (4, "spyke.safetensors", True),
    ]
    assert [(p.name, final) for p, final in after] == [
        ("spyke-step00000004.safetensors", False),
        ("spyke.safetensors", True),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spyke-step00000004.safetensors", "spyke.safetensors"]
    assert save.written(tmp_path / "spyke.safetensors") == tmp_path / "spyke.safetensors"
    assert save.written(tmp_path / "other.safetensors") is None


def test_no_file_is_saved_from_nan_weights(tmp_path):
    events, after = [], []
    probe, save = saving(tmp_path, events, after)
    probe.losses.nonfinite_streak = 1
    save(str(tmp_path / "spyke.safetensors"), None, {})
    assert events == [] and after == [] and list(tmp_path.iterdir()) == []


def test_a_full_disk_stops_the_run_naming_the_files_kept(tmp_path):
    events = []
    probe = probe_with(events)

    def full(file, dtype, metadata):
        raise OSError(28, "No space left on device")

    save = GuardedSave(full, probe, "spyke.safetensors", lambda path, final: None)
    save.saved.append(tmp_path / "spyke-step00000002.safetensors")
    with pytest.raises(TrainingError, match=r"could not write .*spyke\.safetensors.*intact: spyke-step00000002"):
        save(str(tmp_path / "spyke.safetensors"), None, {})
    assert events == [] and list(tmp_path.iterdir()) == []  # no partial file left


class Validator:
    def __init__(self, every=None):
        self.every_n_steps = every
        self.passes = []

    def validate(self, step, checkpoint=None):
        self.passes.append((step, checkpoint))


class Sampler:
    def __init__(self):
        self.done = []

    def sampled(self, step):
        return step in {s for s, _ in self.done}

    def sample(self, step, checkpoint):
        self.done.append((step, checkpoint))


def test_after_each_save_validation_comes_before_the_samples(tmp_path):
    probe = probe_with([])
    probe.steps_done = 2
    order = []
    validator, sampler = Validator(), Sampler()
    validator.validate = lambda step, checkpoint=None: order.append(("validate", step))
    sampler.sample = lambda step, checkpoint: order.append(("sample", step))
    AfterSave(probe, sampler, validator)(tmp_path / "a.safetensors", False)
    assert order == [("validate", 2), ("sample", 2)]


def test_with_its_own_rhythm_validation_runs_at_those_steps_and_at_the_final_file(tmp_path):
    probe = probe_with([])
    validator, sampler = Validator(every=3), Sampler()
    after = AfterSave(probe, sampler, validator)
    for step in range(1, 7):
        probe.steps_done = step
        after.at_step(step)
        if step in (2, 4):
            after(tmp_path / f"s{step}.safetensors", False)
    after(tmp_path / "final.safetensors", True)
    assert validator.passes == [(3, None), (6, None), (6, tmp_path / "final.safetensors")]
    assert [s for s, _ in sampler.done] == [2, 4, 6]


def test_no_samples_after_a_first_ctrl_c_and_none_twice_for_a_step(tmp_path):
    probe = probe_with([])
    probe.steps_done = 5
    sampler = Sampler()
    after = AfterSave(probe, sampler, None)
    after(tmp_path / "s5.safetensors", False)
    after(tmp_path / "final.safetensors", True)  # the final file of the same step: sampled once
    probe.steps_done = 6
    probe.interrupt_requested = True
    after(tmp_path / "final.safetensors", True)
    assert sampler.done == [(5, tmp_path / "s5.safetensors")]


def test_the_epoch_watch_refuses_a_call_from_outside_train(tmp_path):
    probe = probe_with([])
    watch = EpochWatch(lambda: None, probe, train_code=object(), resumed=False)
    with pytest.raises(EngineError, match="not called from NetworkTrainer.train"):
        watch()


def test_the_epoch_watch_reads_the_epoch_and_sizes_the_loss_window():
    probe = probe_with([])
    calls = []

    def train():  # stands in for NetworkTrainer.train's epoch loop
        train_dataloader = [0, 1, 2]  # noqa: F841 - read from this frame by the watch
        for epoch in range(2):  # noqa: B007 - read from this frame by the watch
            watch()

    watch = EpochWatch(lambda: calls.append(probe.epoch), probe, train.__code__, resumed=False)
    train()
    assert calls == [1, 2] and probe.epoch == 2
    assert probe.losses._recent.maxlen == 3


def test_install_hooks_wraps_only_the_given_objects(tmp_path):
    probe = probe_with([])
    network = SimpleNamespace(save_weights=lambda *a: None, on_epoch_start=lambda: None)
    accelerator = SimpleNamespace(save_state=lambda d: None, load_state=lambda d: None)
    save, state = install_hooks(
        network, accelerator, probe, final_name="x.safetensors", train_code=None, after_save=lambda p, f: None
    )
    assert network.save_weights is save and isinstance(network.on_epoch_start, EpochWatch)
    assert accelerator.save_state == state.save and accelerator.load_state == state.load


def helper_that_warns():
    warn_caller("a warning for the caller")


def test_a_warning_names_the_callers_line_however_deep_it_is_raised():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        helper_that_warns()  # outside the package: the warning is the line in helper_that_warns that called it
    assert [w.category for w in caught] == [SpykeLoraWarning]
    assert caught[0].filename == __file__
    assert caught[0].lineno == helper_that_warns.__code__.co_firstlineno + 1
    assert caller_stacklevel() == 1  # called from outside the package: the calling function itself


def test_checkpoint_saved_and_validation_events_are_plain_data():
    assert CheckpointSaved(1, 1, Path("a"), True).final
    assert ValidationEnded(step=1, epoch=1, loss=0.5, divergence=0.1).loss == 0.5
