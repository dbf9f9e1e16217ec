"""Which sd-scripts spyke-lora drives (issue 23, item 4): its commit found quietly, the supported range, and what
each feature needs of sd-scripts, checked from the engine's code before any model is loaded."""

import os
import subprocess
import types
import warnings
from pathlib import Path

import pytest

from spyke_lora import ConfigError, SpykeLoraWarning, plan
from spyke_lora._engine import _compat, _host
from spyke_lora._engine._compat import (
    OLDEST_COMMIT,
    PINNED_COMMIT,
    commit_note,
    features_of,
    missing_needs,
    require,
    vae_is_cast,
)
from spyke_lora._errors import EngineError

from .conftest import write_images


def _git(folder: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True, text=True).stdout


def _repo(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    _git(folder, "init", "-q")
    (folder / "README.md").write_text("x")
    _git(folder, "add", "README.md")
    _git(folder, "commit", "-q", "-m", "x")
    return _git(folder, "rev-parse", "HEAD").strip()


def _checkout(folder: Path, train_network: str = "class NetworkTrainer:\n    pass\n") -> Path:
    """A folder that locate_engine takes for sd-scripts."""
    (folder / "library").mkdir(parents=True, exist_ok=True)
    (folder / "library" / "__init__.py").write_text("")
    (folder / "library" / "train_util.py").write_text("def get_last_ckpt_name(args, ext):\n    return 'x' + ext\n")
    (folder / "train_network.py").write_text("from library import train_util\n" + train_network)
    return folder


# -- the commit, found quietly ----------------------------------------------------------------------------------


def test_the_commit_of_a_git_work_tree(tmp_path):
    commit = _repo(tmp_path / "sd-scripts")
    assert _host.engine_commit(tmp_path / "sd-scripts") == commit


@pytest.mark.parametrize("where", ["outside any repository", "a folder inside another repository"])
def test_a_checkout_that_is_not_a_git_work_tree_has_an_unknown_commit_and_git_says_nothing(tmp_path, capfd, where):
    root = tmp_path / "kohya_ss"
    if where == "outside any repository":
        root.mkdir()
    else:
        _repo(root)  # kohya_ss's own repository: its commit is not sd-scripts'
    sd = _checkout(root / "sd-scripts")
    capfd.readouterr()
    assert _host.engine_commit(sd) is None
    seen = capfd.readouterr()
    assert "fatal" not in seen.err + seen.out


def test_git_variables_of_the_caller_do_not_point_the_commit_elsewhere(tmp_path, monkeypatch):
    commit = _repo(tmp_path / "sd-scripts")
    other = tmp_path / "other"
    _repo(other)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    assert _host.engine_commit(tmp_path / "sd-scripts") == commit


def test_git_head_without_git_installed_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert _host.git_head(tmp_path) is None


@pytest.mark.parametrize("in_git", [False, True])
def test_sd_scripts_git_revision_is_asked_quietly_and_gives_sd_scripts_own_answer(tmp_path, capfd, in_git):
    """sd-scripts' get_git_revision_hash (train_util.py l.3302) runs git with its error output inherited: on a
    checkout that is not a git work tree, "fatal: not a git repository" reached the console at every run."""
    sd = _checkout(tmp_path / "sd-scripts")
    commit = _repo(sd) if in_git else None
    train_util = types.ModuleType("library.train_util")
    train_util.__file__ = str(sd / "library" / "train_util.py")

    def loud():  # sd-scripts' own, as written at v0.10.1 and 3e6935a
        try:
            return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=sd / "library").decode().strip()
        except Exception:
            return "(unknown)"

    train_util.get_git_revision_hash = loud
    expected = loud()
    assert expected == (commit or "(unknown)")
    capfd.readouterr()
    with _host.quiet_git_revision(train_util):
        assert train_util.get_git_revision_hash() == expected  # the file's metadata as the command line writes it
    seen = capfd.readouterr()
    assert "fatal" not in seen.err + seen.out
    assert train_util.get_git_revision_hash is loud  # put back


def test_a_train_util_without_the_git_call_is_left_alone():
    train_util = types.ModuleType("library.train_util")
    with _host.quiet_git_revision(train_util):
        assert not hasattr(train_util, "get_git_revision_hash")


# -- the supported range -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("commit", [PINNED_COMMIT, OLDEST_COMMIT])
def test_the_tested_commits_need_no_warning(commit):
    assert commit_note(commit) is None


def test_an_unknown_commit_is_said_cleanly():
    note = commit_note(None)
    assert "commit is unknown" in note and "not a git work tree" in note
    assert "v0.10.1" in note and OLDEST_COMMIT[:10] in note


def test_another_commit_names_itself_and_the_tested_ones():
    note = commit_note("0123456789abcdef" * 2 + "01234567")
    assert "0123456789" in note and "not one spyke-lora is tested with" in note
    assert PINNED_COMMIT[:10] in note and OLDEST_COMMIT[:10] in note and "kohya_ss" in note


def test_hosting_a_checkout_that_is_not_a_git_work_tree_warns_once_that_its_commit_is_unknown(tmp_path, capfd):
    sd = _checkout(tmp_path / "sd-scripts")
    capfd.readouterr()
    with pytest.warns(SpykeLoraWarning, match="commit is unknown") as caught:
        host = _host.EngineHost(sd)
    assert host.commit is None and str(sd) in str(caught[0].message)
    seen = capfd.readouterr()
    assert "fatal" not in seen.err + seen.out


def test_hosting_a_tested_commit_does_not_warn(tmp_path, monkeypatch):
    sd = _checkout(tmp_path / "sd-scripts")
    monkeypatch.setattr(_host, "engine_commit", lambda root: OLDEST_COMMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpykeLoraWarning)
        assert _host.EngineHost(sd).commit == OLDEST_COMMIT


# -- what each feature needs --------------------------------------------------------------------------------------


def _engine(**trainer_changes):
    """A stand-in ``train_network`` module with what the newest sd-scripts has, less or more ``trainer_changes``."""

    def process_batch(self, batch, *models, is_train=True, train_text_encoder=True, train_unet=True):
        return 0.0

    methods = {
        name: (lambda self, *a, **k: None)
        for name in ("train", "get_tokenize_strategy", "post_process_network", "sample_images", "on_step_start")
    }
    methods["process_batch"] = process_batch
    for name, value in trainer_changes.items():
        if value is None:
            methods.pop(name)
        else:
            methods[name] = value
    module = types.ModuleType("train_network")
    module.__file__ = "/somewhere/sd-scripts/train_network.py"
    module.NetworkTrainer = type("NetworkTrainer", (), methods)
    module.train_util = types.SimpleNamespace(save_and_remove_state_stepwise=None, get_last_ckpt_name=None)
    return module


def test_an_engine_with_everything_can_do_every_feature():
    assert missing_needs(_engine(), _compat.FEATURES) == []
    require(_engine(), _compat.FEATURES)


def test_a_process_batch_without_is_train_refuses_validation_only():
    """Before bbf6bbd (2025-01-06) process_batch had no evaluation mode: a held-out pass would fail at the first
    saved file, after minutes of training."""
    old = _engine(process_batch=lambda self, batch, *models: 0.0)
    assert missing_needs(old, ["train", "sampling", "resume"]) == []
    with pytest.raises(EngineError) as caught:
        require(old, ["train", "validation"])
    message = str(caught.value)
    assert "has no NetworkTrainer.process_batch(is_train=...)" in message
    assert "bbf6bbd (2025-01-06)" in message and "/somewhere/sd-scripts/train_network.py" in message
    assert "from 3e6935a (2025-06-15) to v0.10.1 (ae72efb)" in message and "git checkout v0.10.1" in message


@pytest.mark.parametrize(
    "missing, features, named, since",
    [
        ("on_step_start", ["validation"], "NetworkTrainer.on_step_start", "db2b4d4 (2024-10-27)"),
        ("get_tokenize_strategy", ["sampling"], "NetworkTrainer.get_tokenize_strategy", "41dee60 (2024-07-27)"),
        ("post_process_network", ["train"], "NetworkTrainer.post_process_network", "b65ae9b (2024-09-04)"),
    ],
)
def test_a_missing_method_is_named_with_the_commit_that_brought_it(missing, features, named, since):
    with pytest.raises(EngineError) as caught:
        require(_engine(**{missing: None}), features)
    assert f"has no {named}" in str(caught.value) and since in str(caught.value)


def test_a_train_util_without_the_state_save_refuses_training_and_resume():
    old = _engine()
    old.train_util = types.SimpleNamespace(get_last_ckpt_name=None)
    assert [n.name for n in missing_needs(old, ["resume"])] == ["train_util.save_and_remove_state_stepwise"]
    with pytest.raises(EngineError, match=r"has no train_util.save_and_remove_state_stepwise.*74008ce"):
        require(old, ["train"])


def test_every_need_names_its_features_and_its_commit():
    for need in _compat.NEEDS:
        assert set(need.features) <= set(_compat.FEATURES) and need.features, need.name
        assert need.since, need.name


def test_the_features_a_config_uses(good):
    assert features_of(good) == ("train", "sampling")
    assert features_of(good.replace(sample_prompts=())) == ("train",)
    assert features_of(good.replace(validation_split=0.3, save_state=True)) == (
        "train",
        "validation",
        "sampling",
        "resume",
    )
    assert features_of(good.replace(sample_prompts=()), resumed=True) == ("train", "resume")
    assert "validation" in features_of(good.replace(validation_dir=good.train_dir.parent / "held_out"))


def test_the_vae_is_cast_as_the_engine_casts_it():
    """``cast_vae`` came with 209c02d (2025-09-12); before it, train() always cast the VAE (3e6935a l.586)."""
    args = types.SimpleNamespace()
    assert vae_is_cast(object(), args) is True  # 3e6935a: no cast_vae: "'NetworkTrainer' ... no attribute"
    assert vae_is_cast(types.SimpleNamespace(cast_vae=lambda a: False), args) is False
    assert vae_is_cast(types.SimpleNamespace(cast_vae=lambda a: True), args) is True


def test_the_vendored_engine_can_do_every_feature(good):
    assert _host.engine_problems(good.replace(validation_split=0.3, save_state=True), resumed=True) == []


def test_plan_time_problems_of_an_old_checkout_name_what_is_missing_without_loading_a_model(good, tmp_path):
    sd = _checkout(tmp_path / "old-sd-scripts", "class NetworkTrainer:\n    def train(self, args):\n        pass\n")
    with pytest.warns(SpykeLoraWarning, match="commit is unknown"):
        problems = _host.engine_problems(good.replace(sd_scripts_dir=sd, validation_split=0.3))
    (problem,) = problems
    assert f"this sd-scripts ({sd / 'train_network.py'}) has no NetworkTrainer.get_tokenize_strategy" in problem
    assert "which train and validation and sampling need:" in problem and "on_step_start" in problem


def test_plan_refuses_what_the_engine_cannot_do_before_loading(good, monkeypatch):
    """plan() says what train() would refuse: a feature the hosted sd-scripts lacks (here a need no sd-scripts
    meets, for held-out validation only), naming it and the commit that brought it."""
    absent = _compat.Need("NetworkTrainer.no_such_hook", "abc1234 (2099-01-01)", ("validation",), lambda tn: False)
    monkeypatch.setattr(_compat, "NEEDS", (*_compat.NEEDS, absent))
    assert plan(good).total_steps > 0  # no validation: the need does not apply
    val = good.train_dir.parent / "val" / "1_spyke_plasma_v1"
    write_images(val, 2, "spyke_plasma_v1, red disc", start=40)  # other pixels than the training images
    with pytest.raises(ConfigError) as e:
        plan(good.replace(validation_dir=val))
    (problem,) = [p for p in e.value.problems if "no_such_hook" in p]
    assert "which validation needs:" in problem and "came with abc1234 (2099-01-01)" in problem
