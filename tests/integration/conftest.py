"""Integration tests: the real sd-scripts engine on the tiny local model (CPU, 64 px).

A run costs seconds to load the 2 GB model and seconds per step on this 2-core machine, so tests that assert on the
same kind of run share it: the session fixtures below run it once (shared_runs.py says how, and which tests read
it), and each test reads what it needs from its events and files. A run shared within one file is that file's
module fixture.
"""

import gc

import pytest
import torch

from spyke_lora.tiny_world import build_tiny_world

from . import shared_runs

# The tiny model is random: once trained a few steps, sampling it computes on denormal floats, which this CPU handles
# in microcode (4 samples after training: 35 s, 12 s with denormals flushed to zero). Set before any thread of
# torch's pool starts, so that every one inherits it. It changes no LoRA: the tests that rerun a run with sd-scripts'
# command line, in a process of its own without it, compare the files bit for bit.
torch.set_flush_denormal(True)


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def collected():
    """After each test, what it left is collected. A run that ends in an exception leaves sd-scripts' frames, and
    with them the ~6 GB of models, in reference cycles through the exception's traceback: until a full collection,
    the next run loads beside them (measured: 19.8 s to its first event instead of 8.0 s)."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


@pytest.fixture(scope="session")
def first_run(world, tmp_path_factory):
    return shared_runs.first_run(world, tmp_path_factory)


@pytest.fixture(scope="session")
def sampled_run(first_run, tmp_path_factory):
    return shared_runs.sampled_run(first_run, tmp_path_factory)


@pytest.fixture(scope="session")
def uninterrupted(world, tmp_path_factory):
    return shared_runs.uninterrupted(world, tmp_path_factory)


@pytest.fixture(scope="session")
def stopped_at_start(world, tmp_path_factory):
    return shared_runs.stopped_at_start(world, tmp_path_factory)
