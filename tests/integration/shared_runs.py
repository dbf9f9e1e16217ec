"""The runs several integration tests share (conftest.py makes each a session fixture): each is run once, through
the public API, and what the tests read of it is recorded here: its config, result and events, and what a test
must see of the process or the folder at a given moment.

| run | tests that read it |
|---|---|
| ``first_run``: 5 steps, a file every 2, a held-out pass at each | test_train.py (events, files, records, the command line, validation_loss, the process left as it was) |
| ``sampled_run``: the first run again, later, streamed, with samples and TensorBoard | test_train.py (samples, iter_events, TensorBoard, a second run), test_choose_and_deploy.py |
| ``uninterrupted``: ``SHORT``, 6 steps over 2 epochs | test_resume.py (the reference), test_train.py (epochs) |
| ``stopped_at_start``: stopped at ``TrainStarted`` | test_train.py (nothing written, nested run, leftovers, SIGKILL), test_letting_go.py (the engine log) |
"""

import logging
import os
import random
import shutil
from types import SimpleNamespace

import psutil
import torch
from rich.console import Console
from rich.logging import RichHandler

from spyke_lora import SpykeLoraError, Stop, TrainStarted, iter_events, train

from .helpers import NAME, PROMPTS, SHORT, kill_while_saving


def first_run(world, tmp_path_factory):
    """One 5-step run shared by the tests that only inspect it. The caller's logging is a rich handler at INFO,
    which draws from Python's `random` for every styled line: the LoRA must not depend on that. It validates on
    two held-out images at every saved file: its LoRA must not depend on that either (the command-line test reruns
    it with sd-scripts alone, which knows nothing of them)."""
    cfg = world.config(
        output_dir=tmp_path_factory.mktemp("first") / "out",
        validation_dir=world.validation_dir,
        max_validation_steps=1,  # one of the two held-out images per pass: half the time
    )
    events = []
    handler = RichHandler(console=Console(stderr=True))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    before = (list(root.handlers), root.level)
    random.seed(1234)
    process_before = (random.getstate(), torch.get_rng_state(), dict(os.environ))
    try:
        result = train(cfg, callbacks=[events.append])
        after = (list(root.handlers), root.level)
        process_after = (random.getstate(), torch.get_rng_state(), dict(os.environ))
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    # copies to compare against, whatever later tests do to the output folder
    reference = tmp_path_factory.mktemp("reference")
    for saved in result.checkpoints:
        shutil.copy(saved.path, reference / saved.path.name)
    return SimpleNamespace(
        cfg=cfg,
        result=result,
        events=events,
        logging_before=before,
        logging_after=after,
        process_before=process_before,
        process_after=process_after,
        reference=reference,
    )


def sampled_run(first, tmp_path_factory):
    """The first run's training again, later in the same process (with no logging configured), through
    iter_events(), with 2 prompts x 2 CFG scales sampled before training (step 0) and right after each of the 3
    files is saved, and a TensorBoard log; the environment and the resident memory are read before and after it."""
    cfg = first.cfg.replace(
        output_dir=tmp_path_factory.mktemp("sampled") / "out",
        sample_prompts=PROMPTS,
        sample_cfg_scales=(5, 9),
        sample_steps=1,  # one step per image: the sampler runs all the same, at half the cost of two
        sample_at_first=True,
        tensorboard=True,
    )
    env_before, resident_before = dict(os.environ), psutil.Process().memory_info().rss
    with iter_events(cfg) as stream:
        events = list(stream)
    env_after, resident_after = dict(os.environ), psutil.Process().memory_info().rss
    return SimpleNamespace(
        cfg=cfg,
        events=events,
        result=stream.result,
        env=(env_before, env_after),
        resident=(resident_before, resident_after),
    )


def uninterrupted(world, tmp_path_factory):
    """The short run (``SHORT``: 6 steps over 2 epochs, a file every 2 steps) uninterrupted."""
    cfg = world.config(output_dir=tmp_path_factory.mktemp("uninterrupted") / "out", **SHORT)
    return SimpleNamespace(cfg=cfg, result=train(cfg))


def stopped_at_start(world, tmp_path_factory):
    """One run stopped at its first event by ``Stop("changed my mind")``.

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
