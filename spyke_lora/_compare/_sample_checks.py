"""Checks on one sample image: black, one flat colour, NaN pixels, or a copy of a training image.

:func:`check_sample` is what :func:`~spyke_lora.review` runs on every sample and returns its findings as
:class:`SampleWarning` objects. The image helpers here (reading an image, thumbnails) serve the scorers and the sheet
too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = ["BROKEN", "PathLike", "References", "SampleWarning", "check_sample", "open_image", "to_array"]

# --- thresholds of the sample checks (on pixel values scaled to 0..1) ---------------------------------------------
BLACK_MEAN = 4 / 255  # "black": mean below this ...
BLACK_HIGH = 16 / 255  # ... and 99% of the values below this (a dark scene with any highlight is not black)
UNIFORM_STD = 2 / 255  # "uniform": every channel's standard deviation below this (one flat colour)
THUMB = 32  # near-duplicate: both images reduced to THUMB x THUMB
DUPLICATE_CORRELATION = 0.95  # ... grey-level correlation of the thumbnails at least this
DUPLICATE_MEAN_DIFF = 0.08  # ... and mean absolute RGB difference of the thumbnails at most this

BROKEN = ("black", "uniform", "nan")  # the warnings' kinds that mean the weights are unusable

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class SampleWarning:
    """Something wrong with one sample. ``kind``: "black", "uniform", "nan", "near-duplicate", "missing" or
    "unreadable"; ``message``: the sentence the warning lines use; ``short``: the mark on the contact sheet;
    ``path``: the training image a near-duplicate copies (None otherwise)."""

    kind: str
    message: str
    short: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.message


class References:
    """Thumbnails of the training images (and their mirror images), made once per review, that a sample is matched
    against for the near-duplicate check.

    Args:
        paths: the training images; one that cannot be read, or is one flat colour, is left out.
    """

    def __init__(self, paths: Iterable[PathLike]) -> None:
        self.paths: list[Path] = []
        grey, rgb = [], []
        for path in paths:
            try:
                thumb = _thumbnail(to_array(open_image(Path(path))))
            except (OSError, ValueError):
                continue  # an unreadable training image is sd-scripts' problem to report, not the sheet's
            g = _normalised_grey(thumb)
            if g is None:
                continue  # a flat training image cannot be recognised in a sample
            self.paths.append(Path(path))
            grey.append(g)
            rgb.append(thumb)
        self.grey = np.stack(grey) if grey else np.zeros((0, THUMB, THUMB))
        self.rgb = np.stack(rgb) if rgb else np.zeros((0, THUMB, THUMB, 3))

    def __len__(self) -> int:
        """The training images kept."""
        return len(self.paths)

    def match(self, thumb: np.ndarray) -> tuple[Path, bool] | None:
        """The training image a sample nearly copies.

        Args:
            thumb: the sample's thumbnail (THUMB x THUMB RGB, 0..1).

        Returns:
            ``(training image, whether the sample is its mirror image)``; None when it copies none.
        """
        g = _normalised_grey(thumb)
        if g is None or not len(self):
            return None
        best = None
        for mirrored in (False, True):
            grey = self.grey[:, :, ::-1] if mirrored else self.grey
            rgb = self.rgb[:, :, ::-1] if mirrored else self.rgb
            correlation = np.einsum("nij,ij->n", grey, g)
            difference = np.abs(rgb - thumb).mean(axis=(1, 2, 3))
            ok = (correlation >= DUPLICATE_CORRELATION) & (difference <= DUPLICATE_MEAN_DIFF)
            for i in np.flatnonzero(ok):
                if best is None or correlation[i] > best[0]:
                    best = (float(correlation[i]), self.paths[i], mirrored)
        return None if best is None else (best[1], best[2])


def open_image(path: Path) -> PILImage.Image:
    """Open an image, fully loaded so its file is closed.

    Args:
        path: the image file.

    Returns:
        The PIL image.

    Raises:
        OSError: the file cannot be read as an image.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def to_array(image: Any) -> np.ndarray:
    """An image as an H x W x 3 float array: 0..1 for 8- and 16-bit images, the values themselves for float images.

    Args:
        image: a PIL image or an array (grey, RGB or RGBA; alpha is dropped).

    Returns:
        The array.

    Raises:
        ValueError: the image is empty.
    """
    if isinstance(image, np.ndarray):
        array = image.astype(np.float64)
        if image.dtype == np.uint8:
            array /= 255
        elif image.dtype == np.uint16:
            array /= 65535
    else:
        if image.mode == "F":
            array = np.asarray(image, dtype=np.float64)
        elif image.mode in ("I", "I;16", "I;16B", "I;16L"):
            array = np.asarray(image, dtype=np.float64) / 65535
        else:
            array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] > 3:
        array = array[:, :, :3]
    if array.size == 0:
        raise ValueError("empty image")
    return array


def _thumbnail(array: np.ndarray) -> np.ndarray:
    """A THUMB x THUMB RGB array (0..1) of the image, NaN as 0."""
    from PIL import Image

    clean = np.nan_to_num(np.clip(array, 0, 1), nan=0.0)
    image = Image.fromarray((clean * 255 + 0.5).astype(np.uint8), "RGB")
    return np.asarray(image.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float64) / 255


def _normalised_grey(thumb: np.ndarray) -> np.ndarray | None:
    """Grey levels with zero mean and unit norm, so a dot product is a correlation; None for a flat image."""
    grey = thumb @ np.array([0.299, 0.587, 0.114])
    grey = grey - grey.mean()
    norm = float(np.sqrt((grey**2).sum()))
    return None if norm < 1e-3 else grey / norm


def _short_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def check_sample(
    image: PathLike | PILImage.Image | np.ndarray, train_images: Sequence[PathLike] | References = ()
) -> list[SampleWarning]:
    """What looks wrong with one sample image (a path, a PIL image or an array): an empty list when nothing does.

    * ``nan``: the image holds NaN or infinite values (only a float image can);
    * ``black``: mean below 4/255 and 99% of the values below 16/255. sd-scripts turns NaN latents into black
      images, so black is the usual sign of NaN weights;
    * ``uniform``: one flat colour (every channel's standard deviation below 2/255), not black;
    * ``near-duplicate``: the sample, reduced to 32 x 32, is a copy of a training image or of its mirror image
      (grey-level correlation >= 0.95 and mean colour difference <= 0.08): the LoRA memorised it.
    """
    array = to_array(open_image(Path(image)) if isinstance(image, (str, os.PathLike)) else image)
    found = []
    finite = np.isfinite(array)
    if not finite.all():
        found.append(SampleWarning("nan", "NaN/Inf pixel values (NaN weights?)", "NaN"))
        array = np.where(finite, array, 0.0)
    if float(array.mean()) < BLACK_MEAN and float(np.percentile(array, 99)) < BLACK_HIGH:
        found.append(SampleWarning("black", "all black (NaN weights?)", "black"))
    elif float(array.reshape(-1, 3).std(axis=0).max()) < UNIFORM_STD:
        rgb = ", ".join(str(round(float(v) * 255)) for v in array.reshape(-1, 3).mean(axis=0))
        found.append(SampleWarning("uniform", f"one flat colour (rgb {rgb}): no picture", "uniform"))
    else:
        references = train_images if isinstance(train_images, References) else References(train_images)
        match = references.match(_thumbnail(array))
        if match is not None:
            path, mirrored = match
            what = f"{_short_name(path)}{' (mirrored)' if mirrored else ''}"
            found.append(
                SampleWarning(
                    "near-duplicate",
                    f"near-duplicate of training image {what} (memorised?)",
                    f"near-duplicate of {what}",
                    path,
                )
            )
    return found
