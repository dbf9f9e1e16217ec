"""``plan()``: its text, its warnings and its problems for a set of inputs, against a golden file.

``tests/unit/data/plan_cases.json`` holds, for every case below, what ``plan()`` gave before the preflight became a
package of rules and the plan's text moved out of ``Plan`` (issue 21): ``str(plan)`` byte for byte and the
warnings in order, or the problems of the refusal in order. The test's folder is written as ``<root>``. A deliberate
change regenerates the file: ``.venv/bin/python tests/unit/test_plan_golden.py --write`` (the JSON's diff shows
what changed).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from spyke_lora import ConfigError, MemoryBudget, TrainConfig, plan

EXPECTED = Path(__file__).parent / "data" / "plan_cases.json"
ROOT = "<root>"
BUDGET = MemoryBudget(16 * 2**30, "a test's 16 GiB", 32 * 2**30)  # not this machine's: the same figures anywhere
SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_KEY = "cond_stage_model.model.ln_final.weight"
SDXL_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"


def write_model(path: Path, key: str = SD1_KEY) -> Path:
    header = json.dumps({key: {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    return path


def write_images(folder: Path, n: int, caption: str | None, size: int = 64, start: int = 0, shade: int = 9) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((size, size, 3), i * shade % 255, np.uint8)).save(folder / f"img{i:03d}.png")
        if caption is not None:
            (folder / f"img{i:03d}.txt").write_text(caption)


def good(root: Path) -> TrainConfig:
    """The unit tests' ``good`` dataset (conftest), in ``root``."""
    write_model(root / "model.safetensors")
    write_images(root / "10_spyke_plasma_v1", 3, "spyke_plasma_v1, red disc")
    write_images(root / "reg" / "1_person", 2, "person")
    return TrainConfig(
        base_model=root / "model.safetensors", train_dir=root / "10_spyke_plasma_v1", reg_dir=root / "reg" / "1_person",
        output_dir=root / "out", output_name="spyke_plasma_v1", resolution=64, enable_bucket=False, max_train_steps=5,
        save_every_n_steps=2, device="cpu",
    )  # fmt: skip


def with_warnings(root: Path) -> TrainConfig:
    cfg = good(root)
    (cfg.train_dir / "img000.txt").write_text("red disc, spyke_plasma_v1")
    (cfg.reg_dir / "img001.txt").unlink()
    (cfg.reg_dir / "img000.txt").write_text(" ")
    write_model(cfg.base_model, SD2_KEY)
    return cfg.replace(
        network_alpha=64.0, flip_aug=True, save_every_n_steps=50, num_repeats=4, resolution=128, enable_bucket=True,
        extra_args={"min_bucket_reso": 64}, sample_prompts=("spyke_plasma_v1, in the rain", "a cat"),
        mixed_precision="fp16",
    )  # fmt: skip


def held_out(root: Path) -> TrainConfig:
    cfg = good(root)
    write_images(root / "val" / "1_spyke_plasma_v1", 2, "spyke_plasma_v1, held out", start=10)  # other bytes
    return cfg.replace(validation_dir=root / "val" / "1_spyke_plasma_v1", validate_every_n_steps=2, validation_seed=9)


def split(root: Path) -> TrainConfig:
    return good(root).replace(validation_split=0.34, reg_dir=None, sample_prompts=(), save_state=True)


def epochs(root: Path) -> TrainConfig:
    return good(root).replace(max_train_steps=None, max_train_epochs=2, save_every_n_steps=None, save_precision="fp16")


def resumed(root: Path, step: int = 2) -> TrainConfig:
    from spyke_lora._engine._state import RECORD_NAME, state_record

    cfg = good(root).replace(save_state=True)
    state = cfg.output_dir / f"spyke_plasma_v1-step{step:08d}-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": step}))
    (state / RECORD_NAME).write_text(json.dumps(dict(state_record(cfg), step=step, epoch=1)))
    return cfg


def everything_wrong(root: Path) -> TrainConfig:
    cfg = good(root)
    write_model(cfg.base_model, SDXL_KEY)
    (cfg.train_dir / "img000.txt").unlink()
    (cfg.train_dir / "img002.txt").write_text("\n")
    (cfg.train_dir / "img001.png").write_bytes(b"broken")
    Image.open(cfg.train_dir / "img002.png").convert("RGB").save(cfg.train_dir / "img002.png", format="JPEG")
    Image.new("RGB", (64, 64)).save(cfg.train_dir / "img002.jpg")
    write_images(cfg.train_dir, 1, "spyke_plasma_v1, big", size=96, start=7)
    cfg.output_dir.mkdir()
    for step in (2, 4):
        (cfg.output_dir / f"spyke_plasma_v1-step0000000{step}.safetensors").write_bytes(b"earlier")
    (cfg.output_dir / "spyke_plasma_v1.safetensors").write_bytes(b"earlier")
    return cfg.replace(reg_dir=root / "reg" / "gone", tokenizer_cache_dir=root / "no-tokenizer")


def dataset_toml(root: Path) -> TrainConfig:
    cfg = good(root)
    path = root / "my_dataset.toml"
    path.write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nnum_repeats = 2\n[[datasets.subsets]]\n'
        f'image_dir = "{cfg.train_dir}"\ncolor_aug = true\nrandom_crop = true\n'
        f'[[datasets.subsets]]\nimage_dir = "gone"\n[[datasets.subsets]]\nimage_dir = "reg/1_person"\nis_reg = true\n'
    )
    return cfg.replace(train_dir=None, reg_dir=None, dataset_config=path)


def twin_held_out(root: Path) -> TrainConfig:
    cfg = good(root)
    write_images(root / "val" / "1_spyke_plasma_v1", 2, "spyke_plasma_v1, held out")  # img000, img001: the same bytes
    return cfg.replace(validation_dir=root / "val" / "1_spyke_plasma_v1")


def broken_held_out(root: Path) -> TrainConfig:
    cfg = twin_held_out(root)
    (cfg.validation_dir / "img000.txt").unlink()
    return cfg


CASES: dict[str, Callable[[Path], tuple[TrainConfig, dict]]] = {
    "good": lambda root: (good(root), {}),
    "warnings": lambda root: (with_warnings(root), {}),
    "held-out": lambda root: (held_out(root), {}),
    "split": lambda root: (split(root), {}),
    "epochs": lambda root: (epochs(root), {}),
    "two-processes": lambda root: (good(root), {"processes": 2}),
    "two-machines": lambda root: (
        good(root).replace(extra_args={"gradient_accumulation_steps": 2}),
        {"launch": {"processes": 4, "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1"}},
    ),
    "over-budget": lambda root: (good(root).replace(resolution=512, enable_bucket=True), {"budget": 2**30}),
    "resumed": lambda root: (resumed(root), {"resume": "latest"}),
    "refused-everything": lambda root: (everything_wrong(root), {}),
    "refused-dataset-toml": lambda root: (dataset_toml(root), {}),
    "refused-twin-held-out": lambda root: (twin_held_out(root), {}),
    "refused-broken-held-out": lambda root: (broken_held_out(root), {}),
    "refused-split-none": lambda root: (good(root).replace(validation_split=0.1), {}),
    "refused-split-overlap": lambda root: (good(root).replace(validation_split=0.5), {}),
    "refused-no-state": lambda root: (good(root), {"resume": "latest"}),
    "refused-memory-limit": lambda root: (good(root).replace(memory_limit="1MB"), {}),
    "refused-existing-after-resume": lambda root: (resumed(root), {"resume": "latest", "later": True}),
    "refused-nothing-left": lambda root: (resumed(root, step=5), {"resume": "latest"}),
    "refused-mps-processes": lambda root: (good(root).replace(device="mps"), {"processes": 2, "mps": True}),
    "mps": lambda root: (good(root).replace(device="mps", mixed_precision="fp16"), {"mps": True}),
}


def outcome(root: Path, make: Callable[[Path], tuple[TrainConfig, dict]]) -> dict:
    """``str(plan)`` and its warnings, or the problems of the refusal, with ``root`` written as ``<root>``."""
    from spyke_lora import Launch, _device

    cfg, how = make(root)
    if how.get("later"):
        (cfg.output_dir / "spyke_plasma_v1-step00000004.safetensors").write_bytes(b"later")
    budget = MemoryBudget(how["budget"], "a test's small budget", 32 * 2**30) if "budget" in how else BUDGET
    launch = Launch(**how["launch"]) if "launch" in how else None
    facts = _device.device_facts
    if how.get("mps"):  # an Apple Silicon Mac, whatever this machine is
        _device.device_facts = lambda: _device.DeviceFacts("2.14.1", True, True, False, None)
    try:
        p = plan(cfg, resume=how.get("resume"), memory_budget=budget, processes=how.get("processes"), launch=launch)
    except ConfigError as e:
        return {"problems": [problem.replace(str(root), ROOT) for problem in e.problems]}
    finally:
        _device.device_facts = facts
    return {"text": str(p).replace(str(root), ROOT), "warnings": [w.replace(str(root), ROOT) for w in p.warnings]}


def outcomes(root: Path) -> dict[str, dict]:
    found = {}
    for name, make in CASES.items():
        (root / name).mkdir()
        with contextlib.chdir(root / name):  # a relative path (a dataset TOML's image_dir) resolves in the case
            found[name] = outcome(root / name, make)
    return found


def _small_process(self) -> types.SimpleNamespace:
    """This process's resident memory, as psutil would report a fresh one's: the plan's CPU runtime is then the
    model's constant, not what this test process happens to hold (pytest's own modules, earlier tests)."""
    return types.SimpleNamespace(rss=100 * 2**20)


def test_every_plan_and_refusal_is_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("SPYKE_LORA_CACHE", str(tmp_path / "cache"))  # no calibration of this machine's
    monkeypatch.setattr(psutil.Process, "memory_info", _small_process)
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    found = outcomes(tmp_path)
    assert sorted(found) == sorted(expected)
    for name, result in found.items():
        assert result == expected[name], name


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:  # regenerate the golden file (a deliberate change only)
    import tempfile

    psutil.Process.memory_info = _small_process
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPYKE_LORA_CACHE"] = str(Path(tmp) / "cache")
        golden = outcomes(Path(tmp))
    EXPECTED.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(golden)} cases to {EXPECTED}")
