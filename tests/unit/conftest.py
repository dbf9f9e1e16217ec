"""Shared fixtures of the unit tests: a header-valid model file and small image folders, no engine run."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyke_lora import TrainConfig, _device
from spyke_lora._device import DeviceFacts

# The machines a unit test can say it runs on. Every unit test runs on one of them, whatever this machine has:
# the device is injected, never assumed (`make test` must pass on a Linux CPU, a Mac and a CUDA box alike).
CPU_MACHINE = DeviceFacts("2.14.1", mps_built=False, mps_available=False, cuda_available=False, cuda_device=None)
MPS_MAC = DeviceFacts("2.14.1", mps_built=True, mps_available=True, cuda_available=False, cuda_device=None)
CUDA_BOX = DeviceFacts(
    "2.14.1", mps_built=False, mps_available=False, cuda_available=True, cuda_device="NVIDIA H100 80GB HBM3"
)


@pytest.fixture(autouse=True)
def machine(monkeypatch):
    """The machine the test runs on: a CPU-only one unless the test calls ``machine(MPS_MAC)`` or such."""

    def on(facts: DeviceFacts) -> DeviceFacts:
        monkeypatch.setattr(_device, "device_facts", lambda: facts)
        return facts

    on(CPU_MACHINE)
    return on


SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def write_model(path: Path, key: str = SD1_KEY) -> Path:
    """A header-valid safetensors file: one fp16 tensor of 4 values."""
    header = json.dumps({key: {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    return path


def write_images(folder: Path, n: int, caption: str | None, size: int = 64, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((size, size, 3), i * 9 % 255, np.uint8)).save(folder / f"img{i:03d}.png")
        if caption is not None:
            (folder / f"img{i:03d}.txt").write_text(caption)


@pytest.fixture
def good(tmp_path):
    write_model(tmp_path / "model.safetensors")
    write_images(tmp_path / "10_spyke_plasma_v1", 3, "spyke_plasma_v1, red disc")
    write_images(tmp_path / "reg" / "1_person", 2, "person")
    return TrainConfig(
        base_model=tmp_path / "model.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        reg_dir=tmp_path / "reg" / "1_person",
        output_dir=tmp_path / "out",
        output_name="spyke_plasma_v1",
        resolution=64,
        enable_bucket=False,
        max_train_steps=5,
        save_every_n_steps=2,
        device="cpu",
    )
