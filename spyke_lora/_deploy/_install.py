"""``deploy()``: check a trained LoRA file, then install it into ComfyUI's ``models/loras``.

It never leaves a half-written file where ComfyUI looks, and never loses the file it replaces.

What ComfyUI lists (``folder_paths.py``, ``get_filename_list("loras")``): every file under ``models/loras``, walked
recursively into every subfolder (hidden ones too; only ``.git`` is skipped), whose last extension, lower-cased, is
one of ``.ckpt .pt .pt2 .bin .pth .safetensors .pkl .sft``. So everything deploy writes next to a LoRA ends in
something else: the temporary copy in ``.partial``, the backup of a replaced file in ``.safetensors.bak`` (in
``models/loras/.spyke-lora-backup/``), the provenance sidecar in ``.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from .._config import TrainConfig
from .._errors import DeployError
from .._files import atomic_path, sha256
from ._preconditions import (
    CHUNK,
    CheckedLora,
    check_comfyui,
    check_lora,
    read_metadata,
    resolve_config,
    resolve_name,
)
from ._sidecar import SIDECAR_SUFFIX, metadata_int, sidecar_record, write_sidecar

# ComfyUI's folder_paths.supported_pt_extensions (the current set; older releases had a subset of it)
COMFYUI_MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})
BACKUP_DIR = ".spyke-lora-backup"


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


def deploy(
    checkpoint: str | os.PathLike[str],
    comfyui_dir: str | os.PathLike[str],
    name: str | None = None,
    *,
    overwrite: bool = False,
    config: TrainConfig | str | os.PathLike[str] | None = None,
) -> DeployResult:
    """Check a trained LoRA file and install it into ComfyUI, with a provenance sidecar.

    The file becomes ``COMFYUI/models/loras/NAME.safetensors``, copied atomically (ComfyUI never lists a half-written
    file), with ``NAME.spyke-lora.json`` beside it saying where it came from.

    Args:
        checkpoint: a kohya-format LoRA .safetensors, checked first: complete, LoRA keys only, finite values.
        comfyui_dir: the ComfyUI folder (the one holding ``main.py`` and ``models/``).
        name: the file's stem in ComfyUI; None: the file's ``ss_output_name`` metadata, else its own stem.
        overwrite: replace a different file of that name, moved to ``models/loras/.spyke-lora-backup/`` first;
            without it such a file is refused. The same bytes already installed: nothing is copied.
        config: the run's :class:`TrainConfig` or its TOML, recorded in the sidecar; None: ``NAME.config.toml`` next
            to the checkpoint, if there is one.

    Returns:
        What was done: ``status`` "installed", "replaced" or "unchanged", the installed path, its sha256 and step,
        the backup of a replaced file, the sidecar's path.

    Raises:
        DeployError: a check failed (nothing is written then), or the copy or the sidecar could not be written (the
            file installed before, if any, is untouched).
        ConfigError: the ``config`` file given is not a valid config.
    """
    source = Path(checkpoint).expanduser().absolute()
    checked = check_lora(source)
    name = resolve_name(name, checked)
    root = check_comfyui(Path(comfyui_dir).expanduser().absolute())
    config_data, config_path = resolve_config(config, checked)

    loras = root / "models" / "loras"
    final = loras / f"{name}.safetensors"
    sidecar = loras / f"{name}{SIDECAR_SUFFIX}"
    step = metadata_int(checked.metadata.get("ss_steps"))
    if final.is_dir() or sidecar.is_dir():
        raise DeployError(
            f"`{final if final.is_dir() else sidecar}` is a folder; move it away, or choose another `name` (--name)"
        )

    backup: Path | None = None
    try:
        loras.mkdir(parents=True, exist_ok=True)
        if final.exists():
            installed = sha256(final)
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
        record = sidecar_record(name, checked, step, config_data, config_path, backup)
        write_sidecar(sidecar, record, keep_install_time=status == "unchanged")
    except OSError as e:
        raise DeployError(
            f"{final} is {status}, but its provenance file {sidecar} could not be written: {e}; fix the "
            f"cause and deploy again (the same file: nothing is copied)"
        ) from e
    return DeployResult(final, status, checked.sha256, step, backup, sidecar)


def _different_message(final: Path, installed: str, checked: CheckedLora, step: int | None) -> str:
    old_step = None
    try:
        old = json.loads(final.with_name(final.name[: -len(".safetensors")] + SIDECAR_SUFFIX).read_text("utf-8"))
        if isinstance(old, dict) and old.get("sha256") == installed:
            old_step = old.get("step")
    except (OSError, ValueError):
        pass
    if old_step is None:
        old_step = metadata_int(read_metadata(final).get("ss_steps"))
    new = f"sha256 {checked.sha256[:8]}" + (f", step {step}" if step is not None else "")
    old_text = f"sha256 {installed[:8]}" + (f", step {old_step}" if old_step is not None else "")
    return (
        f"{final} already exists and is a different file ({old_text}) from {checked.path} ({new}); pass "
        f"overwrite=True (--overwrite) to replace it (the old file is kept in {final.parent / BACKUP_DIR}), or "
        f"choose another `name` (--name)"
    )


def _copy_checked(source: Path, temp: Path, expected_sha256: str | None) -> None:
    """``source`` copied to ``temp`` (a name ComfyUI does not list, from :func:`atomic_path`); the copy's sha256 must
    be ``expected_sha256`` (the file must not change between the check and the copy)."""
    digest = hashlib.sha256()
    with temp.open("wb") as out, source.open("rb") as src:
        for chunk in iter(lambda: src.read(CHUNK), b""):
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


def _replace(checked: CheckedLora, final: Path, installed_sha: str, sidecar: Path) -> Path:
    """Install over a different file, never losing it: the new file is copied next to it first, the old one copied
    to the backup folder (complete and fsynced), then the new one renamed over it. ``final`` is never absent."""
    with atomic_path(final) as temp:
        _copy_checked(checked.path, temp, checked.sha256)
        backups = final.parent / BACKUP_DIR
        backups.mkdir(exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = final.name[: -len(".safetensors")]
        backup = backups / f"{stem}.{stamp}.{installed_sha[:8]}.safetensors.bak"
        if not (backup.is_file() and sha256(backup) == installed_sha):
            _copy_atomic(final, backup, installed_sha)
        if sidecar.is_file():  # the old file's provenance goes with it
            _copy_atomic(sidecar, backups / f"{stem}.{stamp}.{installed_sha[:8]}{SIDECAR_SUFFIX}", None)
    return backup
