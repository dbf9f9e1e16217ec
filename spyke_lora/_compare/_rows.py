"""The review's rows: a :class:`Cell` per sample (a step x a prompt and CFG scale) and a :class:`StepSummary` per
checkpoint (a row of the contact sheet). Plain data: :func:`~spyke_lora.review` fills them in."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ._sample_checks import SampleWarning

__all__ = ["Cell", "StepSummary"]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One sample of the sheet: a step x (prompt, CFG scale). ``path`` is None when no image was made."""

    step: int
    prompt: str
    cfg_scale: float
    seed: int | None
    path: Path | None
    checkpoint: str | None  # the LoRA file's name; None for the base model (step 0), an unknown file, or a file that
    # no longer holds the weights sampled (see ``file_note``)
    warnings: tuple[SampleWarning, ...] = ()
    file_note: str | None = None  # why ``checkpoint`` is None though the manifest named a file (StepSummary's)

    @property
    def ok(self) -> bool:
        """True when the sample has no warnings."""
        return not self.warnings


@dataclasses.dataclass(frozen=True)
class StepSummary:
    """One row: a checkpoint. ``broken``: one of its samples is black, flat or NaN (do not use the file).
    ``checkpoint``: the file that holds the step's weights; None for the base model, an unknown file, or one that
    no longer holds them (``file_note`` says which). A run without samples has a row per file measured, with no
    images (``images`` and ``missing`` 0).

    With the run's held-out figures (``NAME.validation.jsonl``): ``held_out_loss``, the step's held-out validation
    loss (None: not measured); ``class_loss``, ``(folder label, loss)`` on every other folder measured (class
    images); ``class_drift``, ``(folder label, loss minus the base model's)`` for the folders the base model was
    measured on too (none on the base model's own row)."""

    step: int
    checkpoint: str | None
    images: int  # samples found on disk
    missing: int  # cells without an image
    warnings: int
    broken: bool
    score: float | None = None  # the scorer's, when one was given
    held_out_loss: float | None = None
    class_loss: tuple[tuple[str, float], ...] = ()
    class_drift: tuple[tuple[str, float], ...] = ()
    # why the samples' file is not named (``checkpoint`` None): "replaced: its file now holds step 920" (a resumed
    # run wrote its final file over the one sampled), "no file: NAME-step00000400.safetensors is not on disk"
    file_note: str | None = None
