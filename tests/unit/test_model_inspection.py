"""The base model is identified from its safetensors header alone."""

import builtins
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spyke_lora import ConfigError, TrainConfig, sd_scripts_argv
from spyke_lora._header import check_base_model, inspect_model


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


def test_a_header_whose_length_starts_with_a_pickles_first_byte_is_safetensors(tmp_path):
    """A header of 384 bytes is 0x80 0x01 0 ... in little-endian: the byte a pickle starts with. A LoRA written by
    the sd-scripts command line had such a length and was refused as a pickle."""
    path = tmp_path / "lora.safetensors"
    key = "lora_unet_x.lora_down.weight"
    body = json.dumps({key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    header = body.ljust(384).encode()
    path.write_bytes(struct.pack("<Q", 384) + header + b"\0" * 4)
    assert path.read_bytes()[:1] == b"\x80"
    assert inspect_model(path).family == "lora"


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


class HeaderOnly:
    """The file object inspect_model gets: hands out bytes with read(n) up to the end of the header, counts them,
    and fails any read past it (or of unknown length) before reading, so a whole-file read costs nothing."""

    def __init__(self, f, header_end):
        self._f, self._end, self.bytes_read = f, header_end, 0

    def read(self, n=-1):
        at = self._f.tell()
        if n is None or n < 0 or at + n > self._end:
            raise AssertionError(f"read({n}) at byte {at}: past the header, which ends at byte {self._end}")
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data

    def __getattr__(self, name):
        if name.startswith("read") or name in ("fileno", "peek", "__iter__", "__next__"):  # readinto, mmap, ...
            raise AssertionError(f"{name}() on the model file: only read(n) of the header is expected")
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_only_the_header_is_read(tmp_path, monkeypatch):
    """2 GiB of (sparse) tensor data behind the header: the family comes from the header's 8 + N bytes alone."""
    key = "cond_stage_model.transformer.x"
    header = json.dumps({key: {"dtype": "F16", "shape": [2**30], "data_offsets": [0, 2**31]}}).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**31)
    opened = []
    real_path_open, real_open = Path.open, builtins.open

    def spy(real):
        def open_(file, *args, **kwargs):
            f = real(file, *args, **kwargs)
            if isinstance(file, (str, Path)) and Path(file) == path and not isinstance(f, HeaderOnly):
                opened.append(HeaderOnly(f, 8 + len(header)))
                return opened[-1]
            return f

        return open_

    monkeypatch.setattr(Path, "open", spy(real_path_open))
    monkeypatch.setattr(builtins, "open", spy(real_open))
    info = inspect_model(path)
    assert (info.family, info.size_bytes) == ("sd1", 8 + len(header) + 2**31)
    assert [f.bytes_read for f in opened] == [8 + len(header)]  # opened once; the length, then the JSON


def test_sd2_runs_with_v2_settings(tmp_path):
    model = write(tmp_path / "sd2.safetensors", ["cond_stage_model.model.ln_final.weight"])
    cfg = TrainConfig(base_model=model, train_dir=tmp_path / "1_x", output_dir=tmp_path / "o", output_name="x")
    assert "--v2" in sd_scripts_argv(cfg, device="cpu")
    assert "--v2" not in sd_scripts_argv(cfg.replace(base_model=tmp_path / "absent.safetensors"), device="cpu")
