"""What a base-model file is, from its safetensors header alone (no tensor is read, no torch needed).

The header is 8 bytes of little-endian length N, then N bytes of JSON naming every tensor with its byte range; the
tensor data that follows is exactly as long as the largest range end. So the header tells the model family (by key
names) and whether the file is complete, in milliseconds, for a 2 GB or a 7 GB file alike.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from ._errors import ConfigError

__all__ = ["ModelInfo", "check_base_model", "inspect_model"]

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_MAX_HEADER = 100 * 2**20

# (family, test on a key, what the file is) in the order they are tried
_FAMILIES = (
    ("lora", lambda k: k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))
     or any(m in k for m in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a")),
     "a LoRA/LyCORIS file (lora_* keys)"),
    ("sdxl", lambda k: k.startswith("conditioner.embedders."), "an SDXL checkpoint (conditioner.embedders.* keys)"),
    ("sd3", lambda k: "joint_blocks." in k or k.startswith("text_encoders."), "a Stable Diffusion 3 checkpoint"),
    ("flux", lambda k: "double_blocks." in k or "single_blocks." in k, "a Flux checkpoint"),
    ("sd2", lambda k: k.startswith("cond_stage_model.model."),
     "a Stable Diffusion 2.x checkpoint (cond_stage_model.model.* keys)"),
    ("sd1", lambda k: k.startswith("cond_stage_model.transformer."),
     "a Stable Diffusion 1.x checkpoint (cond_stage_model.transformer.* keys)"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: str  # "sd1", "sd2", "sdxl", "sd3", "flux", "lora" or "unknown"
    description: str
    tensor_count: int
    size_bytes: int
    metadata: dict[str, str]


def inspect_model(path: str | Path) -> ModelInfo:
    """Identify a checkpoint from its header; :class:`ConfigError` (naming ``base_model``) for a file that is
    missing, a pickle, not safetensors, or truncated."""
    path = Path(path)
    where = f"`base_model` {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; check the path")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if path.suffix.lower() in _PICKLE_SUFFIXES or head.startswith((b"PK\x03\x04", b"\x80")):
            raise ConfigError(
                f"{where} is a pickle checkpoint; loading one runs arbitrary code, so spyke-lora refuses it: "
                f"convert it to .safetensors with a tool you trust, or get the .safetensors release of the model"
            )
        if len(head) < 8:
            raise ConfigError(f"{where} is not a valid .safetensors file (only {size} bytes); download it again")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise ConfigError(
                f"{where} is not a valid .safetensors file (header length {length} for a {size}-byte file); "
                f"download or copy it again"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{where} is not a valid .safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{where} is not a valid .safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    try:
        data_bytes = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ConfigError(f"{where} is not a valid .safetensors file (a tensor entry lacks data_offsets)") from None
    if size != 8 + length + data_bytes:
        raise ConfigError(
            f"{where} is truncated or corrupt: its header promises {8 + length + data_bytes} bytes, the file has "
            f"{size}; download or copy it again"
        )
    family, description = "unknown", "a file without text-encoder keys (cond_stage_model.*, conditioner.embedders.*)"
    for name, matches, text in _FAMILIES:
        if any(matches(k) for k in header):
            family, description = name, text
            break
    return ModelInfo(path, family, description, len(header), size, {str(k): str(v) for k, v in metadata.items()})


def check_base_model(path: str | Path) -> ModelInfo:
    """A base model this trainer can use (SD1.x, or SD2.x with sd-scripts' v2 settings), else :class:`ConfigError`
    saying what the file is and what to use instead."""
    info = inspect_model(path)
    if info.family in ("sd1", "sd2"):
        return info
    where = f"`base_model` {str(info.path)!r}"
    fixes = {
        "sdxl": "spyke-lora trains SD1.x/SD2.x LoRAs with sd-scripts' train_network.py; use an SD1.5 base model",
        "lora": "it is not a base model; set base_model to the SD1.5 checkpoint the LoRA is trained on",
        "sd3": "that family is not supported; use an SD1.5 base model",
        "flux": "that family is not supported; use an SD1.5 base model",
        "unknown": "it may be a U-Net-only, VAE or text-encoder file; use a full SD1.5 checkpoint",
    }
    raise ConfigError(f"{where} is {info.description}: {fixes[info.family]}")
