"""Ranking the checkpoints: with a scorer, a score per step, best first; without one, by the run's held-out loss,
lowest first; broken steps last either way (:func:`rank_checkpoints`).

A ranking flags broken checkpoints and drift; it does not choose the checkpoint: see docs/choosing.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ConfigError
from ._sample_checks import PathLike

if TYPE_CHECKING:  # pragma: no cover
    from ._review import Cell, StepSummary
    from ._scorers import Scorer

__all__ = ["rank_checkpoints"]


def _scores(cells: Sequence[Cell], summaries: Sequence[StepSummary], scorer: Scorer, train: Sequence[Path]):
    """``{step: score}`` for every step but 0 with a sample image on disk."""
    scores: dict[int, float] = {}
    for summary in summaries:
        if summary.step == 0:
            continue  # the base model is the reference, not a candidate
        samples = [c.path for c in cells if c.step == summary.step and c.path is not None and c.path.is_file()]
        if samples:
            scores[summary.step] = float(scorer(samples, list(train)))
    return scores


def _order(scores: dict[int, float], broken: set[int]) -> tuple[tuple[int, float], ...]:
    """Best score first; broken steps and non-finite scores last."""
    def key(item: tuple[int, float]) -> tuple[int, float, int]:
        step, score = item
        return (step in broken or not math.isfinite(score), -score if math.isfinite(score) else 0.0, step)

    return tuple(sorted(scores.items(), key=key))


def rank_checkpoints(
    run_dir: PathLike,
    scorer: Scorer | None = None,
    name: str | None = None,
    train_images: PathLike | Sequence[PathLike] | None = None,
) -> list[tuple[int, float]]:
    """``(step, score)`` for every checkpoint with samples, best first: ``scorer`` is called once per step with all
    that step's sample images and the training images (see :func:`review` for ``train_images``). Steps with a
    black, flat or NaN sample come last whatever their score; the base model (step 0) is not ranked. A ranking
    flags broken checkpoints and drift; it does not choose the checkpoint: see docs/choosing.md.

    Without a ``scorer``: ``(step, held-out loss)`` from the run's ``NAME.validation.jsonl``, lowest loss first
    (every step measured, with samples or not; broken steps and non-finite losses last; step 0 not ranked); a
    ConfigError when the run has no held-out figures."""
    from ._review import review  # here, not at the top: review() ranks with _scores and _order above

    rv = review(run_dir, name, train_images=train_images, scorer=scorer)
    if scorer is not None:
        return list(rv.ranking or ())
    if rv.loss_ranking is None:
        raise ConfigError(f"{rv.run_dir} has no held-out figures to rank by ({rv.name}.validation.jsonl: set "
                          "`validation_dir` in training, or measure the saved files with validation_loss(files, "
                          "cfg)); or give a scorer, e.g. rank_checkpoints(run_dir, ColourHistogramScorer())")  # fmt: skip
    return list(rv.loss_ranking)
