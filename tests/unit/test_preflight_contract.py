"""The preflight's contract: only a SpykeLoraError leaves plan() and train() before the model loads, and a check that
cannot run says which check and why, with the other checks' findings beside it."""

import pytest

from spyke_lora import ConfigError, DeviceError, _preflight, plan, train
from spyke_lora._cli import main


def _vanishing_folder(folder, found):
    """What a folder looks like on a network drive that went away."""
    raise PermissionError(13, "Permission denied", str(folder.folder.folder))


def _broken_input(ctx, found):
    """A check with a bug."""
    raise KeyError("image_dir")


@pytest.fixture
def extra_rules():
    added: list[tuple[list, object]] = []

    def add(rules: list, rule) -> None:
        rules.append(rule)
        added.append((rules, rule))

    yield add
    for rules, rule in added:
        rules.remove(rule)


def test_a_check_that_raises_becomes_a_problem_naming_the_check(good, extra_rules):
    """An OSError inside a folder's check and a bug in an input check are each a problem naming the check, what it
    raised and the file; the other checks still run and report theirs in the same ConfigError."""
    (good.train_dir / "img001.txt").unlink()
    extra_rules(_preflight.FOLDER_RULES, _vanishing_folder)
    extra_rules(_preflight.INPUT_RULES, _broken_input)
    with pytest.raises(ConfigError) as info:
        plan(good)
    problems = info.value.problems
    assert any("img001.txt" in p and "missing" in p for p in problems)  # the real checks still ran
    vanished = [p for p in problems if "'_vanishing_folder'" in p]
    assert len(vanished) == 2  # train_dir and reg_dir
    assert "PermissionError" in vanished[0] and str(good.train_dir) in vanished[0]
    assert "What a folder looks like on a network drive that went away" in vanished[0]
    assert problems[-1].startswith("the check '_broken_input' (A check with a bug) could not run: KeyError:")


def test_train_refuses_the_same_way_before_loading(good, extra_rules):
    """train() runs plan() first: the same ConfigError, nothing written (no output folder)."""
    extra_rules(_preflight.INPUT_RULES, _broken_input)
    with pytest.raises(ConfigError, match="_broken_input"):
        train(good)
    assert not good.output_dir.exists()


def test_a_rule_raising_a_config_error_adds_its_problems(good, extra_rules):
    def raises_config_error(ctx, found):
        raise ConfigError(["first", "second"])

    extra_rules(_preflight.INPUT_RULES, raises_config_error)
    with pytest.raises(ConfigError) as info:
        plan(good)
    assert info.value.problems[-2:] == ("first", "second")


def test_other_spyke_lora_errors_pass_through(good, extra_rules):
    def raises_device_error(ctx, found):
        raise DeviceError("no such device")

    extra_rules(_preflight.INPUT_RULES, raises_device_error)
    with pytest.raises(DeviceError, match="no such device"):
        plan(good)


def test_sd_scripts_dataset_code_failing_is_a_config_error(good, monkeypatch):
    """What the step count raises that is not a SpykeLoraError (sd-scripts' dataset code) is a ConfigError saying
    what plan() was doing, the original chained."""
    from spyke_lora import _engine

    def count_steps(*args, **kwargs):
        raise AssertionError("caption file is empty")

    monkeypatch.setattr(_engine, "count_steps", count_steps)
    with pytest.raises(ConfigError) as info:
        plan(good)
    (problem,) = info.value.problems
    assert problem.startswith("planning failed while counting the steps with sd-scripts' dataset code")
    assert "AssertionError: caption file is empty" in problem
    assert isinstance(info.value.__cause__, AssertionError)


def test_the_cli_prints_the_problem_not_a_traceback(good, extra_rules, tmp_path, capsys):
    config = tmp_path / "spyke.toml"
    good.to_toml(config)
    extra_rules(_preflight.INPUT_RULES, _broken_input)
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "_broken_input" in err and "Traceback" not in err
