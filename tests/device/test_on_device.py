"""Runs on real accelerators only: `make test-mps` on an Apple Silicon Mac, `make test-gpu` on a CUDA machine.

Elsewhere these skip with a reason (tests/device/conftest.py); the logic they rely on is tested on every machine
with the device injected (tests/unit/test_device_policy.py, test_device_random.py, test_doctor.py). What each one
proves is listed in docs/devices.md.
"""

import math
import types
from types import SimpleNamespace

import pytest

from spyke_lora import StepEnded, Stop, TrainStarted, train
from spyke_lora.tiny_world import build_tiny_world

NAME = "spyke_plasma_v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


def same_lora(a, b):
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return all(bool((ta[k] == tb[k]).all()) for k in ta)


@pytest.mark.mps
def test_lora04_runs_on_mps_without_mixed_precision(world, tmp_path):
    """LORA-04: the run is on mps with mixed precision 'no', named by the Mac's chip, shown before the first step;
    every step reports the memory MPS holds (a model is loaded: over 1 GB); losses stay finite."""
    events = []
    result = train(
        world.config(output_dir=tmp_path, device="auto", mixed_precision="fp16", max_train_steps=2),
        callbacks=events.append,
    )
    assert (events[0].device, events[0].mixed_precision) == ("mps", "no")
    assert events[0].device_name.startswith("Apple M")
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert all(math.isfinite(e.loss) for e in steps)
    assert all(e.memory_bytes > 2**30 for e in steps)
    assert result.status == "completed" and result.final_path.is_file()


@pytest.mark.mps
def test_sampling_on_mps_does_not_change_the_lora(world, tmp_path):
    """sd-scripts' sampler seeds the MPS generator (torch.manual_seed) and does not put it back; training noise is
    drawn on MPS. With spyke-lora keeping the generator, a sampled run trains the LoRA an unsampled one does."""
    plain = train(world.config(output_dir=tmp_path / "plain", device="mps"))
    sampled = train(
        world.config(
            output_dir=tmp_path / "sampled",
            device="mps",
            sample_prompts=(f"{NAME}, x",),
            sample_cfg_scales=(7,),
            sample_steps=2,
        )
    )
    assert [c.path.name for c in plain.checkpoints] == [c.path.name for c in sampled.checkpoints]
    assert plain.losses == sampled.losses
    for a, b in zip(plain.checkpoints, sampled.checkpoints):
        assert same_lora(a.path, b.path), a.path.name


@pytest.mark.mps
def test_a_resumed_mps_run_starts_from_the_saved_mps_generator(world, tmp_path):
    """accelerate's saved state has no MPS generator; spyke-lora writes it into every state and reads it back, so the
    resumed run starts training from the generator the stopped run had (not from the seed again). Its schedule is
    the uninterrupted run's, as on the CPU (weights may differ slightly there too: sd-scripts draws the resumed
    epoch's image order again, docs/reliability.md)."""
    import torch

    short = dict(device="mps", num_repeats=1, reg_dir=None, max_train_steps=6, save_every_n_steps=2)
    whole = train(world.config(output_dir=tmp_path / "whole", **short))
    cfg = world.config(output_dir=tmp_path / "parts", save_state=True, **short)
    first = train(cfg, callbacks=lambda e: Stop() if isinstance(e, StepEnded) and e.step == 3 else None)
    saved = torch.load(cfg.output_dir / f"{NAME}-step00000003-state" / "spyke-lora-mps-rng.pt", weights_only=True)
    at_start = []
    rest = train(
        cfg,
        resume="latest",
        callbacks=lambda e: at_start.append(torch.mps.get_rng_state()) if isinstance(e, TrainStarted) else None,
    )
    assert torch.equal(at_start[0], saved)
    assert [(s.step, s.epoch, s.lr) for s in first.history + rest.history] == [
        (s.step, s.epoch, s.lr) for s in whole.history
    ]


@pytest.mark.mps
def test_sd_scripts_validation_random_state_switch_runs_on_mps():
    """sd-scripts' own switch_rng_state / restore_rng_state (train_network.py l.1372-1399) on a real MPS generator:
    they call torch.cuda's functions on mps, which spyke-lora routes to the MPS generator for a run."""
    import torch

    from spyke_lora._engine._host import host_for
    from spyke_lora._engine._process import cuda_rng_calls_reach, device_generator

    host = host_for(None)
    with host.active():
        train_network = host.train_network()
        codes = {
            c.co_name: c for c in train_network.NetworkTrainer.train.__code__.co_consts if isinstance(c, types.CodeType)
        }
        cell = types.CellType(SimpleNamespace(device=torch.device("mps")))
        switch, restore = (
            types.FunctionType(codes[n], vars(train_network), n, None, (cell,))
            for n in ("switch_rng_state", "restore_rng_state")
        )
        generator = device_generator("mps")
        before = torch.mps.get_rng_state()
        with cuda_rng_calls_reach(generator):
            states = switch(42)
            torch.randn(8, device="mps")  # validation draws on the device
            restore(states)
        assert torch.equal(torch.mps.get_rng_state(), before)


@pytest.mark.mps
def test_validation_on_mps_is_deterministic_and_leaves_the_lora_unchanged(world, tmp_path):
    """Held-out validation on MPS: each pass's noise is drawn on MPS after torch.manual_seed, and the MPS generator
    is put back afterwards. So a run with held-out images trains the LoRA a run without them does, two runs give the
    same figures, and validation_loss() of the files gives the run's figures (MPS kernels are deterministic for one
    machine and one build; a tolerance of 1e-4 allows for reductions that are not)."""
    from spyke_lora import validation_loss

    plain = train(world.config(output_dir=tmp_path / "plain", device="mps"))
    runs = [
        train(world.config(output_dir=tmp_path / f"held-out-{i}", device="mps", validation_dir=world.validation_dir))
        for i in range(2)
    ]
    assert [v.step for v in runs[0].validations] == [2, 4, 5]
    assert all(math.isfinite(v.loss) for v in runs[0].validations)
    assert [v.loss for v in runs[0].validations] == pytest.approx([v.loss for v in runs[1].validations], abs=1e-4)
    assert plain.losses == runs[0].losses
    for a, b in zip(plain.checkpoints, runs[0].checkpoints):
        assert same_lora(a.path, b.path), a.path.name
    cfg = world.config(output_dir=tmp_path / "held-out-0", device="mps", validation_dir=world.validation_dir)
    again = validation_loss([c.path for c in runs[0].checkpoints], cfg)
    assert [f.loss for f in again] == pytest.approx([v.loss for v in runs[0].validations], abs=1e-4)


@pytest.mark.gpu
def test_cuda_honours_fp16(world, tmp_path):
    events = []
    result = train(world.config(output_dir=tmp_path, device="cuda", max_train_steps=2), callbacks=events.append)
    assert (events[0].device, events[0].mixed_precision) == ("cuda", "fp16")
    assert events[0].device_name.startswith("NVIDIA")
    assert all(math.isfinite(e.loss) and e.memory_bytes > 2**30 for e in events if isinstance(e, StepEnded))
    assert result.final_path.is_file()


@pytest.mark.gpu
def test_two_cuda_processes_train_with_nccl_and_stop_together(world, tmp_path):
    """Proves, on a machine with 2 CUDA GPUs: `train(cfg, processes=2)` starts 2 ranks through accelerate launch
    (MULTI_GPU, NCCL; the frozen models go through sd-scripts' own prepare, untouched), with the device policy's
    fp16; rank 0's events arrive in order; a Stop at step 2 stops both ranks with step 2's LoRA saved once."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, this machine has {torch.cuda.device_count()}")
    events = []

    def stop_at_2(event):
        events.append(event)
        return Stop("enough") if isinstance(event, StepEnded) and event.step == 2 else None

    cfg = world.config(output_dir=tmp_path, device="cuda", max_train_steps=6)
    result = train(cfg, stop_at_2, processes=2)
    started = events[0]
    assert (started.device, started.mixed_precision, started.processes) == ("cuda", "fp16", 2)
    assert [e.step for e in events if isinstance(e, StepEnded)] == [1, 2]
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, StepEnded))
    assert (result.status, result.steps) == ("stopped", 2)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == [result.final_path.name]


@pytest.mark.mps
def test_the_memory_model_calibrated_on_this_mac_predicts_a_point_it_was_not_fitted_to(tmp_path, monkeypatch):
    """Issue 14 on a Mac: `spyke-lora calibrate` measures MPS's allocator (not the CPU's resident memory) at 64 and
    512 px, checkpointing on and off, and the constants it fits predict a run at 256 px, which it never measured,
    within 15 %; plan() then uses them (no longer an estimate). Also proves the MPS peak poll and
    torch.mps.recommended_max_memory() work on this torch."""
    import json

    from spyke_lora import MemoryBudget, plan
    from spyke_lora._calibrate import calibrate
    from spyke_lora._memory import device_budget, point_shape, predict, read_model_size

    monkeypatch.setenv("SPYKE_LORA_CACHE", str(tmp_path / "cache"))
    constants, points = calibrate("mps", tmp_path / "work", resolutions=(64, 512), steps=3, report=print)
    assert all(p["device_peak_bytes"] > 2**30 for p in points)  # the U-Net alone is 3.4 GB in fp32
    assert constants.calibrated and not constants.resident
    assert device_budget("mps").bytes > 4 * 2**30
    out = tmp_path / "check.json"
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "spyke_lora._calibrate_point",
            str(tmp_path / "work"),
            "256",
            "off",
            "3",
            str(out),
            "--device",
            "mps",
        ],
        check=True,
    )
    point = json.loads(out.read_text())
    model = read_model_size(build_tiny_world(tmp_path / "work" / "world256", resolution=256).base_model)
    predicted = predict(point_shape(point, 5), model, constants)
    assert predicted.peak_bytes == pytest.approx(point["device_peak_bytes"], rel=0.15)
    world = build_tiny_world(tmp_path / "w", resolution=64)
    planned = plan(world.config(output_dir=tmp_path / "o", device="mps"), memory_budget=MemoryBudget(2**40, "test"))
    assert not planned.memory.estimate and "calibrated on this machine's MPS" in planned.memory.source
