"""The outputs: earlier LoRA files a run would replace, and the disk space its files need."""

from __future__ import annotations

import os

from .. import _engine
from .._config import TrainConfig
from .._doctor import free_disk, output_dir_problem
from ._context import CheckContext, Findings

__all__ = [
    "BYTES_PER_DIM_FP32",
    "STATE_BYTES_PER_DIM",
    "bytes_per_file",
    "check_disk",
    "check_existing_outputs",
    "check_output_dir",
]

# Measured: an SD1.5 LoRA of network_dim 32 saved as fp32 is 75.6 MB (792 tensors); size scales with dim.
BYTES_PER_DIM_FP32 = 75_600_000 / 32
_SAVE_BYTES = {"float": 4, "fp16": 2, "bf16": 2}
STATE_BYTES_PER_DIM = 3 * BYTES_PER_DIM_FP32  # estimate, checked by a test: weights + AdamW's exp_avg, exp_avg_sq


def check_output_dir(ctx: CheckContext, found: Findings) -> None:
    """``output_dir`` can be written (:func:`~spyke_lora._doctor.output_dir_problem`: not a file, writable where it
    is or would be created), and is no dataset folder: the run writes its records (a loss chart PNG among them) and
    prompt file there, and the next run on that folder would train them."""
    cfg = ctx.cfg
    problem = output_dir_problem(cfg.output_dir)
    if problem:
        found.problem(problem)
    out = os.path.realpath(cfg.output_dir)
    folders = [(f.source, f.folder) for f in ctx.dataset.value]
    if ctx.held_out is not None:
        folders.append((ctx.held_out.source, ctx.held_out.folder))
    for source, folder in folders:
        if os.path.realpath(folder) == out:
            found.problem(
                f"`output_dir` {str(cfg.output_dir)!r} is the {source} folder {str(folder)!r}: the run's records and "
                f"images (the loss chart, the samples' folder) would be written into the dataset, and trained by the "
                f"next run on it; choose an output_dir outside the dataset (e.g. {str(folder.parent / 'loras')!r})"
            )
            return


def check_existing_outputs(ctx: CheckContext, found: Findings) -> None:
    """Earlier LoRA files of this ``output_name`` are not replaced unless ``overwrite = true``; a resume may replace
    only what the stopped run saved at its last step."""
    cfg, state = ctx.cfg, ctx.resumed.value
    existing = [] if cfg.overwrite else _engine.existing_outputs(cfg, state.step if state else None)
    if not existing:
        return
    shown = ", ".join(p.name for p in existing[:5]) + (", ..." if len(existing) > 5 else "")
    if state is None:
        found.problem(
            f"{len(existing)} LoRA file(s) named `{cfg.output_name}` already exist in {cfg.output_dir} ({shown}); "
            f"choose another `output_name` or `output_dir`, or set `overwrite = true` to replace them"
        )
    else:
        found.problem(
            f"resuming after step {state.step} would replace {len(existing)} file(s) saved later ({shown}) in "
            f"{cfg.output_dir}; resume from the latest state (resume='latest'), or set `overwrite = true`"
        )


def bytes_per_file(cfg: TrainConfig) -> float:
    """The estimated size of one saved file.

    Args:
        cfg: The run's config (``network_dim``, ``save_precision``, ``save_state``).

    Returns:
        Bytes: the LoRA, and with ``save_state`` its training state (the fp32 weights and AdamW's two moments per
        weight, next to each file).
    """
    per_file = BYTES_PER_DIM_FP32 * cfg.network_dim * _SAVE_BYTES[cfg.save_precision] / 4
    if cfg.save_state:
        per_file += STATE_BYTES_PER_DIM * cfg.network_dim
    return per_file


def check_disk(ctx: CheckContext, found: Findings) -> None:
    """``output_dir`` has room for every file the run saves, plus one being written and slack."""
    cfg = ctx.cfg
    files, per_file = len(ctx.checkpoints) + 1, bytes_per_file(cfg)
    free = free_disk(cfg.output_dir)
    if free is not None and free < files * per_file + 2 * per_file:  # the files, one being written, and slack
        found.problem(
            f"`output_dir` {str(cfg.output_dir)!r} has {free / 1e6:.0f} MB free, and the run writes about "
            f"{files * per_file / 1e6:.0f} MB ({files} files of {per_file / 1e6:.0f} MB"
            f"{' with its training state' if cfg.save_state else ''}); free some space, choose another output_dir, "
            f"or save fewer checkpoints (save_every_n_steps)"
        )
