"""Runs on real accelerators only: `make test-mps` on an Apple Silicon Mac, `make test-gpu` on a CUDA machine.

CI deselects these (`-m "not mps and not gpu"`); the device policy they exercise is a pure function that
tests/unit/test_device_policy.py covers on every machine.
"""

import math

import pytest

from spyke_lora import StepEnded, train
from spyke_lora.tiny_world import build_tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.mark.mps
def test_lora04_runs_on_mps_without_mixed_precision(world, tmp_path):
    """LORA-04: the run is on mps with mixed precision 'no', shown before the first step; losses stay finite."""
    import torch

    assert torch.backends.mps.is_available(), "needs an Apple Silicon Mac with an MPS build of torch"
    events = []
    result = train(world.config(output_dir=tmp_path, device="auto", mixed_precision="fp16", max_train_steps=2),
                   callbacks=events.append)  # fmt: skip
    assert (events[0].device, events[0].mixed_precision) == ("mps", "no")
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, StepEnded))
    assert result.status == "completed" and result.final_path.is_file()


@pytest.mark.gpu
def test_cuda_honours_fp16(world, tmp_path):
    import torch

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    events = []
    result = train(world.config(output_dir=tmp_path, device="cuda", max_train_steps=2), callbacks=events.append)
    assert (events[0].device, events[0].mixed_precision) == ("cuda", "fp16")
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, StepEnded))
    assert result.final_path.is_file()
