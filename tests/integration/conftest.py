"""Integration tests: the real sd-scripts engine on the tiny local model (CPU, 64 px).

A run costs seconds to load the 2 GB model and seconds per step on this 2-core machine, so tests that assert on the
same kind of run share it: a session fixture here runs it once, through the public API, and records its events and
files; each test reads what it needs. Runs shared within one file are that file's module fixtures.
"""

from types import SimpleNamespace

import pytest
import torch

from spyke_lora import SpykeLoraError, Stop, TrainStarted, train
from spyke_lora.tiny_world import build_tiny_world

from .helpers import NAME, SHORT, kill_while_saving

# The tiny model is random: once trained a few steps, sampling it computes on denormal floats, which this CPU handles
# in microcode (4 samples after training: 35 s, 12 s with denormals flushed to zero). Set before any thread of
# torch's pool starts, so that every one inherits it. It changes no LoRA: the tests that rerun a run with sd-scripts'
# command line, in a process of its own without it, compare the files bit for bit.
torch.set_flush_denormal(True)


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


@pytest.fixture(scope="session")
def uninterrupted(world, tmp_path_factory):
    """The short run (``SHORT``: 6 steps over 2 epochs, a file every 2 steps) uninterrupted: the reference of the
    resume test (test_resume.py) and the run of the epochs test (test_train.py)."""
    cfg = world.config(output_dir=tmp_path_factory.mktemp("uninterrupted") / "out", **SHORT)
    return SimpleNamespace(cfg=cfg, result=train(cfg))


@pytest.fixture(scope="session")
def stopped_at_start(world, tmp_path_factory):
    """One run stopped at its first event by ``Stop("changed my mind")``, shared by the tests of what such a run
    does and leaves (test_train.py, test_letting_go.py).

    Before it, its output folder holds what earlier runs leave behind: the half-written temporary file of a process
    SIGKILLed while saving step 2 (whose output lock died with it), a temporary file of ours left by a run killed
    while saving, and one of another output. At ``TrainStarted`` its callback reads the run's engine log and starts
    two more runs: one into the same folder under another name, on the same engine log, and one into a folder of its
    own; both must be refused."""
    root = tmp_path_factory.mktemp("stopped-at-start")
    out = root / "out"
    killed = kill_while_saving(world, out, root)
    leftover = out / f".{NAME}-step00000002.4242.partial.safetensors"  # a run killed while saving
    leftover.write_bytes(b"half a LoRA")
    other = out / ".other_name.4242.partial.safetensors"  # another output's: not ours to delete
    other.write_bytes(b"x")
    log = root / "engine.log"
    events, refused_on_the_log, refused_nested, log_then = [], [], [], []

    def at_start(event):
        events.append(event)
        if isinstance(event, TrainStarted):
            log_then.append(log.read_text())
            try:  # another output, so only the one-run-per-process rule refuses it
                train(world.config(output_dir=out, output_name="other"), engine_log=log)
            except SpykeLoraError as e:
                refused_on_the_log.append(str(e))
            try:
                train(world.config(output_dir=root / "nested"))
            except SpykeLoraError as e:
                refused_nested.append(str(e))
        return Stop("changed my mind")

    result = train(world.config(output_dir=out), callbacks=at_start, engine_log=log)
    return SimpleNamespace(
        root=root,
        out=out,
        killed=killed,
        leftover=leftover,
        other=other,
        log=log,
        log_then=log_then,
        events=events,
        result=result,
        refused_on_the_log=refused_on_the_log,
        refused_nested=refused_nested,
    )
