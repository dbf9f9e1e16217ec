"""What identifies a saved LoRA file's content, from its header alone: the manifests' lines record it, and a reader
keeps a line only while its file still holds that content.

A file name does not identify weights: after a stop at step 500 and a resume that ends at 920, ``NAME.safetensors``
holds step 920, and a line written for it at step 500 would name a file that no longer holds what was measured or
sampled. sd-scripts writes two things into every LoRA file's metadata that do (``train_network.py`` l.1296-1310
``save_model``, ``networks/lora.py`` l.1267-1276 ``save_weights``): ``ss_steps``, the step saved, and
``sshs_model_hash``, a SHA-256 of the tensors and the training metadata (``train_util.py`` l.3259
``precalculate_safetensors_hashes``; the metadata holds ``ss_training_finished_at``, so two saves of the same step
differ). Both are read from the header (:func:`~spyke_lora._header.read_header`): no tensor is read.

The rule (:func:`check_recorded`), for a line naming a file and its step:

1. the file is not on disk, or its header cannot be read: no file holds the line's content;
2. the line records ``sshs_model_hash`` and the file has one: they must be equal;
3. else the line's ``ss_steps`` (an old manifest line without identity fields: the line's own step) must equal the
   file's ``ss_steps``;
4. else (a file without sd-scripts' metadata, a line without identity): nothing says otherwise, it holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._header import HeaderError, read_header

__all__ = ["IDENTITY_KEYS", "FileCheck", "check_recorded", "checkpoint_identity"]

IDENTITY_KEYS = ("ss_steps", "sshs_model_hash")  # sd-scripts' metadata names, recorded on each manifest line


def _whole(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def checkpoint_identity(path: Path | None) -> dict[str, Any]:
    """What identifies ``path``'s content, to record on a manifest line.

    Args:
        path: a LoRA file sd-scripts saved; None: the base model alone (nothing to identify).

    Returns:
        ``{"ss_steps": int, "sshs_model_hash": str}``, each key only when the file's metadata has it; ``{}`` for
        None or a file whose header cannot be read.
    """
    return (_identity(path) or {}) if path is not None else {}


def _identity(path: Path) -> dict[str, Any] | None:
    """The file's identity; None when it is not a file or its header cannot be read."""
    try:
        metadata = read_header(path, complete=False).metadata
    except (OSError, HeaderError):
        return None
    found: dict[str, Any] = {}
    if not isinstance(metadata, dict):
        return found
    steps = _whole(metadata.get("ss_steps"))
    if steps is not None:
        found["ss_steps"] = steps
    digest = metadata.get("sshs_model_hash")
    if isinstance(digest, str) and digest:
        found["sshs_model_hash"] = digest
    return found


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """Whether a file still holds what a manifest line recorded. ``note``: why not, in words for a row's label
    (None when it does); ``steps``: the ``ss_steps`` the file holds now (None: unknown or no file)."""

    holds: bool
    note: str | None = None
    steps: int | None = None


def check_recorded(
    path: Path, step: int, recorded: Mapping[str, Any], cache: dict[Path, dict[str, Any] | None] | None = None
) -> FileCheck:
    """Whether ``path`` still holds the content a manifest line recorded (the module's rule).

    Args:
        path: the file the line names (resolved against the run folder).
        step: the line's step.
        recorded: the line (its ``ss_steps`` and ``sshs_model_hash``, when it has them).
        cache: file -> its identity (None: no readable file), shared by the lines of one read.

    Returns:
        The :class:`FileCheck`.
    """
    if cache is None or path not in cache:
        now = _identity(path)
        if cache is not None:
            cache[path] = now
    else:
        now = cache[path]
    if now is None:
        why = "cannot be read" if path.exists() else "is not on disk"
        return FileCheck(False, f"no file: {path.name} {why}")
    steps_now = now.get("ss_steps")
    digest = recorded.get("sshs_model_hash")
    if isinstance(digest, str) and digest and "sshs_model_hash" in now:
        same = now["sshs_model_hash"] == digest
    else:
        expected = _whole(recorded["ss_steps"]) if "ss_steps" in recorded else step
        same = steps_now is None or expected is None or steps_now == expected
    if same:
        return FileCheck(True, None, steps_now)
    held = f"now holds step {steps_now}" if steps_now is not None and steps_now != step else "holds other weights now"
    return FileCheck(False, f"replaced: its file {held}", steps_now)
