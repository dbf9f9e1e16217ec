"""Choosing a checkpoint: a contact sheet of every checkpoint's samples, checks on each sample, optional ranking.

A run's ``NAME.samples.jsonl`` lists every sample image (step, prompt, CFG scale, seed, path, checkpoint);
:func:`contact_sheet` draws them as one PNG, a row per step and a column per prompt and CFG scale, with a warning
mark on every sample that looks broken (black, one flat colour, NaN pixels) or copies a training image.
:func:`review` gives the same findings as data; :func:`rank_checkpoints` orders the steps with a :class:`Scorer`.
When the run measured a held-out validation loss (``NAME.validation.jsonl``), :func:`review` adds those figures
(and class drift) per step, :func:`rank_checkpoints` without a scorer ranks by them, and the review recommends the
step of the lowest held-out loss whose samples are not broken and whose figure a file on disk still holds (each
manifest line records its file's ``ss_steps`` and ``sshs_model_hash``; a line whose file was written over since, as
a resumed run's final file is, is left out). A run with held-out figures and no samples is reviewed and ranked by
them. The choice itself is made by looking at the sheet:
see docs/choosing.md. Where things live:

* ``_sample_checks``: the checks on one sample image (:func:`check_sample`) and the image helpers;
* ``_rows``: the review's data, a :class:`Cell` per sample and a :class:`StepSummary` per checkpoint;
* ``_scorers``: :class:`Scorer`, :class:`ColourHistogramScorer`, the steps scored and ordered by one;
* ``_figures``: reading ``NAME.validation.jsonl``, the figures' table and the recommendation (:class:`StepLoss`);
* ``_review``: reading the manifest and checking every sample (:func:`review`);
* ``_rank``: ordering the steps by score or held-out loss (:func:`rank_checkpoints`);
* ``_sheet``: drawing and writing the contact sheet (:func:`contact_sheet`).

Imports go one way, down this list: ``_rank`` and ``_sheet`` use ``_review``, which uses the modules above it.
"""

from ._figures import Figures, StepLoss, checkpoint_path, loss_order, read_figures, recommend, table
from ._rank import rank_checkpoints
from ._review import Review, review
from ._rows import Cell, StepSummary
from ._sample_checks import BROKEN, PathLike, References, SampleWarning, check_sample, open_image, to_array
from ._scorers import ColourHistogramScorer, Scorer, score_order, score_steps
from ._sheet import SheetLayout, check_sheet_folder, contact_sheet, figure_lines, sheet_layout, write_sheet

__all__ = [
    "check_sheet_folder",
    "BROKEN",
    "Cell",
    "ColourHistogramScorer",
    "Figures",
    "PathLike",
    "References",
    "Review",
    "SampleWarning",
    "Scorer",
    "SheetLayout",
    "StepLoss",
    "StepSummary",
    "check_sample",
    "checkpoint_path",
    "contact_sheet",
    "figure_lines",
    "loss_order",
    "open_image",
    "rank_checkpoints",
    "read_figures",
    "recommend",
    "review",
    "score_order",
    "score_steps",
    "sheet_layout",
    "table",
    "to_array",
    "write_sheet",
]
