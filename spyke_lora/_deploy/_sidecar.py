"""The provenance sidecar ``NAME.spyke-lora.json`` written next to an installed LoRA: where the file came from
(its sd-scripts metadata, the run's config, the spyke-lora version), written atomically and only when it changes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from .._files import atomic_path
from .._version import __version__
from ._preconditions import CheckedLora

__all__ = ["SIDECAR_SUFFIX", "metadata_int", "sidecar_record", "write_sidecar"]

SIDECAR_SUFFIX = ".spyke-lora.json"


def write_sidecar(path: Path, record: dict[str, Any], *, keep_install_time: bool) -> None:
    """Write the sidecar ``record`` to ``path`` atomically, unless the file already says it.

    Args:
        path: ``COMFYUI/models/loras/NAME.spyke-lora.json``.
        record: the provenance (:func:`sidecar_record`); its ``installed_at`` and ``backup`` may be replaced.
        keep_install_time: the same file deployed again: keep the sidecar's first ``installed_at`` and ``backup``.

    Raises:
        OSError: the file cannot be written.
    """
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


def metadata_int(value: Any) -> int | None:
    """A whole number from sd-scripts' string metadata (``ss_steps``); None when absent or not one."""
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


def sidecar_record(
    name: str,
    checked: CheckedLora,
    step: int | None,
    config: dict[str, Any] | None,
    config_path: Path | None,
    backup: Path | None,
) -> dict[str, Any]:
    """The provenance record of an installed LoRA file.

    Args:
        name: its stem in ComfyUI.
        checked: the checked LoRA file.
        step: the step it was saved at (``ss_steps``), if known.
        config: the run's config, if known.
        config_path: the config's TOML file, if any.
        backup: where a replaced file went, if one was.

    Returns:
        The sidecar's JSON object: the file, its sd-scripts metadata, base model, network, config and the
        spyke-lora version.
    """
    meta = checked.metadata
    finished = _number(meta.get("ss_training_finished_at"))
    return {
        "name": name,
        "installed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(checked.path),
        "sha256": checked.sha256,
        "size": checked.size,
        "step": step,
        "epoch": metadata_int(meta.get("ss_epoch")),
        "output_name": _text(meta.get("ss_output_name")),
        "training_comment": _text(meta.get("ss_training_comment")),
        "training_finished_at": (
            _dt.datetime.fromtimestamp(finished, _dt.timezone.utc).isoformat(timespec="seconds")
            if finished is not None
            else None
        ),
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
