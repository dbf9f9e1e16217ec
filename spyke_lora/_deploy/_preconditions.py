"""What ``deploy()`` checks before it writes anything: the LoRA file (complete safetensors, kohya LoRA keys in pairs,
finite weights), its name in ComfyUI, the ComfyUI folder, and the run's config the sidecar records.

torch and safetensors are imported only when a file is checked: importing spyke_lora stays light.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from .._config import TrainConfig, read_toml
from .._errors import ConfigError, DeployError
from .._files import sha256
from .._header import HeaderError, read_header
from .._user_warnings import warn_caller

__all__ = ["CHUNK", "CheckedLora", "check_comfyui", "check_lora", "read_metadata", "resolve_config", "resolve_name"]

CHUNK = 2**20  # bytes read at a time when a LoRA file is hashed or copied
_LORA_KEY = re.compile(
    r"^(?P<module>lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"
)
_STEP_SUFFIX = re.compile(r"-(?:step)?\d+$")  # NAME-step00000600, NAME-000004 (an epoch): sd-scripts' file names
# ComfyUI roots have a models/ folder and at least one of these (see _comfyui_problem)
_COMFYUI_MARKERS = ("main.py", "comfy/", "custom_nodes/", "models/checkpoints/")


@dataclasses.dataclass(frozen=True)
class CheckedLora:
    """A LoRA file that passed :func:`check_lora`: what the install and the sidecar need to know of it."""

    path: Path
    size: int
    sha256: str
    metadata: dict[str, str]
    tensor_count: int


# deploy's words for what read_header finds (HeaderError.problem -> message)
_NOT_SAFETENSORS = {
    "pickle": "{where} must be a .safetensors file, got a pickle checkpoint (it would run code when loaded); deploy "
    "the .safetensors file sd-scripts wrote",
    "short": "{where} must be a .safetensors file, got {size} bytes; copy the file again",
    "length": "{where} must be a .safetensors file, got a header length of {length} in a {size}-byte file (not "
    "safetensors, or cut short); copy the file again",
    "not json": "{where} must be a .safetensors file, got a header that is not JSON ({detail}); copy the file again",
    "not object": "{where} must be a .safetensors file, got a header that is not a JSON object",
    "no offsets": "{where} must be a .safetensors file, got a tensor entry without data_offsets; copy the file again",
    "truncated": "{where} is truncated or corrupt: its header promises {expected} bytes, got {size}; copy the file "
    "again, or deploy another checkpoint of the run",
}


def check_lora(path: Path) -> CheckedLora:
    """Check ``path`` as a complete safetensors file of finite kohya LoRA weights.

    Args:
        path: the LoRA file, absolute.

    Returns:
        Its size, sha256, sd-scripts metadata and tensor count. A file without sd-scripts metadata (``ss_*``) passes
        with a :class:`SpykeLoraWarning`.

    Raises:
        DeployError: the file is missing, a folder, not safetensors, cut short, holds other keys than a kohya LoRA's,
            an unpaired ``lora_down``/``lora_up``, or NaN or infinite weights.
    """
    where = f"`checkpoint` {str(path)!r}"
    if not path.exists():
        raise DeployError(
            f"{where} does not exist; check the path (a run writes NAME-stepNNNNNNNN.safetensors into its output_dir)"
        )
    if not path.is_file():
        raise DeployError(f"{where} must be a LoRA .safetensors file, got a folder; pass one of the files in it")
    try:
        header = read_header(path)
    except HeaderError as e:
        raise DeployError(e.worded(_NOT_SAFETENSORS, where)) from None
    _check_keys(where, list(header.tensors))
    _check_tensors(where, path)
    metadata = {str(k): str(v) for k, v in header.metadata.items()}
    if not any(k.startswith("ss_") for k in metadata):
        warn_caller(
            f"{where} has no sd-scripts metadata (ss_*); its step, base model and network are unknown, and the "
            f"sidecar will say null for them"
        )
    return CheckedLora(path, header.size, sha256(path), metadata, len(header.tensors))


def _check_keys(where: str, keys: list[str]) -> None:
    """Kohya LoRA keys only, every ``lora_down`` with its ``lora_up``, at least one such pair."""
    if not keys:
        raise DeployError(f"{where} must hold LoRA weights, got no tensors at all; deploy another checkpoint")
    bad = [k for k in keys if not _LORA_KEY.match(k)]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DeployError(
            f"{where} must be a kohya-format LoRA (keys lora_unet_*/lora_te_* ending in .lora_down.weight, "
            f".lora_up.weight or .alpha), got {len(bad)} other key(s): {shown}; a base model or a LyCORIS/diffusers "
            f"LoRA is not what spyke-lora trains: deploy a file of its output_dir, or copy other files by hand"
        )
    parts: dict[str, set[str]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        assert match is not None
        parts.setdefault(match["module"], set()).add(match["part"])
    unpaired = sorted(m for m, p in parts.items() if ("lora_down.weight" in p) != ("lora_up.weight" in p))
    if unpaired:
        shown = ", ".join(unpaired[:3]) + (f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else "")
        raise DeployError(
            f"{where} must have a lora_up.weight for every lora_down.weight and back, got {len(unpaired)} module(s) "
            f"with only one: {shown}; the file is incomplete: deploy another checkpoint"
        )
    if not any({"lora_down.weight", "lora_up.weight"} <= p for p in parts.values()):
        found = ", ".join(sorted({p for ps in parts.values() for p in ps}))
        raise DeployError(
            f"{where} must hold at least one lora_down/lora_up weight pair, got only {found}; deploy another checkpoint"
        )


def _check_tensors(where: str, path: Path) -> None:
    """Every tensor readable and every floating-point one finite (reads the whole file, with torch)."""
    import torch
    from safetensors import SafetensorError, safe_open

    bad: list[str] = []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                tensor = f.get_tensor(key)
                if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                    bad.append(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise DeployError(
            f"{where} must be a readable .safetensors file, got an error reading its tensors ({e}); copy the file again"
        ) from e
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DeployError(
            f"{where} must hold finite weights, got NaN or infinite values in {len(bad)} tensor(s): "
            f"{shown}; the training diverged by this step: deploy an earlier checkpoint"
        )


def _valid_name(name: str) -> str | None:
    """The stem, or None when ``name`` cannot be a plain file name in models/loras."""
    if not isinstance(name, str):
        return None
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name.strip() or name != name.strip() or name.startswith(".") or any(c in name for c in "/\\\0:"):
        return None
    return name


def resolve_name(name: str | None, checked: CheckedLora) -> str:
    """The file's stem in ComfyUI.

    Args:
        name: the stem asked for (a trailing ``.safetensors`` is dropped); None: the file's ``ss_output_name``
            metadata, else the file's own stem.
        checked: the checked LoRA file.

    Returns:
        The stem.

    Raises:
        DeployError: ``name`` (or, without it, the file's name) is not a plain file stem.
    """
    if name is not None:
        stem = _valid_name(name)
        if stem is None:
            raise DeployError(
                f"`name` must be a plain file stem such as 'spyke_plasma_v1' (no '/', '\\', ':' or "
                f"leading '.', not empty), got {name!r}; try --name spyke_plasma_v1"
            )
        return stem
    output_name = checked.metadata.get("ss_output_name")
    if output_name and _valid_name(output_name):
        return _valid_name(output_name)  # type: ignore[return-value]
    stem = _valid_name(checked.path.stem)
    if stem is None:
        raise DeployError(f"the file name of {checked.path} cannot be used in ComfyUI as it is; pass `name` (--name)")
    return stem


def _comfyui_problem(root: Path) -> str | None:
    """None when ``root`` looks like a ComfyUI installation: a folder with ``models/`` and at least one of
    ``main.py``, ``comfy/``, ``custom_nodes/``, ``models/checkpoints/``; else what is missing."""
    if not root.exists():
        return "it does not exist"
    if not root.is_dir():
        return "it is not a folder"
    if not (root / "models").is_dir():
        return "it has no models/ folder"
    if not any((root / m).is_dir() if m.endswith("/") else (root / m).is_file() for m in _COMFYUI_MARKERS):
        return f"it has models/ but none of {', '.join(_COMFYUI_MARKERS)}"
    return None


def check_comfyui(root: Path) -> Path:
    """Check that ``root`` is a ComfyUI folder: ``models/`` and one of ``main.py``, ``comfy/``, ``custom_nodes/``,
    ``models/checkpoints/``.

    Args:
        root: the folder given as ``comfyui_dir``, absolute.

    Returns:
        ``root``.

    Raises:
        DeployError: it is not one; the message names a nearby folder that is, if any.
    """
    problem = _comfyui_problem(root)
    if problem is None:
        return root
    hint = "pass the folder that holds ComfyUI's main.py and models/ (e.g. ~/tools/ComfyUI)"
    candidates = [root / "ComfyUI", root.parent, root.parent.parent]  # a portable install's root; models/, models/loras
    for candidate in candidates:
        if candidate != root and _comfyui_problem(candidate) is None:
            hint = f"try --comfyui {candidate}"
            break
    raise DeployError(f"`comfyui_dir` {str(root)!r} must be a ComfyUI folder, but {problem}; {hint}")


def resolve_config(
    config: TrainConfig | str | os.PathLike[str] | None, checked: CheckedLora
) -> tuple[dict[str, Any] | None, Path | None]:
    """The run's config the sidecar records.

    Args:
        config: the run's config or its TOML; None: ``NAME.config.toml`` next to the checkpoint, if there is one (one
            that is no longer valid is recorded as written, with a :class:`SpykeLoraWarning`).
        checked: the checked LoRA file.

    Returns:
        ``(the config as a dict, its TOML file)``; either is None when unknown.

    Raises:
        DeployError: the ``config`` file given does not exist, or is a folder (the message names the config file
            in it).
        ConfigError: the ``config`` file given is not a valid config.
    """
    if isinstance(config, TrainConfig):
        return config.to_dict(), None
    if config is not None:
        path = Path(config).expanduser().absolute()
        if path.is_dir():
            raise DeployError(_config_folder_problem(path, checked))
        if not path.is_file():
            raise DeployError(
                f"`config` {str(path)!r} does not exist; pass the run's NAME.config.toml, or leave it out"
            )
        return TrainConfig.from_toml(path).to_dict(), path  # a ConfigError names what is wrong in it
    folder = checked.path.parent
    for stem in _config_stems(checked):
        path = folder / f"{stem}.config.toml"
        if path.is_file():
            try:
                return TrainConfig.from_toml(path).to_dict(), path
            except ConfigError as e:  # an older or edited config: record what the file says
                warn_caller(f"{path} is not a valid config now ({e}); recorded as written")
                try:
                    return read_toml(path), path
                except ConfigError:  # not even TOML: its path alone is recorded
                    return None, path
    return None, None


def _config_stems(checked: CheckedLora) -> list[str]:
    """The names the run's ``NAME.config.toml`` can have: the run's output_name, the file's stem, the stem without
    its step."""
    stems = [checked.metadata.get("ss_output_name"), checked.path.stem, _STEP_SUFFIX.sub("", checked.path.stem)]
    return list(dict.fromkeys(s for s in stems if s and _valid_name(s)))


def _config_folder_problem(folder: Path, checked: CheckedLora) -> str:
    """``config`` given as a folder (the run's output_dir, most likely): the config file in it to pass instead."""
    mine = [folder / f"{stem}.config.toml" for stem in _config_stems(checked)]
    found = [p for p in mine if p.is_file()] or sorted(folder.glob("*.config.toml"))
    if found:
        fix = f"pass the file: --config {str(found[0])!r}" + (
            f" (the folder has {len(found)}: {', '.join(p.name for p in found[:4])})" if len(found) > 1 else ""
        )
    else:
        fix = "it has no NAME.config.toml (a run writes one next to its LoRA files); pass that file, or leave it out"
    return f"`config` {str(folder)!r} is a folder, not the run's NAME.config.toml; {fix}"


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file (its tensors are not checked).

    Args:
        path: the file.

    Returns:
        The metadata; ``{}`` when the file cannot be read.
    """
    try:
        metadata = read_header(path, complete=False).metadata
    except (OSError, HeaderError):
        return {}
    return metadata if isinstance(metadata, dict) else {}
