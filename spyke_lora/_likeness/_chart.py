"""The likeness chart (:func:`likeness_chart`, ``NAME.likeness.png``): likeness against prompt fidelity, one point
per checkpoint, where a person would rather look than read the table.

Up is more like the character (DINO), right is more faithful to the prompt (CLIP-T). The checkpoints are joined in
step order, so the chart shows the run's path: from the base model's corner (faithful to the prompt, not the
character), up towards the character's own images (the ceiling: a horizontal line, since real images have no prompt),
and, when it overfits, to the left (likeness bought with prompt fidelity). Drawn with matplotlib's object API and
Agg canvas, as the loss chart is: the caller's pyplot and backend are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ConfigError
from .._files import atomic_path
from ._rows import Likeness, LikenessRow

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["likeness_chart"]

_DPI = 100  # `size` is in pixels: the figure is size / 100 inches at 100 dots per inch
_BLUE, _GREY, _GREEN, _PURPLE = "#1f5fbf", "#7f7f7f", "#2c8c2c", "#7b4fa0"


def likeness_chart(
    result: Likeness, out: str | os.PathLike[str] | None = None, *, size: tuple[int, int] = (800, 600)
) -> Path:
    """Draw a run's likeness as a PNG: likeness (DINO) against prompt fidelity (CLIP-T), one point per checkpoint.

    The checkpoints (blue) are joined in step order and labelled with their step, with error bars of one standard
    error each way where a row has them; the base model's samples are a grey square ("base"), the character's own
    images a purple line at their DINO (a band of one standard error: they have no CLIP-T), and the recommended file
    is ringed in green. A checkpoint without samples has no point: it is named under the chart.

    Usage::

        from spyke_lora import likeness, likeness_chart

        path = likeness_chart(likeness("out/spyke"))  # out/spyke/spyke.likeness.png

    Args:
        result: what :func:`~spyke_lora.likeness` returned.
        out: the PNG file, or a folder for it; None: ``RUN_DIR/NAME.likeness.png``. Written atomically.
        size: width and height in pixels.

    Returns:
        The PNG's path.

    Raises:
        ConfigError: the folder of ``out`` does not exist, is a file or cannot be written, or ``size`` is too small.
    """
    path = _chart_path(result, out)
    width, height = size
    if width < 200 or height < 150:
        raise ConfigError(
            f"the likeness chart's size must be at least 200 x 150 px, got {width} x {height}; try size=(800, 600)"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = likeness_figure(result, size=size)
    FigureCanvasAgg(figure)  # the figure's canvas: Agg, whatever backend the caller's pyplot uses
    try:
        with atomic_path(path, keep_suffix=True) as temp:
            figure.savefig(temp, format="png", dpi=_DPI)
    except OSError as e:  # the folder became read-only, or full, while the chart was drawn
        raise ConfigError(
            f"the likeness chart cannot be written in {str(path.parent)!r}: {e.strerror or e}; write it elsewhere "
            "with out="
        ) from None
    return path


def _chart_path(result: Likeness, out: str | os.PathLike[str] | None) -> Path:
    """Where the chart goes, its folder checked before anything is drawn."""
    name = f"{result.name}.likeness.png"
    path = Path(out).expanduser() if out is not None else Path(result.run_dir) / name
    if path.is_dir():
        path = path / name
    path = path.absolute()
    folder = path.parent
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(
            f"cannot write the likeness chart in {str(folder)!r}: {str(blocker)!r} is a file, not a folder; give a "
            "folder, or a .png file in one, as out="
        )
    if not folder.is_dir():
        raise ConfigError(
            f"cannot write the likeness chart to {str(path)!r}: its folder does not exist; create it, or give an "
            "existing folder as out="
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the likeness chart cannot be written in {str(folder)!r}: the folder is read-only; write it elsewhere "
            "with out="
        )
    return path


def _plotted(row: LikenessRow | None) -> bool:
    """Whether a row has a point: both of its figures."""
    return row is not None and row.dino is not None and row.clip_t is not None


def likeness_figure(result: Likeness, *, size: tuple[int, int] = (800, 600)) -> Figure:
    """The chart as a matplotlib figure, not drawn yet (what :func:`likeness_chart` saves; the tests look into it).

    Its artists carry ids (``get_gid()``): "checkpoints" (the joined points), "checkpoint-errors" (their error bars),
    "step-N" (a step's label), "base" and "base-errors", "ceiling" (the line) and "ceiling-band", "recommended" (the
    ring)."""
    from matplotlib.figure import Figure

    width, height = size
    # a hair over the size, so that the canvas' int() of inches x dpi never loses a pixel (as the loss chart)
    figure = Figure(figsize=((width + 1e-3) / _DPI, (height + 1e-3) / _DPI), dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    points = sorted((r for r in result.rows if _plotted(r)), key=lambda r: r.step or 0)
    _draw_base(axes, result.base, points[0] if points else None)
    _draw_checkpoints(axes, points)
    _draw_ceiling(axes, result.ceiling)
    _draw_recommended(axes, result.recommended)
    axes.set_xlabel("prompt fidelity (CLIP-T: sample against its prompt)")
    axes.set_ylabel("likeness (DINO: sample against the character's images)")
    axes.set_title(f"{result.name}: likeness against prompt fidelity")
    axes.grid(alpha=0.3)
    axes.margins(0.12)  # room for the step labels at the ends
    handles, labels = axes.get_legend_handles_labels()
    missing = [r.label for r in result.rows if not _plotted(r)]
    if missing:  # said where the eye looks for what the chart shows: a legend entry without a mark
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle="none"))
        labels.append(f"no point (no samples scored): {', '.join(missing)}")
    if handles:  # below the plot, as the loss chart's: over it, it would hide points
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 2), fontsize="small")
    return figure


def _errors(rows: list[LikenessRow], field: str) -> list[float] | None:
    """One standard error per row (0 where a row has none); None when no row has one."""
    values = [getattr(r, field) for r in rows]
    return None if all(v is None for v in values) else [v or 0.0 for v in values]


def _draw_checkpoints(axes: Axes, points: list[LikenessRow]) -> None:
    """The checkpoints' points joined in step order, each labelled with its step."""
    if not points:
        return
    xs = [r.clip_t for r in points]
    ys = [r.dino for r in points]
    xerr, yerr = _errors(points, "clip_t_se"), _errors(points, "dino_se")
    if xerr is not None or yerr is not None:
        axes.errorbar(
            xs, ys, xerr=xerr, yerr=yerr, color=_BLUE, alpha=0.35, linestyle="none", capsize=2, gid="checkpoint-errors"
        )
    axes.plot(
        xs,
        ys,
        color=_BLUE,
        marker="o",
        markersize=6,
        linewidth=1.5,
        label="checkpoints, in step order",
        gid="checkpoints",
    )
    for row, x, y in zip(points, xs, ys, strict=True):
        text = axes.annotate(
            str(row.step), (x, y), xytext=(5, 5), textcoords="offset points", fontsize="small", color=_BLUE
        )
        text.set_gid(f"step-{row.step}")


def _draw_base(axes: Axes, base: LikenessRow | None, first: LikenessRow | None) -> None:
    """The base model's samples (step 0: the floor): a grey square, labelled "base", a dotted line from it to the
    first checkpoint (where the run's path starts)."""
    if base is None or base.dino is None or base.clip_t is None:
        return
    if first is not None:
        axes.plot([base.clip_t, first.clip_t], [base.dino, first.dino], color=_GREY, linestyle=":", linewidth=1.0)
    xerr, yerr = _errors([base], "clip_t_se"), _errors([base], "dino_se")
    if xerr is not None or yerr is not None:
        axes.errorbar(
            [base.clip_t],
            [base.dino],
            xerr=xerr,
            yerr=yerr,
            color=_GREY,
            linestyle="none",
            capsize=3,
            gid="base-errors",
        )
    axes.plot(
        [base.clip_t],
        [base.dino],
        color=_GREY,
        marker="s",
        markersize=8,
        linestyle="none",
        label=f"base model (DINO {base.dino:.3f})",
        gid="base",
    )
    axes.annotate("base", (base.clip_t, base.dino), xytext=(6, -12), textcoords="offset points", color=_GREY)


def _draw_ceiling(axes: Axes, ceiling: LikenessRow) -> None:
    """The character's own images: a line at their DINO, a band of one standard error around it."""
    if ceiling.dino is None:
        return
    axes.axhline(
        ceiling.dino,
        color=_PURPLE,
        linestyle="--",
        linewidth=1.2,
        label=f"own images (DINO {ceiling.dino:.3f}: the ceiling)",
        gid="ceiling",
    )
    if ceiling.dino_se:
        band = axes.axhspan(ceiling.dino - ceiling.dino_se, ceiling.dino + ceiling.dino_se, color=_PURPLE, alpha=0.12)
        band.set_gid("ceiling-band")


def _draw_recommended(axes: Axes, row: LikenessRow | None) -> None:
    """A green ring around the recommended file's point (none when it has no point)."""
    if row is None or row.dino is None or row.clip_t is None:
        return
    axes.plot(
        [row.clip_t],
        [row.dino],
        linestyle="none",
        marker="o",
        markersize=18,
        markerfacecolor="none",
        markeredgecolor=_GREEN,
        markeredgewidth=2.0,
        label=f"recommended: {row.label}" + (f" ({row.checkpoint.name})" if row.checkpoint is not None else ""),
        gid="recommended",
    )
