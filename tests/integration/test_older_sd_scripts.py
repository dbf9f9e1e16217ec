"""The sd-scripts a kohya_ss user already has (issue 23, item 4): commit 3e6935a (2025-06-15), what kohya_ss's
``git submodule update --init --recursive`` checks out, 268 commits before the vendored v0.10.1.

Every feature works with it: a run validating and sampling each saved file, stopped and resumed from its state;
``validation_loss()`` of its file gives the run's own figure (it failed: "'NetworkTrainer' object has no attribute
'cast_vae'"); a plain run gives the LoRA of that commit's own command line, bit for bit. The checkout is made once from the
submodule's own git history into the cache folder (``$SPYKE_LORA_CACHE/sd-scripts-3e6935a``, outside the
repository), or taken from ``$SPYKE_LORA_OLDER_SD_SCRIPTS``; without either, the tests are skipped with the reason.
"""

import os
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest

from spyke_lora import (
    CheckpointSaved,
    SampleSaved,
    SpykeLoraWarning,
    StepEnded,
    Stop,
    ValidationEnded,
    sd_scripts_argv,
    train,
    validation_loss,
)
from spyke_lora._engine._compat import OLDEST_COMMIT
from spyke_lora._engine._host import VENDORED, engine_commit
from spyke_lora._files import cache_dir

from .helpers import NAME, assert_same_tensors, read_lora


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=600)


def older_checkout() -> tuple[Path | None, str]:
    """The 3e6935a checkout, made from the submodule's history when absent; (None, why) when it cannot be had."""
    given = os.environ.get("SPYKE_LORA_OLDER_SD_SCRIPTS")
    if given:
        root = Path(given).expanduser()
        ok = engine_commit(root) == OLDEST_COMMIT
        return (root, "") if ok else (None, f"$SPYKE_LORA_OLDER_SD_SCRIPTS ({root}) is not at {OLDEST_COMMIT[:7]}")
    root = cache_dir() / f"sd-scripts-{OLDEST_COMMIT[:7]}"
    if (root / "train_network.py").is_file() and engine_commit(root) == OLDEST_COMMIT:
        return root, ""
    if shutil.which("git") is None:
        return None, "git is not installed, so the 3e6935a checkout cannot be made"
    if _git("-C", str(VENDORED), "cat-file", "-e", f"{OLDEST_COMMIT}^{{commit}}").returncode != 0:
        return None, (
            f"the submodule's history lacks {OLDEST_COMMIT[:7]} (a shallow clone?): run "
            f"`git -C vendor/sd-scripts fetch origin {OLDEST_COMMIT}`, or set $SPYKE_LORA_OLDER_SD_SCRIPTS"
        )
    building = root.with_name(f".{root.name}.{uuid.uuid4().hex[:8]}")
    building.parent.mkdir(parents=True, exist_ok=True)
    try:
        # a clone sharing the submodule's objects: nothing is registered in the submodule, nothing in this repository
        steps = [
            ("clone", "--shared", "--no-checkout", "-q", str(VENDORED), str(building)),
            ("-C", str(building), "update-ref", "--no-deref", "HEAD", OLDEST_COMMIT),
            ("-C", str(building), "read-tree", "HEAD"),
        ]
        for step in steps:
            done = _git(*step)
            if done.returncode != 0:
                return None, f"could not make the {OLDEST_COMMIT[:7]} checkout: git {step[2]}: {done.stderr[-500:]}"
        # a few large binaries (Windows DLLs, a tokenizer) may be absent from the submodule's objects: never used
        done = _git("-C", str(building), "checkout-index", "-a", "-f")
        if not (building / "train_network.py").is_file() or not (building / "library" / "train_util.py").is_file():
            return None, f"could not make the {OLDEST_COMMIT[:7]} checkout: git checkout-index: {done.stderr[-500:]}"
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root, ""


@pytest.fixture(scope="module")
def older():
    root, why = older_checkout()
    if root is None:
        pytest.skip(why)
    return root


@pytest.fixture(scope="module")
def stopped_and_resumed(world, older, tmp_path_factory):
    """A 2-step run on 3e6935a, a file and a state at each step, one held-out image validated and one image sampled
    at each file: stopped at step 1, then resumed to its end."""
    cfg = world.config(
        output_dir=tmp_path_factory.mktemp("older") / "out",
        sd_scripts_dir=older,
        max_train_steps=2,
        save_every_n_steps=1,
        save_state=True,
        validation_dir=world.validation_dir,
        max_validation_steps=1,
        sample_prompts=("spyke_plasma_v1, standing in a forest",),
        sample_cfg_scales=(5,),
        sample_steps=1,
    )
    first, second = [], []

    def stop_at_1(event):
        first.append(event)
        return Stop("enough") if isinstance(event, StepEnded) and event.step == 1 else None

    with warnings.catch_warnings():
        warnings.simplefilter("error", SpykeLoraWarning)  # a tested commit: no "not tested" warning
        stopped = train(cfg, stop_at_1)
        resumed = train(cfg, second.append, resume="latest")
    return cfg, (stopped, first), (resumed, second)


def test_every_feature_of_a_run_works_on_the_older_commit(stopped_and_resumed):
    cfg, (stopped, first), (resumed, second) = stopped_and_resumed
    assert (stopped.status, stopped.steps, resumed.status, resumed.steps) == ("stopped", 1, "completed", 2)
    assert resumed.resumed_from_step == 1
    for events, step in ((first, 1), (second, 2)):
        assert [e.step for e in events if isinstance(e, ValidationEnded)] == [step]
        assert [e.step for e in events if isinstance(e, SampleSaved)] == [step]
        assert all(e.path.is_file() for e in events if isinstance(e, SampleSaved))
    assert [(e.step, e.final) for e in second if isinstance(e, CheckpointSaved)] == [(2, False), (2, True)]
    assert (cfg.output_dir / f"{NAME}-step00000001-state").is_dir()
    _, metadata = read_lora(resumed.final_path)
    assert metadata["ss_sd_scripts_commit_hash"] == OLDEST_COMMIT


def test_validation_loss_of_a_file_is_the_runs_own_figure_on_the_older_commit(stopped_and_resumed):
    """It failed with "AttributeError: 'NetworkTrainer' object has no attribute 'cast_vae'" (cast_vae came with
    209c02d, 2025-09-12)."""
    cfg, _, (resumed, second) = stopped_and_resumed
    (during,) = [e for e in second if isinstance(e, ValidationEnded)]
    (figure,) = validation_loss([resumed.final_path], cfg)
    assert (figure.step, figure.checkpoint) == (2, resumed.final_path)
    assert figure.loss == pytest.approx(during.loss, abs=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(stopped_and_resumed, tmp_path_factory):
    """The same run on 3e6935a, uninterrupted, without held-out images, samples or states."""
    cfg, _, _ = stopped_and_resumed
    plain = cfg.replace(
        output_dir=tmp_path_factory.mktemp("older-plain") / "out",
        save_state=False,
        validation_dir=None,
        max_validation_steps=None,
        sample_prompts=(),
    )
    return plain, train(plain)


def test_the_older_commits_own_command_line_gives_the_runs_lora(uninterrupted, older, tmp_path):
    """sd-scripts 3e6935a's train_network.py with the run's arguments, in a process of its own: the same tensors."""
    cfg, result = uninterrupted
    reference = tmp_path / "library.safetensors"
    shutil.copy(result.final_path, reference)
    for path in cfg.output_dir.glob("*.safetensors"):
        path.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, str(older / "train_network.py"), *sd_scripts_argv(cfg)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(reference, cfg.output_dir / f"{NAME}.safetensors")


def test_the_resumed_run_keeps_the_uninterrupted_runs_schedule(stopped_and_resumed, uninterrupted):
    """What a resume promises on either commit (docs/training.md, "Resuming"): the step numbers, epochs and both
    learning rates of every step are the uninterrupted run's. The weights are not bit-identical on either: sd-scripts
    draws the resumed epoch's image order again (measured on v0.10.1 too, with and without held-out images, samples
    or a regularisation set, stopped in the first epoch)."""
    _, (stopped, _), (resumed, _) = stopped_and_resumed

    def schedule(history):
        return [(s.step, s.epoch, s.lr, s.lr_text_encoder) for s in history]

    assert (stopped.steps, resumed.steps, resumed.resumed_from_step) == (1, 2, 1)
    assert schedule(stopped.history + resumed.history) == schedule(uninterrupted[1].history)
