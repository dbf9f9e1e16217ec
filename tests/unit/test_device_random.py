"""The training device's random generator (MPS on a Mac) across sampling, saved states and sd-scripts' validation,
proved on any machine with a stand-in generator; tests/device proves the same on a real Mac."""

import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spyke_lora._engine._after_save import CheckpointSampler, SampleSpec
from spyke_lora._engine._hooks import AtomicState
from spyke_lora._engine._host import host_for
from spyke_lora._engine._probe import Probe
from spyke_lora._engine._process import (
    DeviceGenerator,
    cuda_rng_calls_reach,
    device_generator,
    generators_preserved,
    module_values_restored,
    preserved_random_state,
)
from spyke_lora._engine._state import DEVICE_RNG_NAME, partial_state_dir


class StandIn:
    """A device generator held in a tensor, like torch.mps's: get and set its state, and draw (which moves it)."""

    def __init__(self, device="mps", seed=7):
        self.state = torch.tensor([seed, 0], dtype=torch.uint8)
        self.generator = DeviceGenerator(device, self.get, self.set)

    def get(self):
        return self.state.clone()

    def set(self, state):
        self.state = state.clone()

    def draw(self):  # what torch.manual_seed + randn_like do to the real one: a new state
        self.state = self.state + torch.tensor([0, 1], dtype=torch.uint8)


def probe_for(tmp_path, generator, sampler_effect):
    folder = tmp_path / "sample"
    plan = SampleSpec(
        lines=(("spyke_plasma_v1", 7.0),),
        seed=1,
        output_name="spyke",
        folder=folder,
        manifest=tmp_path / "spyke.samples.jsonl",
    )
    events = []
    probe = CheckpointSampler(plan, events.append, generator)

    def sampler(step):  # sd-scripts' sampler: seeds (every generator), draws, writes NAME_STEP_LINE_..._SEED.png
        sampler_effect()
        folder.mkdir(exist_ok=True)
        (folder / f"spyke_{step:06d}_00_20261125_1.png").write_bytes(b"png")

    probe.sampler = sampler
    return probe, events


def test_sampling_leaves_the_training_devices_generator_as_it_was(tmp_path):
    """sd-scripts' sampler seeds with torch.manual_seed (MPS too) and puts back only the CPU and CUDA generators: the
    probe keeps the device's, so training after a sample draws the noise it would have drawn."""
    device = StandIn()
    before = device.get()
    probe, events = probe_for(tmp_path, device.generator, device.draw)
    probe.sample(2, tmp_path / "spyke-step00000002.safetensors")
    assert [type(e).__name__ for e in events] == ["SampleSaved"]  # the sampler did run, and moved the generator
    assert torch.equal(device.state, before)


def test_without_a_device_generator_sampling_changes_nothing_else(tmp_path):
    calls = []
    probe, events = probe_for(tmp_path, None, lambda: calls.append(1))
    probe.sample(2, None)
    assert calls == [1] and len(events) == 1


class FakeAccelerator:
    """accelerate's save_state/load_state as far as the probe sees them: a folder with a file in it."""

    def __init__(self):
        self.loaded = []

    def save_state(self, output_dir):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "random_states_0.pkl").write_bytes(b"cpu and cuda generators")

    def load_state(self, input_dir):
        self.loaded.append(input_dir)


def attached(generator):
    """accelerate's save_state/load_state wrapped as a run wraps them (_hooks.AtomicState)."""
    probe = Probe(lambda e: None, lambda: False, 0.0, lambda: None)
    accelerator = FakeAccelerator()
    state = AtomicState(accelerator.save_state, accelerator.load_state, probe, generator)
    accelerator.save_state, accelerator.load_state = state.save, state.load
    return probe, accelerator


def test_every_saved_state_holds_the_mps_generator_and_a_resume_reads_it_back(tmp_path):
    device = StandIn("mps", seed=3)
    probe, accelerator = attached(device.generator)
    state = tmp_path / "spyke-step00000002-state"
    accelerator.save_state(str(state))
    assert sorted(p.name for p in state.iterdir()) == sorted([DEVICE_RNG_NAME, "random_states_0.pkl"])
    assert not partial_state_dir(state).exists()
    saved = device.get()
    device.draw()  # a later run, or the same process going on: another state
    assert not torch.equal(device.state, saved)
    accelerator.load_state(str(state))
    assert accelerator.loaded == [str(state)]  # accelerate's own loading ran first
    assert torch.equal(device.state, saved)


def test_a_cuda_or_cpu_state_gets_no_extra_file(tmp_path):
    """accelerate stores the CUDA generator itself; a CPU run has no device generator."""
    for generator in (StandIn("cuda").generator, None):
        _, accelerator = attached(generator)
        state = tmp_path / f"{generator.device if generator else 'cpu'}-state"
        accelerator.save_state(str(state))
        assert [p.name for p in state.iterdir()] == ["random_states_0.pkl"]


def _sd_scripts_closure(train_network, name, accelerator):
    """sd-scripts' own nested function `name` of NetworkTrainer.train(), bound to `accelerator`."""
    code = next(
        c
        for c in train_network.NetworkTrainer.train.__code__.co_consts
        if isinstance(c, types.CodeType) and c.co_name == name
    )
    assert code.co_freevars == ("accelerator",)
    return types.FunctionType(code, vars(train_network), name, None, (types.CellType(accelerator),))


def test_sd_scripts_validation_random_state_switch_works_on_mps():
    """train_network.py l.1372-1399: on `mps`, switch_rng_state / restore_rng_state call torch.cuda's
    get_rng_state / set_rng_state, which raise without CUDA. The run routes them to the MPS generator. This runs
    sd-scripts' own two closures with an accelerator whose device is mps."""
    host = host_for(None)
    with host.active():
        train_network = host.train_network()
        mps = SimpleNamespace(device=SimpleNamespace(type="mps"))
        switch = _sd_scripts_closure(train_network, "switch_rng_state", mps)
        restore = _sd_scripts_closure(train_network, "restore_rng_state", mps)
        cpu_before = torch.get_rng_state()
        if not torch.cuda.is_available():
            with pytest.raises((RuntimeError, AssertionError)):  # what a Mac gets from sd-scripts alone
                switch(42)
            torch.set_rng_state(cpu_before)
        device = StandIn("mps", seed=9)
        original = torch.cuda.get_rng_state, torch.cuda.set_rng_state
        with cuda_rng_calls_reach(device.generator):
            states = switch(42)
            if torch.cuda.is_available():  # sd-scripts' calls work as written there: nothing to route
                restore(states)
            else:
                assert torch.equal(states[1], device.state)  # the MPS generator was saved...
                device.draw()  # ...validation draws...
                restore(states)
                assert torch.equal(device.state, states[1])  # ...and it is put back
        torch.set_rng_state(cpu_before)
        assert (torch.cuda.get_rng_state, torch.cuda.set_rng_state) == original  # left as it was


def test_the_routing_is_only_for_mps_without_cuda():
    original = torch.cuda.get_rng_state
    for generator in (None, StandIn("cuda").generator):
        with cuda_rng_calls_reach(generator):
            assert torch.cuda.get_rng_state is original


def test_preserved_random_state_covers_the_given_device_generators():
    device = StandIn()
    before, cpu_before = device.get(), torch.get_rng_state()
    with preserved_random_state([device.generator]):
        device.draw()
        torch.manual_seed(123)
    assert torch.equal(device.state, before) and torch.equal(torch.get_rng_state(), cpu_before)
    with generators_preserved([device.generator]):
        device.draw()
    assert torch.equal(device.state, before)


def test_device_generator_finds_what_this_machine_has():
    assert device_generator("cpu") is None
    mps = device_generator("mps")
    assert (mps is not None) == (torch.backends.mps.is_available())
    assert (device_generator("cuda") is not None) == torch.cuda.is_available()


def test_module_values_set_with_global_are_put_back():
    """sd-scripts' train() sets library.train_util.HIGH_VRAM = True for --highvram, for the rest of the process."""
    host = host_for(None)
    with host.active():
        train_util = host.train_network().train_util
        before = train_util.HIGH_VRAM
        with module_values_restored([train_util]):
            train_util.HIGH_VRAM = not before
        assert train_util.HIGH_VRAM is before
