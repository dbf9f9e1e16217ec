"""Finding sd-scripts, and keeping its generic module names out of the caller's way."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import spyke_lora
from spyke_lora import EngineError, TrainConfig, sd_scripts_argv
from spyke_lora._engine import _host
from spyke_lora._engine._host import ENV_VAR, SUBMODULE_FIX, VENDORED, host_for, locate_engine


def test_vendored_engine_is_found_at_the_pinned_commit():
    assert locate_engine(None) == VENDORED
    assert _host.engine_commit(VENDORED) == _host.PINNED_COMMIT


def test_missing_vendored_engine_names_the_exact_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(_host, "VENDORED", tmp_path / "vendor" / "sd-scripts")
    with pytest.raises(EngineError) as info:
        locate_engine(None)
    assert "git submodule update --init vendor/sd-scripts" in str(info.value)
    assert "is missing" in str(info.value)
    (tmp_path / "vendor" / "sd-scripts").mkdir(parents=True)  # an uninitialised submodule: an empty folder
    with pytest.raises(EngineError, match="is empty") as info:
        locate_engine(None)
    assert SUBMODULE_FIX in str(info.value)


def test_configured_engine_wins_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(EngineError, match=r"\$SPYKE_LORA_SD_SCRIPTS is .*nowhere.*not an sd-scripts checkout"):
        locate_engine(None)
    assert locate_engine(VENDORED) == VENDORED  # sd_scripts_dir beats the environment variable
    with pytest.raises(EngineError, match=r"`sd_scripts_dir` is .*empty"):
        (tmp_path / "empty").mkdir()
        locate_engine(tmp_path / "empty")
    monkeypatch.setenv(ENV_VAR, str(VENDORED))
    assert locate_engine(None) == VENDORED


def test_engine_error_is_raised_by_the_public_api(tmp_path):
    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors",
        train_dir=tmp_path / "1_x",
        output_dir=tmp_path / "o",
        output_name="x",
        sd_scripts_dir=tmp_path,
    )
    with pytest.raises(EngineError, match="not an sd-scripts checkout"):
        sd_scripts_argv(cfg, device="cpu")


def test_engine_modules_never_shadow_the_callers(tmp_path):
    """A caller's own `library` and `tools` modules survive engine use; sd-scripts' names vanish afterwards."""
    mine = types.ModuleType("library")
    mine.__file__ = str(tmp_path / "library.py")
    saved = sys.modules.get("library")
    sys.modules["library"] = mine
    try:
        host = host_for(None)
        with host.active():
            host.train_network()
            import library  # noqa: F401  (sd-scripts' own, while the engine is active)

            assert sys.modules["library"] is not mine
            assert sys.modules["library"].__file__.startswith(str(VENDORED))
        assert sys.modules["library"] is mine
        for name in ("networks", "tools", "pytorch_lightning", "train_network", "library.train_util"):
            assert name not in sys.modules, name
        assert str(VENDORED) not in sys.path
        with host.active():  # and back again, without re-importing
            assert sys.modules["library.train_util"] is host.train_network().train_util
    finally:
        if saved is None:
            sys.modules.pop("library", None)
        else:
            sys.modules["library"] = saved


def test_importing_the_package_sets_the_mps_fallback_before_torch():
    code = (
        "import os, sys; assert 'PYTORCH_ENABLE_MPS_FALLBACK' not in os.environ; import spyke_lora; "
        "print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]  # set, and torch not yet imported by the package


def test_only_the_engine_package_imports_sd_scripts():
    package = Path(spyke_lora.__file__).parent
    for path in package.rglob("*.py"):
        if "_engine" in path.parts:
            continue
        text = path.read_text()
        for name in ("import library", "from library", "import train_network", "from networks", "import networks"):
            assert name not in text, f"{path.name} imports sd-scripts ({name})"


def test_engine_log_records_leave_python_random_untouched():
    """rich draws from `random` for styled links; sd-scripts shuffles captions with the same generator."""
    import logging
    import random

    from rich.console import Console
    from rich.logging import RichHandler
    from rich.style import Style

    from spyke_lora._engine._host import random_untouched_by_logging

    def draw_after_logging(guarded: bool) -> float:
        Style.parse.cache_clear()  # as in a fresh process: rich has not seen this link yet
        random.seed(7)
        with random_untouched_by_logging(["library.some_module"] if guarded else []):
            logging.getLogger("library.some_module").info("a line rich renders with a file link")
        return random.random()

    random.seed(7)
    expected = random.random()
    with open(os.devnull, "w") as devnull:
        handler = RichHandler(console=Console(file=devnull))
        root = logging.getLogger()
        saved = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            assert draw_after_logging(guarded=False) != expected  # the hazard is real
            assert draw_after_logging(guarded=True) == expected
        finally:
            root.removeHandler(handler)
            root.setLevel(saved)
    assert "handle" not in vars(logging.getLogger("library.some_module"))  # unwrapped afterwards


def test_an_sd_scripts_without_the_hooks_is_refused():
    from spyke_lora._engine._trainer import trainer_class

    fake = types.ModuleType("train_network")
    fake.__file__ = "/somewhere/sd-scripts/train_network.py"
    fake.NetworkTrainer = type("NetworkTrainer", (), {"train": lambda self, args: None, "sample_images": None})
    with pytest.raises(
        EngineError, match="has no NetworkTrainer.get_tokenize_strategy, post_process_network, process_batch"
    ):
        trainer_class(fake)


def test_torch_imported_first_is_remembered_for_the_mps_warning():
    code = "import torch, spyke_lora; from spyke_lora._mps_fallback import fallback_missing; print(fallback_missing())"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]  # too late: torch loaded without the variable
    out = subprocess.run(
        [sys.executable, "-c", code.replace("torch, spyke_lora", "spyke_lora, torch")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False"]


def test_class_attributes_are_put_back_after_a_run():
    """sd-scripts' LoRANetwork extends its class list UNET_TARGET_REPLACE_MODULE in place when a network is made
    from weights; the next run in the process must see the list as it was."""
    import types

    from spyke_lora._engine._process import class_attributes_restored

    module = types.ModuleType("networks.fake")
    exec(  # noqa: S102  (a stand-in engine module, from a constant)
        "class LoRANetwork:\n    TARGETS = ['Transformer2DModel']\n    NAMES = {'a': 1}\n    DIM = 4\n"
        "class Other:\n    SEEN = set()\n",
        module.__dict__,
    )
    targets = module.LoRANetwork.TARGETS
    with class_attributes_restored([module]):
        module.LoRANetwork.TARGETS += ["ResnetBlock2D", "Downsample2D"]  # what LoRANetwork.__init__ does
        module.LoRANetwork.NAMES["b"] = 2
        module.Other.SEEN.add("x")
        module.Other.SEEN = {"rebound"}
    assert module.LoRANetwork.TARGETS == ["Transformer2DModel"] and module.LoRANetwork.TARGETS is targets
    assert module.LoRANetwork.NAMES == {"a": 1} and module.Other.SEEN == set() and module.LoRANetwork.DIM == 4
