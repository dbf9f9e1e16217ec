"""The public API: exactly ``spyke_lora.__all__``, sorted, a superset of what it was before issue 21's refactor, its
classes shown at their public path, its errors under one root."""

import pickle
import sys
import types

import spyke_lora

# spyke_lora.__all__ as it was before the refactor of issue 21 (commit e4dffe2): a name may be added, never removed
BEFORE_ISSUE_21 = [
    "Callback",
    "Cell",
    "CheckpointSaved",
    "ColourHistogramScorer",
    "ConfigError",
    "DeployError",
    "DeployResult",
    "DeviceError",
    "DeviceReport",
    "EngineError",
    "Event",
    "EventStream",
    "HeldOutLoss",
    "Launch",
    "MemoryBudget",
    "MemoryPlan",
    "NonFiniteLoss",
    "OutputInUse",
    "Plan",
    "Review",
    "RunRecord",
    "SampleSaved",
    "SampleWarning",
    "Scorer",
    "SpykeLoraError",
    "SpykeLoraWarning",
    "StepEnded",
    "StepLoss",
    "StepSummary",
    "Stop",
    "SubsetPlan",
    "TrainConfig",
    "TrainEnded",
    "TrainResult",
    "TrainStarted",
    "TrainingError",
    "ValidationEnded",
    "ValidationPlan",
    "WorkerFailed",
    "callbacks",
    "config_diff",
    "contact_sheet",
    "deploy",
    "diffusers_pipeline",
    "doctor",
    "events",
    "iter_events",
    "loss_chart",
    "plan",
    "rank_checkpoints",
    "review",
    "runs",
    "sample",
    "sd_scripts_argv",
    "train",
    "validation_loss",
]


def test_the_public_api_keeps_every_name_it_had():
    missing = sorted(set(BEFORE_ISSUE_21) - set(spyke_lora.__all__))
    assert not missing, f"public names removed: {missing}"
    for name in BEFORE_ISSUE_21:
        assert getattr(spyke_lora, name) is not None


def test_the_version_is_the_packages():
    from spyke_lora._version import __version__

    assert spyke_lora.__version__ == __version__


def test_public_names_are_exactly_all():
    # a submodule another import loaded (spyke_lora.tiny_world, imported by `spyke-lora calibrate`) is an attribute
    # of the package, not one of its names
    public = {
        n
        for n in dir(spyke_lora)
        if not n.startswith("_")
        and not (isinstance(getattr(spyke_lora, n), types.ModuleType) and n not in spyke_lora.__all__)
    }
    assert public == set(spyke_lora.__all__)
    # code-point order, as sorted() gives it: the classes (capitalised) first, then the functions and modules
    assert spyke_lora.__all__ == sorted(spyke_lora.__all__)


def test_public_classes_show_their_public_path_and_pickle():
    for name in spyke_lora.__all__:
        obj = getattr(spyke_lora, name)
        if isinstance(obj, type):
            assert "._" not in obj.__module__, f"{name} shows the private module {obj.__module__}"
            assert getattr(sys.modules[obj.__module__], name) is obj  # where the repr says it is
    assert repr(spyke_lora.Stop("x")).startswith("Stop(")
    assert spyke_lora.TrainConfig.__module__ == "spyke_lora"
    error = spyke_lora.ConfigError("`resolution` must be a multiple of 64, got 500; try 512.")
    assert type(pickle.loads(pickle.dumps(error))) is spyke_lora.ConfigError
    result = spyke_lora.TrainResult("completed", 1, None, (), (), "cpu", "no")
    assert pickle.loads(pickle.dumps(result)) == result


def test_every_error_derives_from_the_root():
    for name in ("ConfigError", "DeviceError", "EngineError", "TrainingError"):
        assert issubclass(getattr(spyke_lora, name), spyke_lora.SpykeLoraError)
