"""The dataset's captions: one per training image, not empty, the trigger first when ``keep_tokens`` keeps it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import _engine
from ._context import Findings, FolderContext, names

__all__ = ["Caption", "check_caption_files", "check_trigger_first", "count_captions", "read_captions"]


@dataclasses.dataclass(frozen=True)
class Caption:
    """The caption file of one image, and its text stripped (None: the file is missing)."""

    path: Path
    text: str | None


def _read_all(folder: FolderContext) -> list[Caption]:
    captions = []
    for image in folder.images:
        path = image.with_suffix(folder.folder.caption_extension)
        text = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else None
        captions.append(Caption(path, text))
    return captions


def read_captions(folder: FolderContext) -> list[Caption]:
    """The caption of every image of a folder, read once (the caption checks share them).

    Args:
        folder: The folder's context.

    Returns:
        One :class:`Caption` per image, in the images' order.
    """
    return folder.once(_read_all)


def check_caption_files(folder: FolderContext, found: Findings) -> None:
    """A missing or empty caption trains on the folder's class token: a problem for training images, a warning
    for regularisation images (which kohya means to train on their class token)."""
    captions = read_captions(folder)
    missing = [c.path for c in captions if c.text is None]
    empty = [c.path for c in captions if c.text == ""]
    fallback = f"sd-scripts would train on the folder's class token {folder.folder.class_tokens!r} instead"
    add = found.warning if folder.folder.is_reg else found.problem
    for paths, what in ((missing, "missing"), (empty, "empty")):
        if paths:
            add(f"{len(paths)} caption file(s) in {folder.where} are {what}: {names(paths)}; {fallback}")


def check_trigger_first(folder: FolderContext, found: Findings) -> None:
    """With ``keep_tokens >= 1`` the first tag stays in place while the rest is shuffled: it should be the
    trigger (the training folder's class token)."""
    trigger, keep = folder.folder.class_tokens, folder.cfg.keep_tokens
    if keep < 1 or folder.folder.is_reg or not trigger:
        return
    off = [c.path for c in read_captions(folder) if c.text and c.text.split(",")[0].strip() != trigger]
    if off:
        found.warning(
            f"{len(off)} caption(s) in {folder.where} do not start with the trigger {trigger!r} (keep_tokens = "
            f"{keep} keeps the first token in place while the rest is shuffled): {names(off)}"
        )


def count_captions(folder: _engine.Folder) -> int:
    """The captions a plan shows for a folder.

    Args:
        folder: The folder, as the engine names it.

    Returns:
        Its caption files (``caption_extension``) that are not empty (in bytes).
    """
    return sum(1 for p in folder.folder.iterdir() if p.suffix == folder.caption_extension and p.stat().st_size > 0)
