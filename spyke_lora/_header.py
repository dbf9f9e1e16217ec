"""Safetensors headers: the one reader of them (:func:`read_header`), and what a base-model file is from its header.

The header is 8 bytes of little-endian length N, then N bytes of JSON naming every tensor with its byte range; the
tensor data that follows is exactly as long as the largest range end. So the header tells the model family (by key
names) and whether the file is complete, in milliseconds, for a 2 GB or a 7 GB file alike, with no tensor read and
no torch needed. :func:`read_header` reports what is wrong as facts (:class:`HeaderError`); each caller words them:
:func:`inspect_model` for a base model here, ``deploy()`` for a LoRA file.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
from pathlib import Path
from typing import Any

from ._errors import ConfigError

__all__ = [
    "UNET_CONV_IN",
    "Header",
    "HeaderError",
    "ModelInfo",
    "check_base_model",
    "file_problem",
    "inspect_model",
    "os_error_words",
    "read_header",
]

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_MAX_HEADER = 100 * 2**20
# the U-Net's first convolution in an LDM checkpoint: its weight's shape[1] is the U-Net's input channels
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"

# (family, test on a key, what the file is) in the order they are tried
_FAMILIES = (
    (
        "lora",
        lambda k: (
            k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))
            or any(m in k for m in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a"))
        ),
        "a LoRA/LyCORIS file (lora_* keys)",
    ),
    ("sdxl", lambda k: k.startswith("conditioner.embedders."), "an SDXL checkpoint (conditioner.embedders.* keys)"),
    ("sd3", lambda k: "joint_blocks." in k or k.startswith("text_encoders."), "a Stable Diffusion 3 checkpoint"),
    ("flux", lambda k: "double_blocks." in k or "single_blocks." in k, "a Flux checkpoint"),
    (
        "sd2",
        lambda k: k.startswith("cond_stage_model.model."),
        "a Stable Diffusion 2.x checkpoint (cond_stage_model.model.* keys)",
    ),
    (
        "sd1",
        lambda k: k.startswith("cond_stage_model.transformer."),
        "a Stable Diffusion 1.x checkpoint (cond_stage_model.transformer.* keys)",
    ),
)


# inspect_model's words for what read_header finds (HeaderError.problem -> message)
_BASE_MODEL_PROBLEMS = {
    "pickle": "{where} is a pickle checkpoint; loading one runs arbitrary code, so spyke-lora refuses it: convert it "
    "to .safetensors with a tool you trust, or get the .safetensors release of the model",
    "short": "{where} is not a valid .safetensors file (only {size} bytes); download it again",
    "length": "{where} is not a valid .safetensors file (header length {length} for a {size}-byte file); download or "
    "copy it again",
    "not json": "{where} is not a valid .safetensors file (its header is not JSON: {detail})",
    "not object": "{where} is not a valid .safetensors file (its header is not a JSON object)",
    "no offsets": "{where} is not a valid .safetensors file (a tensor entry lacks data_offsets)",
    "truncated": "{where} is truncated or corrupt: its header promises {expected} bytes, the file has {size}; download "
    "or copy it again",
}


@dataclasses.dataclass(frozen=True)
class Header:
    """A safetensors file's header. ``tensors``: every tensor's name -> its ``dtype``, ``shape`` and
    ``data_offsets``; ``metadata``: the ``__metadata__`` entry as the file has it ({} when absent); ``length``: N,
    the length of the JSON; ``size``: the file's size in bytes."""

    tensors: dict[str, Any]
    metadata: Any
    length: int
    size: int


class HeaderError(ValueError):
    """What :func:`read_header` found wrong, as facts for each caller to word (see :meth:`worded`).

    ``problem``: "pickle" (a zip or pickle, not safetensors), "short" (under 8 bytes), "length" (a header length
    over 100 MiB or past the end of the file), "not json", "not object", "no offsets" (a tensor entry without
    ``data_offsets``) or "truncated" (the file's size is not the ``expected`` one). ``size``: the file's bytes;
    ``length``: the header length read; ``detail``: the JSON error."""

    def __init__(
        self,
        problem: str,
        path: Path,
        size: int,
        length: int | None = None,
        expected: int | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(f"{path} is not a complete .safetensors file ({problem})")
        self.problem, self.path, self.size = problem, path, size
        self.length, self.expected, self.detail = length, expected, detail

    def worded(self, messages: dict[str, str], where: str) -> str:
        """``messages[problem]`` with ``{where}`` and the facts (``{size}``, ``{length}``, ``{expected}``,
        ``{detail}``) filled in."""
        return messages[self.problem].format(
            where=where, size=self.size, length=self.length, expected=self.expected, detail=self.detail
        )


def read_header(path: str | Path, *, complete: bool = True) -> Header:
    """The header of a safetensors file, from its first 8 + N bytes only (no tensor is read);
    :class:`HeaderError` when the file is a pickle or not safetensors, or, with ``complete``, when a tensor entry
    lacks its byte range or the file is not exactly as long as the header says. ``OSError`` when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)  # the header's length, then its first character
        length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        # a header length may well start with the byte 0x80, as a pickle does: a file that reads as a safetensors
        # header (a plausible length, then "{") is one
        header_like = len(head) == 9 and length <= _MAX_HEADER and 8 + length <= size and head[8:] == b"{"
        if not header_like and head.startswith((b"PK\x03\x04", b"\x80")):  # a zip (torch.save), a pickle's opcode
            raise HeaderError("pickle", path, size)
        if len(head) < 8:
            raise HeaderError("short", path, size)
        if length > _MAX_HEADER or 8 + length > size:
            raise HeaderError("length", path, size, length)
        try:
            tensors = json.loads((head[8:] + f.read(max(0, length - len(head[8:]))))[:length])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeaderError("not json", path, size, length, detail=str(e)) from None
    if not isinstance(tensors, dict):
        raise HeaderError("not object", path, size, length)
    metadata = tensors.pop("__metadata__", None) or {}
    header = Header(tensors, metadata, length, size)
    if complete:
        try:
            data_bytes = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (TypeError, KeyError, IndexError, ValueError):
            raise HeaderError("no offsets", path, size, length) from None
        if size != 8 + length + data_bytes:
            raise HeaderError("truncated", path, size, length, expected=8 + length + data_bytes)
    return header


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a safetensors file is, from its header alone (:func:`inspect_model`)."""

    path: Path
    family: str  # "sd1", "sd2", "sdxl", "sd3", "flux", "lora" or "unknown"
    description: str
    tensor_count: int
    size_bytes: int
    metadata: dict[str, str]
    unet_in_channels: int | None = None  # shape[1] of UNET_CONV_IN; None without that tensor
    has_unet: bool = False  # model.diffusion_model.* keys
    has_vae: bool = False  # first_stage_model.* keys


def inspect_model(path: str | Path) -> ModelInfo:
    """Identify a checkpoint from its header.

    Args:
        path: The safetensors file.

    Returns:
        Its family, tensors, metadata and the U-Net's and VAE's presence.

    Raises:
        ConfigError: Naming ``base_model``, for a path that is missing, a dangling link or a link loop, a folder (a
            diffusers model's is said to be one), unreadable, a pickle, not safetensors, or truncated.
    """
    path = Path(path)
    where = f"`base_model` {str(path)!r}"
    if path.is_dir():
        raise ConfigError(_folder_words(path, where))
    problem = file_problem(path, where)
    if problem is not None:
        raise ConfigError(problem)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ConfigError(_BASE_MODEL_PROBLEMS["pickle"].format(where=where))
    try:
        header = read_header(path)
    except HeaderError as e:
        raise ConfigError(e.worded(_BASE_MODEL_PROBLEMS, where)) from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {os_error_words(e, path)}") from None
    family, description = "unknown", "a file without text-encoder keys (cond_stage_model.*, conditioner.embedders.*)"
    for name, matches, text in _FAMILIES:
        if any(matches(k) for k in header.tensors):
            family, description = name, text
            break
    metadata = {str(k): str(v) for k, v in header.metadata.items()}
    conv_in = header.tensors.get(UNET_CONV_IN)
    shape = conv_in.get("shape") if isinstance(conv_in, dict) else None
    channels = int(shape[1]) if isinstance(shape, list) and len(shape) == 4 else None
    has_unet = any(k.startswith("model.diffusion_model.") for k in header.tensors)
    has_vae = any(k.startswith("first_stage_model.") for k in header.tensors)
    return ModelInfo(path, family, description, len(header.tensors), header.size, metadata, channels, has_unet, has_vae)


def file_problem(path: Path, where: str) -> str | None:
    """Why ``path`` cannot be read as a file, naming its real cause, or None when it can be opened.

    Args:
        path: The file.
        where: The field that names it, for the message (``"`base_model` '/m/x.safetensors'"``).

    Returns:
        The message: the path does not exist; it is a symbolic link to a missing target (named) or a loop of links;
        it is a folder; it cannot be read (permission denied, ...). None for a file this process may read
        (whose reading may still fail: the caller words that OSError with :func:`os_error_words`).
    """
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{where} is a loop of symbolic links (it links back to itself); point it at the file itself"
        if path.is_symlink():
            target = Path(os.readlink(path))
            target = target if target.is_absolute() else path.parent / target
            return f"{where} is a symbolic link to {str(target)!r}, which does not exist; fix the link or the path"
        if e.errno == errno.ENOENT:
            return f"{where} does not exist; check the path"
        return f"{where} cannot be read: {os_error_words(e, path)}"
    if path.is_dir():
        return f"{where} is a folder, not a file; name the file in it"
    if not os.access(path, os.R_OK):  # asked, not opened: the caller's one read of it follows
        return f"{where} cannot be read: {os_error_words(PermissionError(errno.EACCES, 'Permission denied'), path)}"
    return None


def os_error_words(error: OSError, path: Path) -> str:
    """What an ``OSError`` reading ``path`` means, and the fix, in a few words."""
    if isinstance(error, PermissionError):
        return f"permission denied; make it readable (chmod u+r {str(path)!r}) or copy it somewhere you can read"
    return f"{error.strerror or error} (errno {error.errno}); check the file and the disk"


def _folder_words(path: Path, where: str) -> str:
    """A folder given as a checkpoint: a diffusers model's, or one holding checkpoint files."""
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        return (
            f"{where} is a diffusers model folder (model_index.json, unet/, vae/, ...), not a single-file checkpoint: "
            "spyke-lora trains from one .safetensors file (whose header plan() reads); set base_model to the "
            "model's .safetensors release, or convert the folder with diffusers' "
            "scripts/convert_diffusers_to_original_stable_diffusion.py --use_safetensors"
        )
    files = sorted(p.name for p in path.glob("*.safetensors"))[:5]
    inside = f"it holds {', '.join(files)}" if files else "it holds no .safetensors file"
    return f"{where} is a folder, not a checkpoint file ({inside}); set base_model to the .safetensors file itself"


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
