"""``deploy()``: check a trained LoRA file, then install it into ComfyUI's ``models/loras``.

It never leaves a half-written file where ComfyUI looks, and never loses the file it replaces.

What ComfyUI lists (``folder_paths.py``, ``get_filename_list("loras")``): every file under ``models/loras``, walked
recursively into every subfolder (hidden ones too; only ``.git`` is skipped), whose last extension, lower-cased, is
one of ``.ckpt .pt .pt2 .bin .pth .safetensors .pkl .sft``. So everything this module writes next to a LoRA ends in
something else: the temporary copy in ``.partial``, the backup of a replaced file in ``.safetensors.bak`` (in
``models/loras/.spyke-lora-backup/``), the provenance sidecar in ``.json``.

torch and safetensors are imported only when a file is checked: importing spyke_lora stays light.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from ._config import TrainConfig, tomllib
from ._errors import ConfigError, DeployError, SpykeLoraWarning
from ._files import atomic_path
from ._model import HeaderError, read_header

__all__ = ["DeployResult", "deploy"]

# ComfyUI's folder_paths.supported_pt_extensions (the current set; older releases had a subset of it)
COMFYUI_MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})
BACKUP_DIR = ".spyke-lora-backup"
SIDECAR_SUFFIX = ".spyke-lora.json"

_CHUNK = 2**20
_LORA_KEY = re.compile(
    r"^(?P<module>lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"
)
_STEP_SUFFIX = re.compile(r"-(?:step)?\d+$")  # NAME-step00000600, NAME-000004 (an epoch): sd-scripts' file names
# ComfyUI roots have a models/ folder and at least one of these (see _comfyui_problem)
_COMFYUI_MARKERS = ("main.py", "comfy/", "custom_nodes/", "models/checkpoints/")


@dataclasses.dataclass(frozen=True)
class DeployResult:
    """What :func:`deploy` did. ``status``: ``"installed"`` (a new file), ``"replaced"`` (an older, different file
    was moved to ``backup`` first) or ``"unchanged"`` (the same bytes were already installed; nothing copied)."""

    path: Path  # the installed file, COMFYUI/models/loras/NAME.safetensors
    status: str  # "installed" | "replaced" | "unchanged"
    sha256: str
    step: int | None  # the training step the file was saved at (its ss_steps metadata), if known
    backup: Path | None  # where the replaced file went (status "replaced"), else None
    sidecar: Path  # COMFYUI/models/loras/NAME.spyke-lora.json: where the file came from

    def __str__(self) -> str:
        what = ", ".join(([f"step {self.step}"] if self.step is not None else []) + [f"sha256 {self.sha256[:8]}"])
        text = f"{self.status} {self.path.name} ({what}) in {self.path.parent}"
        if self.status == "unchanged":
            text = f"{self.path.name} ({what}) is already installed in {self.path.parent}; nothing copied"
        if self.backup is not None:
            text += f"; the previous file is kept as {self.backup}"
        return text


@dataclasses.dataclass(frozen=True)
class _Checked:
    path: Path
    size: int
    sha256: str
    metadata: dict[str, str]
    tensor_count: int


def deploy(
    checkpoint: str | os.PathLike[str],
    comfyui_dir: str | os.PathLike[str],
    name: str | None = None,
    *,
    overwrite: bool = False,
    config: TrainConfig | str | os.PathLike[str] | None = None,
) -> DeployResult:
    """Check ``checkpoint`` (a kohya-format LoRA .safetensors: complete, LoRA keys only, finite values) and install it
    as ``COMFYUI/models/loras/NAME.safetensors`` with a ``NAME.spyke-lora.json`` provenance sidecar.

    ``name``: the file stem in ComfyUI; default the file's ``ss_output_name`` metadata, else its own stem.
    ``overwrite``: replace a different file of that name (moved to ``models/loras/.spyke-lora-backup/`` first);
    without it such a file is refused. The same bytes already installed: nothing is copied (status "unchanged").
    ``config``: the run's :class:`TrainConfig` or its TOML, recorded in the sidecar; default ``NAME.config.toml`` next
    to the checkpoint, if there is one. Raises :class:`DeployError` before anything is written when a check fails.
    """
    source = Path(checkpoint).expanduser().absolute()
    checked = _check_lora(source)
    name = _resolve_name(name, checked)
    root = _check_comfyui(Path(comfyui_dir).expanduser().absolute())
    config_data, config_path = _resolve_config(config, checked)

    loras = root / "models" / "loras"
    final = loras / f"{name}.safetensors"
    sidecar = loras / f"{name}{SIDECAR_SUFFIX}"
    step = _int(checked.metadata.get("ss_steps"))
    if final.is_dir() or sidecar.is_dir():
        raise DeployError(f"`{final if final.is_dir() else sidecar}` is a folder; move it away, or choose another "
                          f"`name` (--name)")  # fmt: skip

    backup: Path | None = None
    try:
        loras.mkdir(parents=True, exist_ok=True)
        if final.exists():
            installed = _sha256(final)
            if installed == checked.sha256:
                status = "unchanged"
            elif not overwrite:
                raise DeployError(_different_message(final, installed, checked, step))
            else:
                status = "replaced"
                backup = _replace(checked, final, installed, sidecar)
        else:
            status = "installed"
            _copy_atomic(source, final, checked.sha256)
    except OSError as e:
        raise DeployError(
            f"could not install {source} as {final}: {e}; the file installed there, if any, is untouched and no "
            f"partial file remains; fix the cause (disk space, permissions) and deploy again"
        ) from e
    try:
        record = _sidecar_record(name, checked, step, config_data, config_path, backup)
        _write_sidecar(sidecar, record, keep_install_time=status == "unchanged")
    except OSError as e:
        raise DeployError(f"{final} is {status}, but its provenance file {sidecar} could not be written: {e}; fix the "
                          f"cause and deploy again (the same file: nothing is copied)") from e  # fmt: skip
    return DeployResult(final, status, checked.sha256, step, backup, sidecar)


# --- the checks ---------------------------------------------------------------------------------------------------

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


def _check_lora(path: Path) -> _Checked:
    """``path`` checked as a complete safetensors file of finite kohya LoRA weights, or a DeployError saying why not."""
    where = f"`checkpoint` {str(path)!r}"
    if not path.exists():
        raise DeployError(f"{where} does not exist; check the path (a run writes NAME-stepNNNNNNNN.safetensors into "
                          f"its output_dir)")  # fmt: skip
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
        warnings.warn(
            f"{where} has no sd-scripts metadata (ss_*); its step, base model and network are unknown, and the "
            f"sidecar will say null for them",
            SpykeLoraWarning,
            stacklevel=3,
        )
    return _Checked(path, header.size, _sha256(path), metadata, len(header.tensors))


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
        raise DeployError(f"{where} must be a readable .safetensors file, got an error reading its tensors ({e}); "
                          f"copy the file again") from e  # fmt: skip
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DeployError(f"{where} must hold finite weights, got NaN or infinite values in {len(bad)} tensor(s): "
                          f"{shown}; the training diverged by this step: deploy an earlier checkpoint")  # fmt: skip


def _valid_name(name: str) -> str | None:
    """The stem, or None when ``name`` cannot be a plain file name in models/loras."""
    if not isinstance(name, str):
        return None
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name.strip() or name != name.strip() or name.startswith(".") or any(c in name for c in "/\\\0:"):
        return None
    return name


def _resolve_name(name: str | None, checked: _Checked) -> str:
    """The stem in ComfyUI: ``name``, else the file's ``ss_output_name`` metadata, else the file's own stem."""
    if name is not None:
        stem = _valid_name(name)
        if stem is None:
            raise DeployError(f"`name` must be a plain file stem such as 'spyke_plasma_v1' (no '/', '\\', ':' or "
                              f"leading '.', not empty), got {name!r}; try --name spyke_plasma_v1")  # fmt: skip
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


def _check_comfyui(root: Path) -> Path:
    """``root`` when it is a ComfyUI folder; else a DeployError naming a nearby folder that is one, if any."""
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


def _resolve_config(
    config: TrainConfig | str | os.PathLike[str] | None, checked: _Checked
) -> tuple[dict[str, Any] | None, Path | None]:
    """The config the sidecar records, and its TOML: ``config``, else ``NAME.config.toml`` next to the checkpoint."""
    if isinstance(config, TrainConfig):
        return config.to_dict(), None
    if config is not None:
        path = Path(config).expanduser().absolute()
        if not path.is_file():
            raise DeployError(f"`config` {str(path)!r} does not exist; pass the run's NAME.config.toml, or leave it "
                              f"out")  # fmt: skip
        return TrainConfig.from_toml(path).to_dict(), path  # a ConfigError names what is wrong in it
    folder = checked.path.parent
    stems = [checked.metadata.get("ss_output_name"), checked.path.stem, _STEP_SUFFIX.sub("", checked.path.stem)]
    for stem in dict.fromkeys(s for s in stems if s and _valid_name(s)):
        path = folder / f"{stem}.config.toml"
        if path.is_file():
            try:
                return TrainConfig.from_toml(path).to_dict(), path
            except ConfigError as e:  # an older or edited config: record what the file says
                warnings.warn(f"{path} is not a valid config now ({e}); recorded as written", SpykeLoraWarning,
                              stacklevel=3)  # fmt: skip
                try:
                    return tomllib.loads(path.read_text(encoding="utf-8")), path
                except (tomllib.TOMLDecodeError, UnicodeDecodeError):
                    return None, path
    return None, None


def _different_message(final: Path, installed: str, checked: _Checked, step: int | None) -> str:
    old_step = None
    try:
        old = json.loads(final.with_name(final.name[: -len(".safetensors")] + SIDECAR_SUFFIX).read_text("utf-8"))
        if isinstance(old, dict) and old.get("sha256") == installed:
            old_step = old.get("step")
    except (OSError, ValueError):
        pass
    if old_step is None:
        old_step = _int(_read_metadata(final).get("ss_steps"))
    new = f"sha256 {checked.sha256[:8]}" + (f", step {step}" if step is not None else "")
    old_text = f"sha256 {installed[:8]}" + (f", step {old_step}" if old_step is not None else "")
    return (f"{final} already exists and is a different file ({old_text}) from {checked.path} ({new}); pass "
            f"overwrite=True (--overwrite) to replace it (the old file is kept in {final.parent / BACKUP_DIR}), or "
            f"choose another `name` (--name)")  # fmt: skip


def _read_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file, or {} when it cannot be read (its tensors are not checked)."""
    try:
        metadata = read_header(path, complete=False).metadata
    except (OSError, HeaderError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


# --- writing ------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_checked(source: Path, temp: Path, expected_sha256: str | None) -> None:
    """``source`` copied to ``temp`` (a name ComfyUI does not list, from :func:`atomic_path`); the copy's sha256 must
    be ``expected_sha256`` (the file must not change between the check and the copy)."""
    digest = hashlib.sha256()
    with temp.open("wb") as out, source.open("rb") as src:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise DeployError(
            f"{source} changed while it was being copied (sha256 {digest.hexdigest()[:8]}, checked "
            f"{expected_sha256[:8]}); wait until whatever writes it has finished, then deploy again"
        )
    os.chmod(temp, 0o644)  # an installed model reads like any other file, whatever the umask


def _copy_atomic(source: Path, final: Path, expected_sha256: str | None) -> None:
    with atomic_path(final) as temp:
        _copy_checked(source, temp, expected_sha256)


def _replace(checked: _Checked, final: Path, installed_sha: str, sidecar: Path) -> Path:
    """Install over a different file, never losing it: the new file is copied next to it first, the old one copied
    to the backup folder (complete and fsynced), then the new one renamed over it. ``final`` is never absent."""
    with atomic_path(final) as temp:
        _copy_checked(checked.path, temp, checked.sha256)
        backups = final.parent / BACKUP_DIR
        backups.mkdir(exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = final.name[: -len(".safetensors")]
        backup = backups / f"{stem}.{stamp}.{installed_sha[:8]}.safetensors.bak"
        if not (backup.is_file() and _sha256(backup) == installed_sha):
            _copy_atomic(final, backup, installed_sha)
        if sidecar.is_file():  # the old file's provenance goes with it
            _copy_atomic(sidecar, backups / f"{stem}.{stamp}.{installed_sha[:8]}{SIDECAR_SUFFIX}", None)
    return backup


def _write_sidecar(path: Path, record: dict[str, Any], *, keep_install_time: bool) -> None:
    """Write ``record`` atomically, unless the file already says it; ``keep_install_time``: the same file deployed
    again keeps its first ``installed_at`` and ``backup``."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if keep_install_time and isinstance(old, dict) and old.get("sha256") == record["sha256"]:
        record["installed_at"] = old.get("installed_at", record["installed_at"])
        record["backup"] = old.get("backup")
    if old == record:
        return
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.chmod(temp, 0o644)  # as the LoRA beside it


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _number(value: str | None) -> int | float | None:
    """A number from sd-scripts' string metadata; None when absent ("None") or not a number."""
    if value is None or value == "None":
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return None


def _text(value: str | None) -> str | None:
    """A string from sd-scripts' metadata; None when empty or "None"."""
    return None if value in (None, "", "None") else value


def _sidecar_record(
    name: str,
    checked: _Checked,
    step: int | None,
    config: dict[str, Any] | None,
    config_path: Path | None,
    backup: Path | None,
) -> dict[str, Any]:
    from . import __version__

    meta = checked.metadata
    finished = _number(meta.get("ss_training_finished_at"))
    return {
        "name": name,
        "installed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(checked.path),
        "sha256": checked.sha256,
        "size": checked.size,
        "step": step,
        "epoch": _int(meta.get("ss_epoch")),
        "output_name": _text(meta.get("ss_output_name")),
        "training_comment": _text(meta.get("ss_training_comment")),
        "training_finished_at": (
            _dt.datetime.fromtimestamp(finished, _dt.timezone.utc).isoformat(timespec="seconds")
            if finished is not None else None
        ),  # fmt: skip
        "base_model": {
            "name": _text(meta.get("ss_sd_model_name")),
            "hash": _text(meta.get("ss_new_sd_model_hash")) or _text(meta.get("ss_sd_model_hash")),
            "path": config.get("base_model") if config else None,
        },
        "network": {
            "module": _text(meta.get("ss_network_module")),
            "dim": _number(meta.get("ss_network_dim")),
            "alpha": _number(meta.get("ss_network_alpha")),
        },
        "weights_hash": _text(meta.get("sshs_model_hash")),  # sd-scripts' hash of the weights (A1111's "addnet" hash)
        "sd_scripts_commit": _text(meta.get("ss_sd_scripts_commit_hash")),
        "config": config,
        "config_path": str(config_path) if config_path else None,
        "spyke_lora_version": __version__,
        "backup": str(backup) if backup else None,
    }
