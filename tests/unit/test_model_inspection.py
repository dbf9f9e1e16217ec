"""The base model is identified from its safetensors header alone."""

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from spyke_lora import ConfigError, TrainConfig, sd_scripts_argv
from spyke_lora._model import check_base_model, inspect_model


def write(path, keys, tail=b""):
    entries, offset = {}, 0
    for key in keys:
        entries[key] = {"dtype": "F16", "shape": [2], "data_offsets": [offset, offset + 4]}
        offset += 4
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * offset + tail)
    return path


FAMILIES = [
    ("sd1", ["cond_stage_model.transformer.text_model.final_layer_norm.weight", "model.diffusion_model.out.0.bias"]),
    ("sd2", ["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.0.bias"]),
    ("sdxl", ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.0.bias"]),
    ("sd3", ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]),
    ("flux", ["double_blocks.0.img_attn.qkv.weight"]),
    ("lora", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]),
    ("lora", ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]),
    ("unknown", ["model.diffusion_model.out.0.bias"]),
]


@pytest.mark.parametrize(("family", "keys"), FAMILIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(FAMILIES)])
def test_family_from_key_names(tmp_path, family, keys):
    info = inspect_model(write(tmp_path / "m.safetensors", keys))
    assert (info.family, info.tensor_count, info.metadata) == (family, len(keys), {"format": "pt"})
    if family in ("sd1", "sd2"):
        assert check_base_model(info.path).family == family
    else:
        with pytest.raises(ConfigError, match=str(tmp_path / "m.safetensors")):
            check_base_model(info.path)


def test_a_file_written_by_the_safetensors_library(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(3)}, str(path))
    with pytest.raises(ConfigError, match="is an SDXL checkpoint .* use an SD1.5 base model"):
        check_base_model(path)


BAD = [
    ("missing", lambda p: p, "does not exist"),
    ("short", lambda p: p.write_bytes(b"abc"), "not a valid .safetensors file (only 3 bytes)"),
    ("huge header", lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"), "header length 1000000"),
    ("not json", lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "its header is not JSON"),
    ("pickle", lambda p: p.write_bytes(b"\x80\x02}q\x00."), "pickle checkpoint"),
    ("truncated", lambda p: p.write_bytes(write(p, ["a"]).read_bytes()[:-1]), "truncated or corrupt"),
    ("trailing junk", lambda p: write(p, ["a"], tail=b"junk"), "truncated or corrupt"),
]


@pytest.mark.parametrize(("case", "make", "phrase"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_files_are_refused_with_the_path(tmp_path, case, make, phrase):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(ConfigError) as info:
        inspect_model(path)
    assert phrase in str(info.value) and str(path) in str(info.value) and "`base_model`" in str(info.value)


def test_only_the_header_is_read(tmp_path):
    """2 GiB of (sparse) tensor data behind the header: identified in well under a second."""
    key = "cond_stage_model.transformer.x"
    header = json.dumps({key: {"dtype": "F16", "shape": [2**30], "data_offsets": [0, 2**31]}}).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**31)
    start = time.perf_counter()
    assert inspect_model(path).family == "sd1"
    assert time.perf_counter() - start < 0.5


def test_sd2_runs_with_v2_settings(tmp_path):
    model = write(tmp_path / "sd2.safetensors", ["cond_stage_model.model.ln_final.weight"])
    cfg = TrainConfig(base_model=model, train_dir=tmp_path / "1_x", output_dir=tmp_path / "o", output_name="x")
    assert "--v2" in sd_scripts_argv(cfg, device="cpu")
    assert "--v2" not in sd_scripts_argv(cfg.replace(base_model=tmp_path / "absent.safetensors"), device="cpu")
