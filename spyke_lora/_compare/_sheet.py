"""The contact sheet (:func:`contact_sheet`): every checkpoint's samples drawn as one PNG.

A row per step and a column per prompt and CFG scale, with a warning mark on every sample that looks broken or
copies a training image.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .._errors import ConfigError
from .._files import atomic_path
from ._review import Review, review
from ._rows import Cell, StepSummary
from ._sample_checks import PathLike, open_image, to_array

if TYPE_CHECKING:  # pragma: no cover
    from ._scorers import Scorer

__all__ = [
    "LikenessFigures",
    "SheetLayout",
    "check_sheet_folder",
    "contact_sheet",
    "figure_lines",
    "sheet_layout",
    "write_sheet",
]

BACKGROUND = (255, 255, 255)
LETTERBOX = (40, 40, 40)
MISSING = (160, 160, 160)
TEXT = (20, 20, 20)
SMALL_TEXT = (90, 90, 90)
BROKEN_COLOUR = (214, 39, 40)  # black, uniform, NaN, unreadable
DUPLICATE_COLOUR = (255, 127, 14)  # near-duplicate
RECOMMENDED_COLOUR = (44, 140, 44)  # the step of the lowest held-out loss with samples not broken
PROMPT_LINES = 4  # header lines for the prompt (then one for the CFG scale)


class LikenessRowFigures(Protocol):
    """One row's likeness figures, as the sheet reads them (a :class:`~spyke_lora.LikenessRow` is one)."""

    @property
    def step(self) -> int | None: ...
    @property
    def samples(self) -> int: ...
    @property
    def dino(self) -> float | None: ...
    @property
    def clip_i(self) -> float | None: ...
    @property
    def clip_t(self) -> float | None: ...
    @property
    def copies(self) -> Sequence[object]: ...


class LikenessFigures(Protocol):
    """What the sheet draws of a run's likeness: a :class:`~spyke_lora.Likeness` is one. Read as plain data, so
    ``_compare`` never imports ``_likeness`` (which imports it)."""

    @property
    def rows(self) -> Sequence[LikenessRowFigures]: ...
    @property
    def base(self) -> LikenessRowFigures | None: ...


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
        """The sheet's width in px."""
        return self.label_width + self.cols * (self.cell + self.gap) + self.gap

    @property
    def height(self) -> int:
        """The sheet's height in px."""
        return self.header_height + self.rows * (self.cell + self.gap) + self.gap

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, right and bottom exclusive."""
        x = self.label_width + self.gap + col * (self.cell + self.gap)
        y = self.header_height + self.gap + row * (self.cell + self.gap)
        return x, y, x + self.cell, y + self.cell

    def label_box(self, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a row's label."""
        _, y0, _, y1 = self.cell_box(row, 0)
        return 0, y0, self.label_width, y1

    def header_box(self, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a column's header."""
        x0, _, x1, _ = self.cell_box(0, col)
        return x0, 0, x1, self.header_height


def sheet_layout(rows: int, cols: int, cell: int = 256) -> SheetLayout:
    """Where everything goes on a sheet; the font is about 15 px at ``cell`` 256 and scales with it (11 px at least).

    Args:
        rows: the steps.
        cols: the (prompt, CFG scale) columns.
        cell: a sample's square, in px.

    Returns:
        The :class:`SheetLayout`.

    Raises:
        ConfigError: ``cell`` is below 64.
    """
    if cell < 64:
        raise ConfigError(f"the cell size must be at least 64 px, got {cell}; try 256 (--cell 256)")
    font = max(11, round(cell * 15 / 256))
    small = max(9, round(font * 0.75))
    line = round(font * 1.3)
    gap = max(4, cell // 32)
    return SheetLayout(
        rows=rows,
        cols=cols,
        cell=cell,
        gap=gap,
        label_width=11 * font,
        header_height=(PROMPT_LINES + 1) * line + 2 * gap,
        font_size=font,
        small_font_size=small,
        line_height=line,
    )


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
    """Draw ``lines`` down from ``xy``, each centred in ``centre`` px when given; returns the y below them."""
    x, y = xy
    for line in lines:
        left = x + (centre - draw.textlength(line, font=font)) / 2 if centre else x
        draw.text((left, y), line, font=font, fill=fill)
        y += line_height
    return y


def _paste(sheet, path: Path, box: tuple[int, int, int, int]) -> bool:
    """Fit the image at ``path`` into the square ``box``, letterboxed; False when it cannot be read."""
    from PIL import Image

    try:
        image = open_image(path)
        if image.mode not in ("RGB", "L"):
            array = np.nan_to_num(np.clip(to_array(image), 0, 1))
            image = Image.fromarray((array * 255 + 0.5).astype(np.uint8), "RGB")
        image = image.convert("RGB")
    except (OSError, ValueError):
        return False
    size = box[2] - box[0]
    if max(image.size) > size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    elif max(image.size) < size:  # small samples are enlarged to the cell, keeping the aspect
        scale = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
        )
    sheet.paste(LETTERBOX, box)
    sheet.paste(image, (box[0] + (size - image.width) // 2, box[1] + (size - image.height) // 2))
    return True


def _draw_sheet(rv: Review, out: Path, cell: int, likeness: LikenessFigures | None = None) -> Path:
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
            _draw_lines(
                draw,
                (hx0, layout.header_height - line - 1),
                [f"CFG {rv.columns[c][1]:g}"],
                font,
                TEXT,
                line,
                centre=hx1 - hx0,
            )
        col += span

    # rows: the step, its file, its score, its held-out figures; then the cells
    rank = {step: i for i, (step, _) in enumerate(rv.ranking or (), 1)}
    by_key = {(c.step, c.prompt, c.cfg_scale): c for c in rv.cells}
    for r, summary in enumerate(rv.steps):
        x0, y0, x1, _ = layout.label_box(r)
        title = "base" if summary.step == 0 else f"step {summary.step}"
        y = _draw_lines(draw, (x0 + gap, y0 + 2), [title], font, TEXT, line)
        name = "base model" if summary.step == 0 else (summary.checkpoint or summary.file_note or "")
        y = _draw_lines(
            draw, (x0 + gap, y), _wrap(draw, name, small, x1 - x0 - 2 * gap, 4), small, SMALL_TEXT, small_line
        )
        if summary.score is not None:
            text = f"score {summary.score:.3f}" + (f" (#{rank[summary.step]})" if summary.step in rank else "")
            y = _draw_lines(draw, (x0 + gap, y + 4), [text], small, TEXT, small_line)
        figures = figure_lines(rv, summary, likeness)
        if figures:
            wrapped = [part for text in figures for part in _wrap(draw, text, small, x1 - x0 - 2 * gap, 2)]
            y = _draw_lines(draw, (x0 + gap, y + 4), wrapped, small, TEXT, small_line)
        if rv.recommended is not None and summary.step == rv.recommended:
            y = _draw_lines(draw, (x0 + gap, y + 4), ["recommended"], small, RECOMMENDED_COLOUR, small_line)
        if summary.broken:
            _draw_lines(draw, (x0 + gap, y + 4), ["broken samples"], small, BROKEN_COLOUR, small_line)
        for c, (prompt, cfg) in enumerate(rv.columns):
            _draw_cell(draw, sheet, layout, by_key[(summary.step, prompt, cfg)], layout.cell_box(r, c), font, small)

    try:
        with atomic_path(out, keep_suffix=True) as temp:
            sheet.save(temp, format="PNG")
    except OSError as e:  # the folder became read-only, or full, while the sheet was drawn
        raise ConfigError(
            f"the contact sheet cannot be written in {str(out.parent)!r}: {e.strerror or e}; "
            "write it elsewhere with out= (--out)"
        ) from None
    return out


def figure_lines(rv: Review, summary: StepSummary, likeness: LikenessFigures | None = None) -> list[str]:
    """The figures written under a row's label: the held-out figures, ``held-out 1.0678``, then one line per class
    folder: ``drift +0.0040`` (``drift LABEL +0.0040`` with several folders), or ``LABEL 1.2040`` (the raw loss, on
    the base model's row or without a base-model figure on that folder); then, with a ``likeness``, the step's
    likeness figures: ``DINO 0.712, CLIP-I 0.803`` and ``CLIP-T 0.305, 0 copies`` (``likeness: no samples`` for a
    step it scored none of); none without figures."""
    lines = []
    if summary.held_out_loss is not None:
        lines.append(f"held-out {_number(summary.held_out_loss, '.4f')}")
    drift = dict(summary.class_drift)
    several = len(rv.class_folders) > 1
    for label, loss in summary.class_loss:
        if label in drift:
            lines.append(f"drift {label + ' ' if several else ''}{_number(drift[label], '+.4f')}")
        else:
            lines.append(f"{label} {_number(loss, '.4f')}")
    if likeness is not None:
        lines += _likeness_lines(likeness, summary.step)
    return lines


def _likeness_lines(likeness: LikenessFigures, step: int) -> list[str]:
    """The likeness figures of ``step`` (0: the base model's row), none when the likeness has no such row."""
    row = likeness.base if step == 0 else next((r for r in likeness.rows if r.step == step), None)
    if row is None:
        return []
    if not row.samples or row.dino is None:
        return ["likeness: no samples"]
    copies = len(row.copies)
    figures = [f"DINO {_number(row.dino, '.3f')}"]
    if row.clip_i is not None:
        figures.append(f"CLIP-I {_number(row.clip_i, '.3f')}")
    second = [f"CLIP-T {_number(row.clip_t, '.3f')}"] if row.clip_t is not None else []
    second.append(f"{copies} cop{'y' if copies == 1 else 'ies'}")
    return [", ".join(figures), ", ".join(second)]


def _number(value: float, spec: str) -> str:
    return format(value, spec) if value == value and abs(value) != float("inf") else str(value)


def _draw_cell(draw, sheet, layout: SheetLayout, cell: Cell, box, font, small) -> None:
    pasted = cell.path is not None and not any(w.kind == "missing" for w in cell.warnings)
    pasted = pasted and _paste(sheet, cell.path, box)
    x0, y0, x1, y1 = box
    if not pasted:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=MISSING)
        word = "unreadable" if any(w.kind == "unreadable" for w in cell.warnings) else "missing"
        _draw_lines(
            draw, (x0, (y0 + y1) // 2 - layout.line_height // 2), [word], font, TEXT, layout.line_height, centre=x1 - x0
        )
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
    likeness: LikenessFigures | None = None,
) -> Path:
    """Draw a run's samples as one PNG: a row per checkpoint, a column per prompt and CFG scale.

    Each row is a step ("base" for step 0) with its LoRA file's name; each sample is fitted into a ``cell`` px
    square. Samples with a warning get a coloured border and the warning (red: black, flat, NaN; orange:
    near-duplicate of a training image); cells without an image are grey, "missing". With a ``scorer``, each row
    also shows its score and rank. With the run's held-out figures (``NAME.validation.jsonl``), each row shows them
    too (:func:`figure_lines`) and the recommended step is marked "recommended". :func:`review` gives the same
    findings as data (``review(...).warnings`` are the lines ``spyke-lora compare`` prints).

    Args:
        run_dir: the run's ``output_dir``, or its ``NAME.samples.jsonl`` itself.
        name: the run's ``output_name``, when the folder holds the samples of several runs.
        out: the PNG file, or a folder for it; None: ``RUN_DIR/NAME.contact-sheet.png``. Written atomically.
        cell: a sample's square, in px (64 at least).
        train_images: image files or folders to look for near-duplicates in (see :func:`review`).
        scorer: ranks the steps; their scores and ranks are drawn on the rows.
        likeness: the run's :class:`~spyke_lora.Likeness` (:func:`~spyke_lora.likeness`): each row shows its DINO,
            CLIP-I, CLIP-T and copies too (:func:`figure_lines`).

    Returns:
        The PNG's path.

    Raises:
        ConfigError: ``cell`` is below 64, the folder of ``out`` (or the run's folder) does not exist, is a file or is
            read-only (said before any sample is read), or the run cannot be reviewed (see :func:`review`).
    """
    sheet_layout(1, 1, cell)  # refuses a bad cell size before any work
    check_sheet_folder(run_dir, out)  # and a folder it cannot write
    rv = review(run_dir, name, train_images=train_images, scorer=scorer)
    return write_sheet(rv, out, cell, likeness=likeness)


def check_sheet_folder(run_dir: PathLike, out: PathLike | None) -> None:
    """Refuse, before any sample is read, a contact sheet that could not be written.

    Args:
        run_dir: the run's ``output_dir``, or its ``NAME.samples.jsonl``.
        out: the PNG file, or a folder for it; None: in the run's folder.

    Raises:
        ConfigError: the sheet's folder does not exist, is a file, or cannot be written (read-only), naming it.
    """
    if out is not None:
        path = Path(out).expanduser().absolute()
        folder = path if path.is_dir() else path.parent
    else:
        run = Path(run_dir).expanduser().absolute()
        if not run.is_dir() and not run.is_file():
            return  # review() says what is wrong with it
        folder = run if run.is_dir() else run.parent
    _check_folder(folder)


def _check_folder(folder: Path) -> None:
    """The sheet's folder exists (no file in its place) and can be written."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(
            f"cannot write the contact sheet in {str(folder)!r}: {str(blocker)!r} is a file, not a folder; "
            "give a folder, or a .png file in one, as out= (--out)"
        )
    if not folder.is_dir():
        raise ConfigError(f"cannot write the contact sheet to {str(folder)!r}: its folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the contact sheet cannot be written in {str(folder)!r}: the folder is read-only (no write permission, "
            "or a read-only file system); write it elsewhere with out= (--out)"
        )


def write_sheet(rv: Review, out: PathLike | None, cell: int, *, likeness: LikenessFigures | None = None) -> Path:
    """Draw a review as the contact sheet.

    Args:
        rv: what :func:`review` found.
        out: the PNG file, or a folder for it; None: ``RUN_DIR/NAME.contact-sheet.png``.
        cell: a sample's square, in px.
        likeness: the run's likeness figures, drawn under each row's label (:func:`figure_lines`).

    Returns:
        The PNG's path.

    Raises:
        ConfigError: the folder of ``out`` does not exist, is a file or is read-only, the sheet cannot be written
            there, or ``cell`` is below 64.
    """
    path = Path(out).expanduser() if out is not None else rv.run_dir / f"{rv.name}.contact-sheet.png"
    if path.is_dir():
        path = path / f"{rv.name}.contact-sheet.png"
    _check_folder(path.absolute().parent)
    return _draw_sheet(rv, path.absolute(), cell, likeness)
