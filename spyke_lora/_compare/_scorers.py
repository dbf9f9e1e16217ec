"""Scorers of a checkpoint's samples: the :class:`Scorer` protocol and :class:`ColourHistogramScorer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .._errors import ConfigError
from ._sample_checks import PathLike, _open

__all__ = ["ColourHistogramScorer", "Scorer"]


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
        image = _open(Path(path)).convert("RGB")
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
                raise ConfigError("the colour histogram scorer needs the training images (none could be read); "
                                  "give them with train_images= (--train-images)")  # fmt: skip
            self._reference = (key, np.mean(hists, axis=0))
        return self._reference[1]

    def __call__(self, samples: Sequence[Path], train_images: Sequence[Path]) -> float:
        palette = self._palette(train_images)
        scores = [float(np.minimum(self.histogram(p), palette).sum()) for p in samples]
        return float(np.mean(scores)) if scores else float("nan")
