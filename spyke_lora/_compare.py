"""Choosing a checkpoint: a contact sheet of every checkpoint's samples, checks on each sample, optional ranking.

A run's ``NAME.samples.jsonl`` lists every sample image (step, prompt, CFG scale, seed, path, checkpoint);
:func:`contact_sheet` draws them as one PNG, a row per step and a column per prompt and CFG scale, with a warning
mark on every sample that looks broken (black, one flat colour, NaN pixels) or copies a training image.
:func:`review` gives the same findings as data; :func:`rank_checkpoints` orders the steps with a :class:`Scorer`.
The choice itself is made by looking at the sheet: see docs/choosing.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np

from ._config import tomllib
from ._errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from PIL import Image as PILImage

__all__ = [
    "Cell",
    "ColourHistogramScorer",
    "Review",
    "SampleWarning",
    "Scorer",
    "SheetLayout",
    "StepSummary",
    "check_sample",
    "contact_sheet",
    "rank_checkpoints",
    "review",
    "sheet_layout",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# --- thresholds of the sample checks (on pixel values scaled to 0..1) ---------------------------------------------
BLACK_MEAN = 4 / 255  # "black": mean below this ...
BLACK_HIGH = 16 / 255  # ... and 99% of the values below this (a dark scene with any highlight is not black)
UNIFORM_STD = 2 / 255  # "uniform": every channel's standard deviation below this (one flat colour)
THUMB = 32  # near-duplicate: both images reduced to THUMB x THUMB
DUPLICATE_CORRELATION = 0.95  # ... grey-level correlation of the thumbnails at least this
DUPLICATE_MEAN_DIFF = 0.08  # ... and mean absolute RGB difference of the thumbnails at most this

_BROKEN = ("black", "uniform", "nan")  # kinds that mean the weights are unusable

PathLike = Union[str, "os.PathLike[str]"]


# --- sample checks --------------------------------------------------------------------------------------------------


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


class _References:
    """Thumbnails of the training images (and their mirror images), made once per review."""

    def __init__(self, paths: Iterable[PathLike]) -> None:
        self.paths: list[Path] = []
        grey, rgb = [], []
        for path in paths:
            try:
                thumb = _thumbnail(_to_array(_open(Path(path))))
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
        return len(self.paths)

    def match(self, thumb: np.ndarray) -> tuple[Path, bool] | None:
        """The training image ``thumb`` nearly copies, and whether it is the mirror image; None if none."""
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


def _open(path: Path) -> PILImage.Image:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def _to_array(image: Any) -> np.ndarray:
    """An H x W x 3 float array; 0..1 for 8- and 16-bit images, the values themselves for float images."""
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
    from PIL import Image

    clean = np.nan_to_num(np.clip(array, 0, 1), nan=0.0)
    image = Image.fromarray((clean * 255 + 0.5).astype(np.uint8), "RGB")
    return np.asarray(image.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float64) / 255


def _normalised_grey(thumb: np.ndarray) -> np.ndarray | None:
    grey = thumb @ np.array([0.299, 0.587, 0.114])
    grey = grey - grey.mean()
    norm = float(np.sqrt((grey**2).sum()))
    return None if norm < 1e-3 else grey / norm


def _short_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def check_sample(
    image: PathLike | PILImage.Image | np.ndarray, train_images: Sequence[PathLike] | _References = ()
) -> list[SampleWarning]:
    """What looks wrong with one sample image (a path, a PIL image or an array): an empty list when nothing does.

    * ``nan``: the image holds NaN or infinite values (only a float image can);
    * ``black``: mean below 4/255 and 99% of the values below 16/255. sd-scripts turns NaN latents into black
      images, so black is the usual sign of NaN weights;
    * ``uniform``: one flat colour (every channel's standard deviation below 2/255), not black;
    * ``near-duplicate``: the sample, reduced to 32 x 32, is a copy of a training image or of its mirror image
      (grey-level correlation >= 0.95 and mean colour difference <= 0.08): the LoRA memorised it.
    """
    array = _to_array(_open(Path(image)) if isinstance(image, (str, os.PathLike)) else image)
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
        references = train_images if isinstance(train_images, _References) else _References(train_images)
        match = references.match(_thumbnail(array))
        if match is not None:
            path, mirrored = match
            what = f"{_short_name(path)}{' (mirrored)' if mirrored else ''}"
            found.append(SampleWarning("near-duplicate", f"near-duplicate of training image {what} (memorised?)",
                                       f"near-duplicate of {what}", path))  # fmt: skip
    return found


# --- scorers --------------------------------------------------------------------------------------------------------


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


# --- reading the manifest -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One sample of the sheet: a step x (prompt, CFG scale). ``path`` is None when no image was made."""

    step: int
    prompt: str
    cfg_scale: float
    seed: int | None
    path: Path | None
    checkpoint: str | None  # the LoRA file's name; None for the base model (step 0) or an unknown file
    warnings: tuple[SampleWarning, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.warnings


@dataclasses.dataclass(frozen=True)
class StepSummary:
    """One row: a checkpoint. ``broken``: one of its samples is black, flat or NaN (do not use the file)."""

    step: int
    checkpoint: str | None
    images: int  # samples found on disk
    missing: int  # cells without an image
    warnings: int
    broken: bool
    score: float | None = None  # the scorer's, when one was given


@dataclasses.dataclass(frozen=True)
class Review:
    """What :func:`review` found in one run's samples. ``warnings``: one line per problem, as the CLI prints them;
    ``ranking``: ``(step, score)`` best first when a scorer was given (broken steps last; the base model, step 0,
    is not ranked), else None."""

    name: str
    run_dir: Path
    manifest: Path
    columns: tuple[tuple[str, float], ...]  # (prompt, cfg_scale), in sheet order
    cells: tuple[Cell, ...]  # every step x column, rows in step order
    steps: tuple[StepSummary, ...]
    train_images: tuple[Path, ...]
    warnings: tuple[str, ...]
    ranking: tuple[tuple[int, float], ...] | None = None
    scorer: str | None = None

    def cell(self, step: int, prompt: str, cfg_scale: float) -> Cell:
        for c in self.cells:
            if c.step == step and c.prompt == prompt and c.cfg_scale == float(cfg_scale):
                return c
        raise KeyError((step, prompt, cfg_scale))

    def row(self, step: int) -> tuple[Cell, ...]:
        return tuple(c for c in self.cells if c.step == step)


def _manifest(run_dir: PathLike, name: str | None) -> tuple[Path, str]:
    path = Path(run_dir).expanduser()
    if path.is_file() and path.name.endswith(".samples.jsonl"):
        return path, path.name[: -len(".samples.jsonl")]
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a folder; give the output_dir of a run")
    if name is not None:
        manifest = path / f"{name}.samples.jsonl"
        if not manifest.is_file():
            others = sorted(p.name[: -len(".samples.jsonl")] for p in path.glob("*.samples.jsonl"))
            hint = f" (it has the samples of {', '.join(others)})" if others else ""
            raise ConfigError(f"{path} has no {name}.samples.jsonl{hint}; check the name, or make samples with "
                              "`sample_prompts` in training or `spyke-lora sample`")  # fmt: skip
        return manifest, name
    found = sorted(path.glob("*.samples.jsonl"))
    if not found:
        raise ConfigError(f"{path} has no NAME.samples.jsonl, so there are no samples to compare; train with "
                          "`sample_prompts` set, or sample the saved files with `spyke-lora sample`")  # fmt: skip
    if len(found) > 1:
        names = ", ".join(p.name[: -len(".samples.jsonl")] for p in found)
        raise ConfigError(f"{path} holds the samples of several runs ({names}); pick one with name= (--name)")
    return found[0], found[0].name[: -len(".samples.jsonl")]


def _read_manifest(manifest: Path) -> list[dict[str, Any]]:
    """The manifest's entries, the newest for each (step, prompt, CFG scale), in first-appearance order."""
    entries: dict[tuple[int, str, float], dict[str, Any]] = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            key = (int(item["step"]), str(item["prompt"]), float(item["cfg_scale"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        entries[key] = {**entries.get(key, {}), **item}  # keeps the first position, takes the newest values
    if not entries:
        raise ConfigError(f"{manifest} lists no samples yet; sample the run's files with `spyke-lora sample`")
    return [{**item, "_key": key} for key, item in entries.items()]


def _sample_path(text: Any, run_dir: Path) -> Path | None:
    if not text:
        return None
    path = Path(str(text)).expanduser()
    if not path.is_absolute():
        return run_dir / path
    if not path.exists() and (run_dir / "sample" / path.name).exists():  # the run folder was moved
        return run_dir / "sample" / path.name
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # fmt: skip


def _training_images(run_dir: Path, name: str, given: PathLike | Sequence[PathLike] | None) -> list[Path]:
    """``given`` (image files and folders), else the ``train_dir`` (or non-regularisation dataset folders) of the
    run's NAME.config.toml, else none."""
    if given is not None:
        items = [given] if isinstance(given, (str, os.PathLike)) else list(given)
        out: list[Path] = []
        for item in items:
            path = Path(item).expanduser()
            if path.is_dir():
                out += _images_in(path)
            elif path.is_file():
                out.append(path)
            else:
                raise ConfigError(f"training image {str(path)!r} does not exist; check the path")
        return out
    config = run_dir / f"{name}.config.toml"
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    folders = []
    if isinstance(data.get("train_dir"), str) and data["train_dir"].lower() != "none":
        folders.append(_join(config.parent, data["train_dir"]))
    elif isinstance(data.get("dataset_config"), str):
        dataset = _join(config.parent, data["dataset_config"])
        try:
            spec = tomllib.loads(dataset.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            spec = {}
        for ds in spec.get("datasets", []):
            for subset in ds.get("subsets", []):
                if isinstance(subset.get("image_dir"), str) and not subset.get("is_reg", False):
                    folders.append(_join(dataset.parent, subset["image_dir"]))
    return [p for folder in folders if folder.is_dir() for p in _images_in(folder)]


def _join(base: Path, text: str) -> Path:
    return Path(os.path.normpath(base / Path(text).expanduser()))


def _shown(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def _prompt_text(prompt: str, width: int = 40) -> str:
    return prompt if len(prompt) <= width else prompt[: width - 3].rstrip() + "..."


def _step_text(step: int) -> str:
    return "step 0 (base model)" if step == 0 else f"step {step}"


def review(
    run_dir: PathLike,
    name: str | None = None,
    *,
    train_images: PathLike | Sequence[PathLike] | None = None,
    scorer: Scorer | None = None,
) -> Review:
    """Check every sample of a run: reads ``RUN_DIR/NAME.samples.jsonl`` (``name`` picks the run when the folder
    holds several; ``run_dir`` may also be the manifest itself), runs :func:`check_sample` on each image, and,
    with a ``scorer``, ranks the steps (:func:`rank_checkpoints`).

    ``train_images``: image files or folders to look for near-duplicates in; None: the ``train_dir`` of the run's
    ``NAME.config.toml`` when it still exists; ``()``: no near-duplicate check."""
    manifest, name = _manifest(run_dir, name)
    folder = manifest.parent
    entries = _read_manifest(manifest)
    prompts: list[str] = []
    for item in entries:
        if item["_key"][1] not in prompts:
            prompts.append(item["_key"][1])
    columns = sorted({item["_key"][1:] for item in entries}, key=lambda pc: (prompts.index(pc[0]), pc[1]))
    by_key = {item["_key"]: item for item in entries}
    steps = sorted({item["_key"][0] for item in entries})
    train = _training_images(folder, name, train_images)
    references = _References(train)

    cells, lines = [], []
    for step in steps:
        for prompt, cfg in columns:
            item = by_key.get((step, prompt, cfg))
            where = f'{_step_text(step)}, CFG {cfg:g}, "{_prompt_text(prompt)}"'
            if item is None:
                found = (SampleWarning("missing", "no sample in the manifest", "missing"),)
                cells.append(Cell(step, prompt, cfg, None, None, None, found))
                lines.append(f"{where}: no sample in the manifest")
                continue
            path = _sample_path(item.get("path"), folder)
            checkpoint = Path(str(item["checkpoint"])).name if item.get("checkpoint") else None
            seed = item.get("seed") if isinstance(item.get("seed"), int) else None
            if path is None or not path.is_file():
                shown = _shown(path, folder) if path else "(no path)"
                found = (SampleWarning("missing", f"image missing: {shown}", "missing"),)
            else:
                try:
                    found = tuple(check_sample(path, references))
                except (OSError, ValueError) as e:
                    found = (SampleWarning("unreadable", f"image cannot be read ({e})", "unreadable"),)
            cells.append(Cell(step, prompt, cfg, seed, path, checkpoint, found))
            suffix = f" — {_shown(path, folder)}" if path is not None and path.is_file() else ""
            lines += [f"{where}: {w.message}{suffix}" for w in found]

    summaries = []
    for step in steps:
        row = [c for c in cells if c.step == step]
        images = [c for c in row if c.path is not None and not any(w.kind in ("missing", "unreadable")
                                                                   for w in c.warnings)]  # fmt: skip
        broken = [c for c in images if any(w.kind in _BROKEN for w in c.warnings)]
        checkpoint = next((c.checkpoint for c in row if c.checkpoint), None)
        summaries.append(StepSummary(step, checkpoint, len(images), len(row) - len(images),
                                     sum(len(c.warnings) for c in row), bool(broken)))  # fmt: skip
        if images and len(broken) == len(images):
            lines.append(f"{_step_text(step)}: every sample is black, flat or NaN: the weights are broken; do not "
                         "use this file")  # fmt: skip

    ranking = None
    if scorer is not None:
        scores = _scores(cells, summaries, scorer, train)
        ranking = _order(scores, {s.step for s in summaries if s.broken})
        summaries = [dataclasses.replace(s, score=scores.get(s.step)) for s in summaries]
    return Review(name, folder, manifest, tuple(columns), tuple(cells), tuple(summaries), tuple(train),
                  tuple(lines), ranking, getattr(scorer, "name", type(scorer).__name__) if scorer else None)  # fmt: skip


def _scores(cells: Sequence[Cell], summaries: Sequence[StepSummary], scorer: Scorer, train: Sequence[Path]):
    scores: dict[int, float] = {}
    for summary in summaries:
        if summary.step == 0:
            continue  # the base model is the reference, not a candidate
        samples = [c.path for c in cells if c.step == summary.step and c.path is not None and c.path.is_file()]
        if samples:
            scores[summary.step] = float(scorer(samples, list(train)))
    return scores


def _order(scores: dict[int, float], broken: set[int]) -> tuple[tuple[int, float], ...]:
    def key(item: tuple[int, float]) -> tuple[int, float, int]:
        step, score = item
        return (step in broken or not math.isfinite(score), -score if math.isfinite(score) else 0.0, step)

    return tuple(sorted(scores.items(), key=key))


def rank_checkpoints(
    run_dir: PathLike,
    scorer: Scorer,
    name: str | None = None,
    train_images: PathLike | Sequence[PathLike] | None = None,
) -> list[tuple[int, float]]:
    """``(step, score)`` for every checkpoint with samples, best first: ``scorer`` is called once per step with all
    that step's sample images and the training images (see :func:`review` for ``train_images``). Steps with a
    black, flat or NaN sample come last whatever their score; the base model (step 0) is not ranked. A ranking
    flags broken checkpoints and drift; it does not choose the checkpoint: see docs/choosing.md."""
    return list(review(run_dir, name, train_images=train_images, scorer=scorer).ranking or ())


# --- the sheet ------------------------------------------------------------------------------------------------------

BACKGROUND = (255, 255, 255)
LETTERBOX = (40, 40, 40)
MISSING = (160, 160, 160)
TEXT = (20, 20, 20)
SMALL_TEXT = (90, 90, 90)
BROKEN_COLOUR = (214, 39, 40)  # black, uniform, NaN, unreadable
DUPLICATE_COLOUR = (255, 127, 14)  # near-duplicate
PROMPT_LINES = 4  # header lines for the prompt (then one for the CFG scale)


@dataclasses.dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a sheet of ``rows`` steps x ``cols`` (prompt, CFG) columns of ``cell`` px.

    ``width = label_width + cols * (cell + gap) + gap``; ``height = header_height + rows * (cell + gap) + gap``."""

    rows: int
    cols: int
    cell: int
    gap: int
    label_width: int
    header_height: int
    font_size: int
    small_font_size: int
    line_height: int

    @property
    def width(self) -> int:
        return self.label_width + self.cols * (self.cell + self.gap) + self.gap

    @property
    def height(self) -> int:
        return self.header_height + self.rows * (self.cell + self.gap) + self.gap

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, right and bottom exclusive."""
        x = self.label_width + self.gap + col * (self.cell + self.gap)
        y = self.header_height + self.gap + row * (self.cell + self.gap)
        return x, y, x + self.cell, y + self.cell

    def label_box(self, row: int) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.cell_box(row, 0)
        return 0, y0, self.label_width, y1

    def header_box(self, col: int) -> tuple[int, int, int, int]:
        x0, _, x1, _ = self.cell_box(0, col)
        return x0, 0, x1, self.header_height


def sheet_layout(rows: int, cols: int, cell: int = 256) -> SheetLayout:
    """The layout of a sheet; the font is about 15 px at ``cell`` 256 and scales with it (11 px at least)."""
    if cell < 64:
        raise ConfigError(f"the cell size must be at least 64 px, got {cell}")
    font = max(11, round(cell * 15 / 256))
    small = max(9, round(font * 0.75))
    line = round(font * 1.3)
    gap = max(4, cell // 32)
    return SheetLayout(rows=rows, cols=cols, cell=cell, gap=gap, label_width=11 * font,
                       header_height=(PROMPT_LINES + 1) * line + 2 * gap, font_size=font, small_font_size=small,
                       line_height=line)  # fmt: skip


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # an old Pillow, or one without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px (words, else characters), at most ``max_lines`` (the last
    ending in "..." when cut)."""
    fits = lambda s: draw.textlength(s, font=font) <= width  # noqa: E731
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and fits(candidate):
            lines[-1] = candidate
            continue
        while not fits(word) and len(word) > 1:  # too long for a line of its own: break it
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _draw_lines(draw, xy: tuple[int, int], lines: Sequence[str], font, fill, line_height: int, centre: int = 0):
    x, y = xy
    for line in lines:
        left = x + (centre - draw.textlength(line, font=font)) / 2 if centre else x
        draw.text((left, y), line, font=font, fill=fill)
        y += line_height
    return y


def _paste(sheet, path: Path, box: tuple[int, int, int, int]) -> bool:
    from PIL import Image

    try:
        image = _open(path)
        if image.mode not in ("RGB", "L"):
            array = np.nan_to_num(np.clip(_to_array(image), 0, 1))
            image = Image.fromarray((array * 255 + 0.5).astype(np.uint8), "RGB")
        image = image.convert("RGB")
    except (OSError, ValueError):
        return False
    size = box[2] - box[0]
    if max(image.size) > size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    elif max(image.size) < size:  # small samples are enlarged to the cell, keeping the aspect
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)  # fmt: skip
    sheet.paste(LETTERBOX, box)
    sheet.paste(image, (box[0] + (size - image.width) // 2, box[1] + (size - image.height) // 2))
    return True


def _draw_sheet(rv: Review, out: Path, cell: int) -> Path:
    from PIL import Image, ImageDraw

    steps = [s.step for s in rv.steps]
    layout = sheet_layout(len(steps), len(rv.columns), cell)
    font, small = _font(layout.font_size), _font(layout.small_font_size)
    line, gap = layout.line_height, layout.gap
    small_line = round(layout.small_font_size * 1.3)
    sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    # top-left corner: the run
    corner = _wrap(draw, rv.name, font, layout.label_width - 2 * gap, 2)
    y = _draw_lines(draw, (gap, gap), corner, font, TEXT, line)
    notes = [f"{len(rv.warnings)} warning{'s' if len(rv.warnings) != 1 else ''}"]
    if rv.ranking:
        notes.append(f"ranked by {rv.scorer}")
    _draw_lines(draw, (gap, y), notes, small, SMALL_TEXT, small_line)

    # column headers: each prompt over its columns, then the CFG scale of each
    col = 0
    while col < len(rv.columns):
        prompt = rv.columns[col][0]
        span = 1
        while col + span < len(rv.columns) and rv.columns[col + span][0] == prompt:
            span += 1
        x0 = layout.header_box(col)[0]
        x1 = layout.header_box(col + span - 1)[2]
        lines = _wrap(draw, prompt, font, x1 - x0 - 4, PROMPT_LINES)
        _draw_lines(draw, (x0 + 2, gap + (PROMPT_LINES - len(lines)) * line), lines, font, TEXT, line)
        if span > 1:
            draw.line([x0, layout.header_height - line - 3, x1 - 1, layout.header_height - line - 3], fill=SMALL_TEXT)
        for c in range(col, col + span):
            hx0, _, hx1, _ = layout.header_box(c)
            _draw_lines(draw, (hx0, layout.header_height - line - 1), [f"CFG {rv.columns[c][1]:g}"], font, TEXT,
                        line, centre=hx1 - hx0)  # fmt: skip
        col += span

    # rows: the step, its file, its score; then the cells
    rank = {step: i for i, (step, _) in enumerate(rv.ranking or (), 1)}
    by_key = {(c.step, c.prompt, c.cfg_scale): c for c in rv.cells}
    for r, summary in enumerate(rv.steps):
        x0, y0, x1, _ = layout.label_box(r)
        title = "base" if summary.step == 0 else f"step {summary.step}"
        y = _draw_lines(draw, (x0 + gap, y0 + 2), [title], font, TEXT, line)
        name = "base model" if summary.step == 0 else (summary.checkpoint or "")
        y = _draw_lines(draw, (x0 + gap, y), _wrap(draw, name, small, x1 - x0 - 2 * gap, 4), small, SMALL_TEXT,
                        small_line)  # fmt: skip
        if summary.score is not None:
            text = f"score {summary.score:.3f}" + (f" (#{rank[summary.step]})" if summary.step in rank else "")
            y = _draw_lines(draw, (x0 + gap, y + 4), [text], small, TEXT, small_line)
        if summary.broken:
            _draw_lines(draw, (x0 + gap, y + 4), ["broken samples"], small, BROKEN_COLOUR, small_line)
        for c, (prompt, cfg) in enumerate(rv.columns):
            _draw_cell(draw, sheet, layout, by_key[(summary.step, prompt, cfg)], layout.cell_box(r, c), font, small)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _draw_cell(draw, sheet, layout: SheetLayout, cell: Cell, box, font, small) -> None:
    pasted = cell.path is not None and not any(w.kind == "missing" for w in cell.warnings)
    pasted = pasted and _paste(sheet, cell.path, box)
    x0, y0, x1, y1 = box
    if not pasted:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=MISSING)
        word = "unreadable" if any(w.kind == "unreadable" for w in cell.warnings) else "missing"
        _draw_lines(draw, (x0, (y0 + y1) // 2 - layout.line_height // 2), [word], font, TEXT, layout.line_height,
                    centre=x1 - x0)  # fmt: skip
        if word == "missing":
            return
    marks = [w for w in cell.warnings if w.kind not in ("missing",)]
    if not marks:
        return
    colour = BROKEN_COLOUR if any(w.kind != "near-duplicate" for w in marks) else DUPLICATE_COLOUR
    border = max(3, layout.cell // 48)
    for i in range(border):
        draw.rectangle([x0 + i, y0 + i, x1 - 1 - i, y1 - 1 - i], outline=colour)
    lines = [text for w in marks for text in _wrap(draw, w.short, font, x1 - x0 - 2 * border - 8, 2)]
    top = y1 - border - len(lines) * layout.line_height - 4
    draw.rectangle([x0 + border, top, x1 - 1 - border, y1 - 1 - border], fill=colour)
    _draw_lines(draw, (x0 + border + 4, top + 2), lines, font, (255, 255, 255), layout.line_height)


def contact_sheet(
    run_dir: PathLike,
    name: str | None = None,
    *,
    out: PathLike | None = None,
    cell: int = 256,
    train_images: PathLike | Sequence[PathLike] | None = None,
    scorer: Scorer | None = None,
) -> Path:
    """Draw a run's samples as one PNG and return its path (default ``RUN_DIR/NAME.contact-sheet.png``, written
    atomically): a row per step ("base" for step 0) with its LoRA file's name, a column per prompt and CFG scale,
    each sample fitted into a ``cell`` px square. Samples with a warning get a coloured border and the warning
    (red: black, flat, NaN; orange: near-duplicate of a training image); cells without an image are grey,
    "missing". With a ``scorer``, each row also shows its score and rank. :func:`review` gives the same findings
    as data (``review(...).warnings`` are the lines ``spyke-lora compare`` prints)."""
    sheet_layout(1, 1, cell)  # refuses a bad cell size before any work
    rv = review(run_dir, name, train_images=train_images, scorer=scorer)
    return _write_sheet(rv, out, cell)


def _write_sheet(rv: Review, out: PathLike | None, cell: int) -> Path:
    path = Path(out).expanduser() if out is not None else rv.run_dir / f"{rv.name}.contact-sheet.png"
    if path.is_dir():
        path = path / f"{rv.name}.contact-sheet.png"
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write the contact sheet to {str(path)!r}: its folder does not exist")
    return _draw_sheet(rv, path.absolute(), cell)


# --- the command ----------------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``spyke-lora compare`` to the command's subparsers."""
    p = sub.add_parser(
        "compare", help="draw a run's samples as a contact sheet (a row per checkpoint) and warn about broken ones"
    )
    p.add_argument("run_dir", type=Path, help="the run's output_dir (or its NAME.samples.jsonl)")
    p.add_argument("--name", help="the run's output_name, when the folder holds several runs")
    p.add_argument("--out", type=Path, help="where to write the PNG (default: RUN_DIR/NAME.contact-sheet.png)")
    p.add_argument("--cell", type=int, default=256, metavar="PX", help="size of one sample on the sheet (default 256)")
    p.add_argument("--train-images", type=Path, metavar="DIR",
                   help="training images to find copies of (default: the run's train_dir)")  # fmt: skip
    p.add_argument("--rank", action="store_true",
                   help="also rank the checkpoints by colour palette (a weak signal; see docs/choosing.md)")  # fmt: skip
    p.set_defaults(run=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Write the sheet, print its path, every warning and the ranking. Exit status 0 even with warnings: they
    are for a person to look at (errors, such as no samples, raise and exit 2)."""
    sheet_layout(1, 1, args.cell)
    scorer = ColourHistogramScorer() if getattr(args, "rank", False) else None
    rv = review(args.run_dir, args.name, train_images=args.train_images, scorer=scorer)
    path = _write_sheet(rv, args.out, args.cell)
    print(f"contact sheet: {path}")
    images = sum(s.images for s in rv.steps)
    print(f"{len(rv.steps)} steps x {len(rv.columns)} prompt/CFG columns, {images} images, "
          f"{len(rv.train_images)} training images checked for copies")  # fmt: skip
    for line in rv.warnings:
        print(f"warning: {line}")
    if rv.ranking is not None:
        print(f"ranking by {rv.scorer} (best first; broken steps last):")
        broken = {s.step for s in rv.steps if s.broken}
        for step, score in rv.ranking:
            print(f"  step {step}: {score:.3f}{'  (broken samples)' if step in broken else ''}")
    return 0
