"""The dataset's folders: the dataset TOML and each folder it names, and the checks run on each folder
(:data:`FOLDER_RULES`, in order: the folder, its images, its captions)."""

from __future__ import annotations

import collections
import os

from .. import _engine
from .._config import TrainConfig, kohya_parent_problem, repeats_from_folder_name
from ._captions import check_caption_files, check_caption_lines, check_trigger_first
from ._context import CheckContext, Findings, FolderContext, FolderRule, names
from ._image_content import check_bit_depth, check_large_images, check_orientation, check_transparency
from ._images import (
    check_broken_images,
    check_case_extensions,
    check_exact_size,
    check_extensions,
    check_small_images,
    check_unreadable_images,
)
from ._rules import run_rule

__all__ = [
    "FOLDER_RULES",
    "check_dataset",
    "check_dataset_folders",
    "check_folder",
    "check_repeats",
    "check_repeats_name",
    "check_same_folders",
    "check_stems",
    "folder_findings",
]


def check_repeats_name(folder: FolderContext, found: Findings) -> None:
    """An explicit ``num_repeats`` is a legitimate override of the ``N_`` prefix (a quick 1-repeat test), so it
    wins, loudly."""
    cfg, path = folder.cfg, folder.folder.folder
    parsed = repeats_from_folder_name(path)
    if folder.where == "`train_dir`" and parsed and cfg.num_repeats is not None and parsed[0] != cfg.num_repeats:
        found.warning(
            f"`num_repeats` is {cfg.num_repeats} but the folder name {path.name!r} says {parsed[0]}: "
            f"{cfg.num_repeats} is used; remove num_repeats to use the folder's, or rename the folder to "
            f"'{cfg.num_repeats}_{parsed[1]}'"
        )


def check_stems(folder: FolderContext, found: Findings) -> None:
    """Two images with one stem (a.png, a.jpg) share one caption file."""
    stems = collections.defaultdict(list)
    for image in folder.images:
        stems[image.stem].append(image)
    for same in (paths for paths in stems.values() if len(paths) > 1):
        found.problem(f"{names(same)} share the stem {same[0].stem!r} and so one caption file; rename or remove one")


# The checks of one folder that exists and has images, in the order their messages are listed.
FOLDER_RULES: list[FolderRule] = [
    check_repeats_name,
    check_case_extensions,
    check_stems,
    check_unreadable_images,
    check_broken_images,
    check_extensions,
    check_orientation,
    check_bit_depth,
    check_exact_size,
    check_small_images,
    check_large_images,
    check_transparency,
    check_caption_files,
    check_caption_lines,
    check_trigger_first,
]


def folder_findings(folder: _engine.Folder, cfg: TrainConfig, image_extensions: tuple[str, ...]) -> Findings:
    """The problems and warnings of one dataset folder: that it exists and has images, then :data:`FOLDER_RULES`.

    Args:
        folder: The folder, as the engine names it (its path, repeats, caption extension, class token, source).
        cfg: The run's config.
        image_extensions: The extensions sd-scripts treats as images.

    Returns:
        What the checks found, in their order.
    """
    found = Findings()
    where, path = folder.source, folder.folder
    if not path.is_dir():
        found.problem(f"{where} folder {str(path)!r} does not exist; check the path")
        return found
    context = FolderContext(folder, cfg, image_extensions)
    if not context.images:
        run_rule(check_case_extensions, context, found)  # images sd-scripts skips for their extension's case
        field = where.strip("`") if where in ("`train_dir`", "`reg_dir`") else None
        parent = kohya_parent_problem(field, path) if field else None  # the folder above `10_name`: offer it
        if parent is not None and not found.problems:
            found.problem(parent)
        elif not found.problems:
            found.problem(f"{where} folder {str(path)!r} has no images ({', '.join(sorted(context.extensions))})")
        return found
    for rule in FOLDER_RULES:
        run_rule(rule, context, found)
    return found


def check_folder(
    folder: _engine.Folder, cfg: TrainConfig, image_extensions: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """Problems and warnings of one dataset folder (``validation_loss()`` checks its folder with it).

    Args:
        folder: The folder, as the engine names it.
        cfg: The run's config.
        image_extensions: The extensions sd-scripts treats as images.

    Returns:
        (problems, warnings): :func:`folder_findings` as two lists.
    """
    found = folder_findings(folder, cfg, image_extensions)
    return found.problems, found.warnings


def check_dataset(ctx: CheckContext, found: Findings) -> None:
    """The dataset's folders can be named: the dataset TOML exists and sd-scripts reads it, each subset has an
    ``image_dir`` (an absolute one, or one the working directory and the TOML's folder agree on)."""
    found.problems += ctx.dataset.problems


def check_dataset_folders(ctx: CheckContext, found: Findings) -> None:
    """Every folder of the dataset (:func:`folder_findings`), and augmentations that cannot use cached latents."""
    for folder in ctx.dataset.value:
        found.add(folder_findings(folder, ctx.cfg, ctx.extensions))
        if ctx.cfg.cache_latents and folder.fresh_latents:
            found.problem(
                f"{folder.source} sets {' and '.join(folder.fresh_latents)}, which change the image at every step, so "
                f"its latents cannot be cached; set `cache_latents = false` (slower: the VAE encodes every step)"
            )


def check_repeats(ctx: CheckContext, found: Findings) -> None:
    """sd-scripts ignores a subset of fewer than 1 repeat (train_util.py l.2118, "ignore subset ... num_repeats is
    less than 1"): none of its images is trained, and a dataset of only such subsets has 0 steps."""
    for folder in ctx.dataset.value:
        if folder.repeats >= 1:
            continue
        if folder.source == "`train_dir`":
            name = folder.folder.name
            token = name.split("_", 1)[1] if "_" in name else name
            found.problem(
                f"`train_dir` folder {str(folder.folder)!r} has {folder.repeats} repeats (the '{name.split('_')[0]}_' "
                f"of its name): sd-scripts ignores a folder of fewer than 1 repeat, so none of its images would be "
                f"trained; rename the folder to '10_{token}', or set num_repeats = 10"
            )
        else:
            found.problem(
                f"{folder.source} sets num_repeats = {folder.repeats} ({folder.repeats} repeats): sd-scripts ignores "
                f"a subset of fewer than 1 repeat, so none of the images in {str(folder.folder)!r} would be trained; "
                f"set num_repeats = 1 or more"
            )


def check_same_folders(ctx: CheckContext, found: Findings) -> None:
    """Two subsets of one dataset on one folder (by any path: a symlink, ``..``, a trailing slash). sd-scripts
    keeps the first of two subsets whose ``image_dir`` strings are equal and ignores the second
    (``DreamBoothSubset.__eq__``, train_util.py l.2124: ``reg_dir = train_dir`` trains no regularisation image); by
    two spellings of one folder it trains its images twice (as regularisation images too). One folder in two
    datasets is a multi-resolution run, and allowed."""
    seen: dict[tuple[int, str], _engine.Folder] = {}
    for folder in ctx.dataset.value:
        key = (folder.dataset, os.path.realpath(folder.image_dir))
        first = seen.setdefault(key, folder)
        if first is folder:
            continue
        if folder.image_dir == first.image_dir:
            what = (
                "no regularisation image would be trained"
                if folder.is_reg and not first.is_reg
                else f"its settings (num_repeats = {folder.repeats}) would never be used"
            )
            result = f"sd-scripts ignores a second subset of one folder, so {what}"
        else:
            twice = ", as regularisation images too" if folder.is_reg != first.is_reg else ""
            result = f"sd-scripts trains the folder's images once for each subset{twice}"
        reg_dir = folder.source == "`reg_dir`"
        fix = "set reg_dir to a folder of class images, or remove it" if reg_dir else "merge the two into one subset"
        found.problem(
            f"{folder.source} {str(folder.image_dir)!r} is the same folder as {first.source} "
            f"{str(first.image_dir)!r}: {result}; {fix}"
        )
