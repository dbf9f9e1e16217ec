"""The held-out figures of a run: reading ``NAME.validation.jsonl``, the table, and the recommended checkpoint.

A run with held-out images (``validation_dir``) writes one JSON line per figure next to its LoRA files::

    {"step": 4, "checkpoint": "NAME-step00000004.safetensors", "folder": "/data/val", "loss": 1.0678, "images": 2,
     "held_out": true}

``held_out: true`` lines are the run's own held-out validation loss (at each saved file, or from
``validation_loss(files, cfg)`` later); ``held_out: false`` lines are the loss on another folder
(``validation_loss(files, cfg, folder=...)``, typically class images: class drift). Step 0 with no checkpoint is the
base model alone, the reference. The newest line for a (step, folder) wins. Lower loss is better.

A line names a file, and what identifies the file's content (``ss_steps``, ``sshs_model_hash``; see
``_engine/_file_identity.py``): a line whose file no longer holds that content is dropped when the manifest is read
(after a stop at step 500 and a resume to 920, ``NAME.safetensors`` holds step 920, and its step-500 line goes), and
said in the table. A held-out pass between saved files (``validate_every_n_steps`` finer than ``save_every_n_steps``)
has no file: its figure is a point of the curve (the run's loss chart, TensorBoard), never ranked or recommended. A
recommendation is always a file on disk that holds the step recommended.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._engine import check_recorded

if TYPE_CHECKING:  # pragma: no cover
    from ._rows import StepSummary

__all__ = ["Figures", "StepLoss", "checkpoint_path", "loss_order", "read_figures", "recommend", "table"]

NOISE = 0.005  # best two held-out losses closer than this (relative): say they are within noise of each other


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """One step's figures from the run's ``NAME.validation.jsonl`` (step 0: the base model alone, the reference).

    ``held_out_loss``: the loss on the run's held-out images (None: not measured at this step); ``class_loss``:
    ``(folder label, loss)`` for every other folder measured at this step; ``class_drift``: ``(folder label, loss
    minus the base model's loss on that folder)`` for those folders that have a base-model figure (positive: the
    LoRA has pulled the class away from the base model; the base model's own row has none)."""

    step: int
    checkpoint: str | None  # the LoRA file's name (or path, when it is not in the run folder); None: the base model
    held_out_loss: float | None = None
    class_loss: tuple[tuple[str, float], ...] = ()
    class_drift: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Figures:
    """Everything read from one validation manifest (:func:`review` spreads it over the Review)."""

    manifest: Path
    rows: tuple[StepLoss, ...]  # step order, step 0 first when measured
    held_out_folder: Path | None
    held_out_images: int | None
    class_folders: tuple[tuple[str, Path], ...]  # (label, folder), in first-measured order
    # (step, file name, why) of every line left out: its file no longer holds what was measured
    dropped: tuple[tuple[int, str, str], ...] = ()

    @property
    def between_files(self) -> tuple[int, ...]:
        """The steps with a held-out figure and no file (passes between saved files): a curve, not candidates."""
        return tuple(r.step for r in self.rows if r.step != 0 and r.checkpoint is None and r.held_out_loss is not None)

    def on_file(self) -> dict[int, float]:
        """``{step: held-out loss}`` of every step but 0 whose figure a file on disk holds: the candidates."""
        return {
            r.step: r.held_out_loss for r in self.rows if r.step != 0 and r.checkpoint and r.held_out_loss is not None
        }

    @property
    def has_held_out(self) -> bool:
        """True when a step has a held-out loss (not only other folders' figures)."""
        return any(r.held_out_loss is not None for r in self.rows)

    def row(self, step: int) -> StepLoss | None:
        """The figures of ``step``; None when it was not measured."""
        return next((r for r in self.rows if r.step == step), None)

    @property
    def base(self) -> StepLoss | None:
        """The base model's figures (step 0), the reference; None when it was not measured."""
        return self.row(0)

    def drift_folders(self) -> set[str]:
        """The labels of the class folders with a base-model figure (their drift can be computed)."""
        base = self.base
        return {label for label, _ in base.class_loss} if base else set()


def _folder(text: Any, run_dir: Path) -> Path:
    path = Path(str(text)).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else run_dir / path))


def checkpoint_path(text: str, run_dir: Path) -> Path:
    """A manifest line's file: a name (or a relative path) in the run folder, or an absolute path.

    Args:
        text: the line's ``checkpoint``.
        run_dir: the manifest's folder.

    Returns:
        The file's path.
    """
    path = Path(text).expanduser()
    return path if path.is_absolute() else run_dir / path


def _saved_at(step: int, run_dir: Path, name: str, cache: dict[Path, Any]) -> str | None:
    """The run's file that holds ``step`` (its step file, or its final file), for a line written before the lines
    recorded the file of a pass made at a step's end; None when neither holds that step."""
    for candidate in (f"{name}-step{step:08d}.safetensors", f"{name}.safetensors"):
        if check_recorded(run_dir / candidate, step, {}, cache).steps == step:
            return candidate
    return None


def _parse(text: str, run_dir: Path, name: str) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
    """The manifest's usable lines, oldest first, those whose file no longer holds what they recorded left out
    (returned apart as ``(step, file name, why)``)."""
    cache: dict[Path, Any] = {}
    kept: list[dict[str, Any]] = []
    dropped: list[tuple[int, str, str]] = []
    for text_line in text.splitlines():
        try:
            item = json.loads(text_line)
            step, loss = int(item["step"]), float(item["loss"])
            folder = _folder(item["folder"], run_dir)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        checkpoint = item.get("checkpoint")
        if step == 0 and checkpoint:
            continue  # a file whose step is unknown: neither a candidate nor the base model's reference
        if checkpoint:
            path = checkpoint_path(str(checkpoint), run_dir)
            check = check_recorded(path, step, item, cache)
            if not check.holds:
                dropped.append((step, path.name if path.parent == run_dir else str(path), check.note or ""))
                continue
        elif step != 0 and bool(item.get("held_out", True)):
            checkpoint = _saved_at(step, run_dir, name, cache)
        images = item.get("images")
        kept.append(
            {
                "step": step,
                "folder": folder,
                "loss": loss,
                "held_out": bool(item.get("held_out", True)),
                "images": images if isinstance(images, int) else None,
                "checkpoint": Path(str(checkpoint)).name if checkpoint else None,
            }
        )
    return kept, dropped


def read_figures(manifest: Path) -> Figures | None:
    """Read a run's validation manifest.

    Args:
        manifest: the run's ``NAME.validation.jsonl``.

    Returns:
        Its figures, every line whose file no longer holds what it recorded left out (``Figures.dropped``); None
        when it does not exist or holds no usable line (a run without validation).
    """
    try:
        text = manifest.read_text(encoding="utf-8")
    except OSError:
        return None
    kept, dropped = _parse(text, manifest.parent, manifest.name[: -len(".validation.jsonl")])
    lines: dict[tuple[int, Path], dict[str, Any]] = {}
    held_out_folder: Path | None = None
    seen: list[Path] = []
    for item in kept:
        step, folder = item["step"], item["folder"]
        if folder not in seen:
            seen.append(folder)
        older = lines.get((step, folder))
        if older is not None and older["checkpoint"] and not item["checkpoint"]:
            continue  # a figure a file holds is not replaced by the same step's figure without one
        lines.pop((step, folder), None)  # the newest line for a (step, folder) wins
        lines[(step, folder)] = item
        if item["held_out"]:
            held_out_folder = folder  # the newest held-out folder is the run's (validation_dir)
    if not lines:
        return None
    return _figures(manifest, lines, held_out_folder, seen, tuple(dropped))


def _figures(
    manifest: Path,
    lines: dict[tuple[int, Path], dict[str, Any]],
    held_out_folder: Path | None,
    seen: list[Path],
    dropped: tuple[tuple[int, str, str], ...],
) -> Figures:
    """The rows of the figures, a step each, from the newest line of each (step, folder)."""
    others = [f for f in seen if f != held_out_folder and any(folder == f for _, folder in lines)]
    names = [f.name for f in others]
    labels = {f: (f.name if names.count(f.name) == 1 and f.name else str(f)) for f in others}

    base = {folder: item["loss"] for (step, folder), item in lines.items() if step == 0}
    rows = []
    for step in sorted({step for step, _ in lines}):
        mine = {folder: item for (s, folder), item in lines.items() if s == step}
        held = mine.get(held_out_folder) if held_out_folder is not None else None
        checkpoint = next(
            (item["checkpoint"] for item in ([held] if held else []) + list(mine.values()) if item["checkpoint"]), None
        )
        class_loss = tuple((labels[f], mine[f]["loss"]) for f in others if f in mine)
        drift = (
            ()
            if step == 0
            else tuple((labels[f], mine[f]["loss"] - base[f]) for f in others if f in mine and f in base)
        )
        rows.append(StepLoss(step, checkpoint, held["loss"] if held else None, class_loss, drift))
    images = None
    if held_out_folder is not None:
        images = [item for (_, folder), item in lines.items() if folder == held_out_folder][-1]["images"]
    labelled = tuple((labels[f], f) for f in others)
    return Figures(manifest, tuple(rows), held_out_folder, images, labelled, dropped)


def loss_order(losses: Mapping[int, float], broken: set[int]) -> tuple[tuple[int, float], ...]:
    """The steps ranked by loss.

    Args:
        losses: ``{step: held-out loss}``.
        broken: the steps with a black, flat or NaN sample.

    Returns:
        ``(step, loss)`` pairs, lowest loss first; broken steps and non-finite losses last; the base model (step 0)
        left out.
    """

    def key(item: tuple[int, float]) -> tuple[bool, float, int]:
        step, loss = item
        return (step in broken or not math.isfinite(loss), loss if math.isfinite(loss) else 0.0, step)

    return tuple(sorted(((s, v) for s, v in losses.items() if s != 0), key=key))


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _drift(value: float) -> str:
    return f"{value:+.4f}" if math.isfinite(value) else str(value)


def recommend(figures: Figures, samples: Mapping[int, StepSummary]) -> tuple[int | None, str | None]:
    """The recommended checkpoint: the lowest held-out loss among the steps whose samples are not broken.

    Args:
        figures: the run's held-out figures.
        samples: the review's row of each step.

    Returns:
        ``(step, the sentence saying why)``; ``(None, None)`` without held-out figures; ``(None, "no
        recommendation: ...")`` when no step qualifies.
    """
    if not figures.has_held_out:
        return None, None
    held = figures.on_file()  # a file on disk holds each: passes between files and replaced files are no candidates
    if not held:
        return None, _no_candidate(figures)
    broken = {step for step, state in samples.items() if state.broken}
    order = loss_order(held, broken)
    candidates = [(s, v) for s, v in order if s not in broken and math.isfinite(v)]
    if not candidates:
        return None, "no recommendation: every step with a held-out loss has broken samples or a non-finite loss"
    step, loss = candidates[0]
    row = figures.row(step)
    assert row is not None
    base = figures.base
    where = f"step {step} ({row.checkpoint})" if row.checkpoint else f"step {step}"
    reference = f" (base model {_loss(base.held_out_loss)})" if base and base.held_out_loss is not None else ""
    parts = [f"recommended: {where}: the lowest held-out loss, {_loss(loss)}{reference}"]
    drift = dict(row.class_drift)
    base_class = dict(base.class_loss) if base else {}
    for label, value in row.class_loss:
        if label in drift:
            parts.append(
                f"class drift on {label} {_drift(drift[label])} ({_loss(value)}, base model {_loss(base_class[label])})"
            )
        else:
            parts.append(f"loss on {label} {_loss(value)} (no base-model figure on it, so no drift)")
    parts.append(_samples_words(samples.get(step)))
    if len(candidates) > 1:
        second, value = candidates[1]
        gap = (value - loss) / abs(loss) if loss else math.inf
        if gap < NOISE:
            images = figures.held_out_images
            on = f"on {images} held-out image{'s' if images != 1 else ''}" if images else "on a small held-out set"
            parts.append(
                f"step {second} ({_loss(value)}) is within {gap * 100:.2f}% of it, which is noise {on}: "
                "compare the two on the sheet"
            )
    lower = [s for s, v in order if s in broken and math.isfinite(v) and v < loss]
    if lower:
        steps = ", ".join(f"step {s} ({_loss(held[s])})" for s in sorted(lower, key=lambda s: held[s]))
        parts.append(f"lower but with broken samples: {steps}")
    return step, "; ".join(parts)


def _samples_words(state: StepSummary | None) -> str:
    """What the recommendation says of the step's samples."""
    if state is None or (state.images == 0 and state.missing == 0):
        return "it has no samples to look at"
    if state.warnings:
        return (
            f"its samples have {state.warnings} warning{'s' if state.warnings != 1 else ''}: look at them on the sheet"
        )
    return "its samples have no warnings"


def _steps_text(steps: Sequence[int]) -> str:
    return f"step{'s' if len(steps) != 1 else ''} {', '.join(str(s) for s in steps)}"


def _no_candidate(figures: Figures) -> str:
    """Why nothing is recommended when no file on disk holds a held-out figure."""
    between, dropped = figures.between_files, sorted({step for step, _, _ in figures.dropped})
    if not between and not dropped:
        return (
            "no recommendation: only the base model has a held-out loss; measure the saved files with "
            "validation_loss(files, cfg)"
        )
    why = []
    if between:
        why.append(f"the passes at {_steps_text(between)} were between saved files")
    if dropped:
        why.append(f"the files measured at {_steps_text(dropped)} no longer hold those weights")
    return (
        f"no recommendation: no saved file on disk has a held-out loss ({'; '.join(why)}); measure the saved files "
        "with validation_loss(files, cfg)"
    )


def table(figures: Figures, samples: Mapping[int, StepSummary], recommended: int | None) -> str:
    """The figures as the text ``spyke-lora compare`` prints.

    Args:
        figures: the run's held-out figures.
        samples: the review's row of each step (a step with broken samples is marked).
        recommended: the recommended step, marked; None: none.

    Returns:
        A row per step (the base model first), the held-out loss and a column per class folder (its drift, or its
        raw loss when the base model has no figure on it), then what the columns mean.
    """
    drift_folders = figures.drift_folders()
    columns: list[tuple[str, str]] = []  # (header, kind)
    if figures.has_held_out:
        columns.append(("held-out", "held-out"))
    for label, _ in figures.class_folders:
        columns.append((f"drift {label}" if label in drift_folders else f"{label} loss", label))
    header_rows: list[list[str]] = []
    notes: list[str] = []
    between = set(figures.between_files)  # a curve, not rows: no file holds them (said below)
    for r in (r for r in figures.rows if r.step not in between):
        cells = [f"{r.step} (base model)" if r.step == 0 else str(r.step)]
        losses, drifts = dict(r.class_loss), dict(r.class_drift)
        for _, kind in columns:
            if kind == "held-out":
                cells.append(_loss(r.held_out_loss) if r.held_out_loss is not None else "-")
            elif kind in drift_folders and r.step != 0:
                cells.append(_drift(drifts[kind]) if kind in drifts else "-")
            elif kind in drift_folders:
                cells.append(f"({_loss(losses[kind])})")  # the base model's own figure: the reference
            else:
                cells.append(_loss(losses[kind]) if kind in losses else "-")
        state = samples.get(r.step)
        note = []
        if state is not None and state.broken:
            note.append("broken samples")
        if r.step == recommended:
            note.append("<- recommended")
        header_rows.append(cells)
        notes.append(", ".join(note))
    heads = ["step", *(h for h, _ in columns)]
    widths = [max(len(row[i]) for row in [heads, *header_rows]) for i in range(len(heads))]

    def line(cells: Sequence[str], note: str = "") -> str:
        text = cells[0].ljust(widths[0]) + "".join(f"  {c.rjust(w)}" for c, w in zip(cells[1:], widths[1:]))
        return f"  {text}  {note}".rstrip()

    out = []
    if figures.has_held_out:
        images = figures.held_out_images
        count = f"{images} image{'s' if images != 1 else ''}" if images else "the images"
        out.append(
            f"held-out loss: sd-scripts' validation loss on {count} in {figures.held_out_folder}, never "
            "trained on (lower is better):"
        )
    else:
        out.append("validation loss on other folders (lower is better):")
    out.append(line(heads))
    out += [line(cells, note) for cells, note in zip(header_rows, notes)]
    for label, folder in figures.class_folders:
        if label in drift_folders:
            out.append(
                f"drift {label}: the loss on {folder} minus the base model's (in brackets on its row); "
                "positive: the LoRA has pulled the class away from the base model"
            )
        else:
            out.append(
                f"{label} loss: the base model has no figure on {folder}, so no drift; measure it with "
                f'validation_loss([None, *files], cfg, folder="{folder}")'
            )
    return "\n".join(out + _left_out_lines(figures))


def _left_out_lines(figures: Figures) -> list[str]:
    """The table's last lines: the held-out passes between saved files, and the lines left out because their file
    no longer holds what was measured."""
    out = []
    between = figures.between_files
    if between:
        chart = figures.manifest.name[: -len(".validation.jsonl")] + ".loss.png"
        out.append(
            f"held-out passes between saved files at {_steps_text(between)}: no file holds those weights, so they "
            f"are not candidates; they are the held-out curve of {chart} and of TensorBoard"
        )
    for step, name, why in figures.dropped:
        out.append(f"left out: the figure of step {step} measured on {name}; {why}")
    return out
