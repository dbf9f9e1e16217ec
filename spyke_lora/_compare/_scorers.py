"""Scorers of a checkpoint's samples: the :class:`Scorer` protocol, :class:`ColourHistogramScorer`, and the steps
scored and ordered by one (:func:`score_steps`, :func:`score_order`), for :func:`~spyke_lora.review`'s ranking."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from .._errors import ConfigError
from ._sample_checks import PathLike, open_image

if TYPE_CHECKING:  # pragma: no cover
    from ._rows import Cell, StepSummary

__all__ = ["ColourHistogramScorer", "Scorer", "score_order", "score_steps"]


@runtime_checkable
class Scorer(Protocol):
    """Scores one checkpoint from its samples: ``scorer(samples, train_images)`` gets every sample image of one
    step and the training images, and returns one number, higher is better. ``name`` labels the ranking."""

    name: str

    def __call__(self, samples: Sequence[Path], train_images: Sequence[Path]) -> float: ...


class ColourHistogramScorer:
    """How close the samples' colours are to the training images' palette: the mean histogram intersection
    (0..1) between each sample's HSV histogram and the training images' mean HSV histogram.

    It needs no model and no download, and it is weak: it notices a checkpoint whose colours drift away from the
    character's (washed out, burnt, the wrong palette), not whether the character is right, the prompt is followed
    or the image is good. A sample that copies a training image scores high: read it with the warnings."""

    name = "colour histogram"

    def __init__(self, bins: tuple[int, int, int] = (12, 3, 3), size: int = 128) -> None:
        self.bins = bins
        self.size = size
        self._reference: tuple[tuple[Path, ...], np.ndarray] | None = None

    def histogram(self, path: PathLike) -> np.ndarray:
        """The normalised joint HSV histogram of an image (greys, whose hue means nothing, go to hue bin 0)."""
        image = open_image(Path(path)).convert("RGB")
        image.thumbnail((self.size, self.size))
        hsv = np.asarray(image.convert("HSV"), dtype=np.int64).reshape(-1, 3)
        h, s, v = (hsv[:, i] * n // 256 for i, n in enumerate(self.bins))
        h = np.where(hsv[:, 1] < 32, 0, h)
        counts = np.bincount((h * self.bins[1] + s) * self.bins[2] + v, minlength=int(np.prod(self.bins)))
        return counts / max(1, counts.sum())

    def _palette(self, train_images: Sequence[Path]) -> np.ndarray:
        """The training images' mean histogram, computed once per list of images."""
        key = tuple(Path(p) for p in train_images)
        if self._reference is None or self._reference[0] != key:
            hists = []
            for path in key:
                try:
                    hists.append(self.histogram(path))
                except OSError:
                    continue
            if not hists:
                raise ConfigError(
                    "the colour histogram scorer needs the training images (none could be read); "
                    "give them with train_images= (--train-images)"
                )
            self._reference = (key, np.mean(hists, axis=0))
        return self._reference[1]

    def __call__(self, samples: Sequence[Path], train_images: Sequence[Path]) -> float:
        palette = self._palette(train_images)
        scores = [float(np.minimum(self.histogram(p), palette).sum()) for p in samples]
        return float(np.mean(scores)) if scores else float("nan")


def score_steps(
    cells: Sequence[Cell], summaries: Sequence[StepSummary], scorer: Scorer, train: Sequence[Path]
) -> dict[int, float]:
    """The score of every step but 0 with a sample image on disk.

    Args:
        cells: the review's cells, every step's samples.
        summaries: the review's rows, one per step.
        scorer: called once per step with that step's sample images and ``train``.
        train: the training images.

    Returns:
        ``{step: score}``; the base model (step 0) and steps without an image on disk are left out.
    """
    scores: dict[int, float] = {}
    for summary in summaries:
        if summary.step == 0:
            continue  # the base model is the reference, not a candidate
        samples = [c.path for c in cells if c.step == summary.step and c.path is not None and c.path.is_file()]
        if samples:
            scores[summary.step] = float(scorer(samples, list(train)))
    return scores


def score_order(scores: dict[int, float], broken: set[int]) -> tuple[tuple[int, float], ...]:
    """The steps ranked by score.

    Args:
        scores: ``{step: score}``, higher is better (:func:`score_steps`).
        broken: the steps with a black, flat or NaN sample.

    Returns:
        ``(step, score)`` pairs, best score first; broken steps and non-finite scores last.
    """

    def key(item: tuple[int, float]) -> tuple[int, float, int]:
        step, score = item
        return (step in broken or not math.isfinite(score), -score if math.isfinite(score) else 0.0, step)

    return tuple(sorted(scores.items(), key=key))
