"""The held-out set: ``validation_dir`` checked as a dataset folder and against the training images, and
``validation_split`` against sd-scripts' own split of ``train_dir``."""

from __future__ import annotations

import math
from pathlib import Path

from .._files import sha256
from ._context import CheckContext, Findings, list_images
from ._folders import folder_findings

__all__ = ["check_held_out", "check_split"]


def check_held_out(ctx: CheckContext, found: Findings) -> None:
    """``validation_dir`` passes the checks of a dataset folder; then none of its images is a training image."""
    if ctx.held_out is None:
        return
    own = folder_findings(ctx.held_out, ctx.cfg, ctx.extensions)
    found.add(own)
    if not own.problems:
        _check_twins(ctx, found)


def _check_twins(ctx: CheckContext, found: Findings) -> None:
    """A held-out image that is also a training image (the same bytes, under any name) is not held out: one problem
    per such image, naming both files."""
    held = sorted(list_images(ctx.held_out.folder, ctx.extensions, ctx.cfg.sd_scripts_dir))
    sizes = {image.stat().st_size for image in held}  # the same bytes have the same size: hash only those
    trained: dict[str, Path] = {}
    for folder in ctx.dataset.value:
        for image in sorted(list_images(folder.folder, ctx.extensions, ctx.cfg.sd_scripts_dir)):
            if image.stat().st_size in sizes:
                trained.setdefault(sha256(image), image)
    for image in held:
        twin = trained.get(sha256(image)) if trained else None
        if twin is not None:
            found.problem(
                f"held-out image {str(image)!r} is also a training image ({str(twin)!r}): a held-out loss is only "
                f"worth something on images the run never sees; remove it from one of the two folders"
            )


def check_split(ctx: CheckContext, found: Findings) -> None:
    """sd-scripts' split (``split_train_val``) trains on the first ceil(n * (1 - split)) images and validates on
    the last round(n * split): for some n and split both round up, and an image is in both; or none is held out."""
    cfg = ctx.cfg
    if not cfg.validation_split or cfg.train_dir is None:
        return
    n = len(list_images(cfg.train_dir, ctx.extensions, cfg.sd_scripts_dir))
    if not n:
        return
    split = cfg.validation_split
    trained, held = math.ceil(n * (1 - split)), round(n * split)
    wanted = max(1, held)
    better = f"{(wanted + 0.25) / n:.3g}"  # holds out exactly `wanted` images, with no overlap
    if held == 0:
        found.problem(
            f"`validation_split` {split} of the {n} images in `train_dir` holds out none; try {better} (1 image)"
        )
    elif trained + held > n:
        found.problem(
            f"`validation_split` {split} of the {n} images in `train_dir`: sd-scripts would train on {trained} and "
            f"validate on {held}, so {trained + held - n} image(s) would be in both; try {better} ({wanted} held out)"
        )
