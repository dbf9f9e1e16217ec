"""Choosing a checkpoint: a contact sheet of every checkpoint's samples, checks on each sample, optional ranking.

A run's ``NAME.samples.jsonl`` lists every sample image (step, prompt, CFG scale, seed, path, checkpoint);
:func:`contact_sheet` draws them as one PNG, a row per step and a column per prompt and CFG scale, with a warning
mark on every sample that looks broken (black, one flat colour, NaN pixels) or copies a training image.
:func:`review` gives the same findings as data; :func:`rank_checkpoints` orders the steps with a :class:`Scorer`.
When the run measured a held-out validation loss (``NAME.validation.jsonl``), :func:`review` adds those figures
(and class drift) per step, :func:`rank_checkpoints` without a scorer ranks by them, and the review recommends the
step of the lowest held-out loss whose samples are not broken. The choice itself is made by looking at the sheet:
see docs/choosing.md. Where things live:

* ``_sample_checks``: the checks on one sample image (:func:`check_sample`);
* ``_scorers``: :class:`Scorer` and :class:`ColourHistogramScorer`;
* ``_figures``: reading ``NAME.validation.jsonl``, the figures' table and the recommendation (:class:`StepLoss`);
* ``_review``: reading the manifest and checking every sample (:func:`review`);
* ``_rank``: ordering the steps by score or held-out loss (:func:`rank_checkpoints`);
* ``_sheet``: drawing and writing the contact sheet (:func:`contact_sheet`).
"""

from ._figures import StepLoss
from ._rank import rank_checkpoints
from ._review import Cell, Review, StepSummary, review
from ._sample_checks import SampleWarning, check_sample
from ._scorers import ColourHistogramScorer, Scorer
from ._sheet import SheetLayout, contact_sheet, sheet_layout, write_sheet

__all__ = [
    "Cell",
    "ColourHistogramScorer",
    "Review",
    "SampleWarning",
    "Scorer",
    "SheetLayout",
    "StepLoss",
    "StepSummary",
    "check_sample",
    "contact_sheet",
    "rank_checkpoints",
    "review",
    "sheet_layout",
    "write_sheet",
]
