"""The review of a run's samples: reading ``NAME.samples.jsonl``, checking every sample, one row per checkpoint.

A run's ``NAME.samples.jsonl`` lists every sample image (step, prompt, CFG scale, seed, path, checkpoint).
:func:`review` reads it, finds the training images, runs :func:`~._sample_checks.check_sample` on each sample and,
with a scorer, ranks the steps (:mod:`._scorers`); when the run also has held-out figures (``NAME.validation.jsonl``, see
:mod:`._figures`) it adds them, ranks the steps by held-out loss and recommends one. Its :class:`Review` is what the
contact sheet draws.

A sample's file is named only while it holds the weights sampled (:func:`~spyke_lora._engine.check_recorded`): after
a stop at step 500 and a resume to 920, ``NAME.safetensors`` holds step 920, and the step-500 row keeps its samples
but not that name (``StepSummary.file_note`` says why). A run with held-out figures and no samples is reviewed from
the figures alone: a row per file measured, ranked by held-out loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import tomllib
from .._engine import check_recorded
from .._errors import ConfigError
from ._figures import Figures, StepLoss, checkpoint_path, loss_order, read_figures, recommend, table
from ._rows import Cell, StepSummary
from ._sample_checks import BROKEN, PathLike, References, SampleWarning, check_sample
from ._scorers import score_order, score_steps

if TYPE_CHECKING:  # pragma: no cover
    from ._scorers import Scorer

__all__ = ["Review", "review"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Review:
    """What :func:`review` found in one run's samples. ``warnings``: one line per problem, as the CLI prints them;
    ``ranking``: ``(step, score)`` best first when a scorer was given (broken steps last; the base model, step 0,
    is not ranked), else None.

    From the run's ``NAME.validation.jsonl``, when it has one (else these stay empty / None): ``validation``, its
    path; ``figures``, a :class:`StepLoss` per step measured (step 0, the base model, first: the reference), also
    steps without samples; ``held_out_folder`` and ``held_out_images``; ``class_folders``, ``(label, folder)`` of
    the other folders measured; ``loss_ranking``, ``(step, held-out loss)`` lowest first, of the steps a file on
    disk holds (broken steps last, step 0 and passes between saved files not ranked; None without held-out figures); ``recommended``, the step of the lowest held-out loss whose samples
    are not broken, and ``recommendation``, the sentence saying why (None without held-out figures); ``dropped``,
    ``(step, file, why)`` of the figures left out because their file no longer holds what was measured."""

    name: str
    run_dir: Path
    manifest: Path | None  # NAME.samples.jsonl; None: a run with held-out figures and no samples
    columns: tuple[tuple[str, float], ...]  # (prompt, cfg_scale), in sheet order
    cells: tuple[Cell, ...]  # every step x column, rows in step order
    steps: tuple[StepSummary, ...]
    train_images: tuple[Path, ...]
    warnings: tuple[str, ...]
    ranking: tuple[tuple[int, float], ...] | None = None
    scorer: str | None = None
    validation: Path | None = None
    figures: tuple[StepLoss, ...] = ()
    held_out_folder: Path | None = None
    held_out_images: int | None = None
    class_folders: tuple[tuple[str, Path], ...] = ()
    loss_ranking: tuple[tuple[int, float], ...] | None = None
    recommended: int | None = None
    recommendation: str | None = None
    dropped: tuple[tuple[int, str, str], ...] = ()  # (step, file, why): figures whose file no longer holds them

    def cell(self, step: int, prompt: str, cfg_scale: float) -> Cell:
        """The cell of ``step``, ``prompt`` and ``cfg_scale``; KeyError when there is none."""
        for c in self.cells:
            if c.step == step and c.prompt == prompt and c.cfg_scale == float(cfg_scale):
                return c
        raise KeyError((step, prompt, cfg_scale))

    def row(self, step: int) -> tuple[Cell, ...]:
        """Every cell of ``step``: one row of the sheet."""
        return tuple(c for c in self.cells if c.step == step)

    def table(self) -> str:
        """The held-out figures as the lines ``spyke-lora compare`` prints: a row per step (the base model first),
        its held-out loss and a column per class folder (the drift, or the raw loss when the base model has no
        figure on that folder); "" when the run has no validation figures."""
        if self.validation is None or not self.figures:
            return ""
        figures = Figures(
            self.validation, self.figures, self.held_out_folder, self.held_out_images, self.class_folders, self.dropped
        )
        return table(figures, {s.step: s for s in self.steps}, self.recommended)


def _manifest(run_dir: PathLike, name: str | None) -> tuple[Path | None, str, Path]:
    """The samples manifest to read (None: the run has held-out figures and no samples), its run's NAME and folder:
    ``run_dir`` itself, its ``NAME.samples.jsonl`` (or ``NAME.validation.jsonl``), or its only one."""
    path = Path(run_dir).expanduser()
    for suffix in (".samples.jsonl", ".validation.jsonl"):
        if path.is_file() and path.name.endswith(suffix):
            found = path if suffix == ".samples.jsonl" else None
            return found, path.name[: -len(suffix)], path.parent
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a folder; give the output_dir of a run")
    if name is not None:
        manifest = path / f"{name}.samples.jsonl"
        if manifest.is_file():
            return manifest, name, path
        if (path / f"{name}.validation.jsonl").is_file():
            return None, name, path
        others = sorted(p.name[: -len(".samples.jsonl")] for p in path.glob("*.samples.jsonl"))
        hint = f" (it has the samples of {', '.join(others)})" if others else ""
        raise ConfigError(
            f"{path} has no {name}.samples.jsonl{hint}; check the name, or make samples with `sample_prompts` in "
            f"training or `spyke-lora sample` (it has no held-out figures, {name}.validation.jsonl, either)"
        )
    for suffix in (".samples.jsonl", ".validation.jsonl"):
        found = sorted(path.glob(f"*{suffix}"))
        if len(found) > 1:
            names = ", ".join(p.name[: -len(suffix)] for p in found)
            raise ConfigError(f"{path} holds the manifests of several runs ({names}); pick one with name= (--name)")
        if found:
            manifest = found[0] if suffix == ".samples.jsonl" else None
            return manifest, found[0].name[: -len(suffix)], path
    raise ConfigError(
        f"{path} has no NAME.samples.jsonl, so there are no samples to compare, and no NAME.validation.jsonl (held-out "
        "figures) to rank by; train with `sample_prompts` set (or sample the saved files with `spyke-lora sample`), "
        "or with `validation_dir` (or measure them with validation_loss(files, cfg))"
    )


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
        raise ConfigError(
            f"{manifest} lists no samples yet; sample the run's files with `spyke-lora sample`, or train with "
            "`sample_prompts` set"
        )
    return [{**item, "_key": key} for key, item in entries.items()]


def _sample_path(text: Any, run_dir: Path) -> Path | None:
    """A manifest's image path, relative ones against the run folder; None when there is none."""
    if not text:
        return None
    path = Path(str(text)).expanduser()
    if not path.is_absolute():
        return run_dir / path
    if not path.exists() and (run_dir / "sample" / path.name).exists():  # the run folder was moved
        return run_dir / "sample" / path.name
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


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
    """Check every sample of a run and, with a ``scorer``, rank the steps (:func:`rank_checkpoints`).

    Reads ``RUN_DIR/NAME.samples.jsonl`` and runs :func:`check_sample` on each image; with the run's held-out
    figures (``NAME.validation.jsonl``) it adds them, ranks the steps by held-out loss and recommends one.

    Args:
        run_dir: the run's ``output_dir``, or its ``NAME.samples.jsonl`` itself.
        name: the run's ``output_name``, when the folder holds the samples of several runs.
        train_images: image files or folders to look for near-duplicates in; None: the ``train_dir`` of the run's
            ``NAME.config.toml`` when it still exists; ``()``: no near-duplicate check.
        scorer: ranks the steps by their samples (:class:`Scorer`); None: no score ranking.

    Returns:
        The :class:`Review`: a cell per sample, a row per step, the warning lines ``spyke-lora compare`` prints.

    Raises:
        ConfigError: ``run_dir`` is not a run's folder, has no samples manifest (or several and no ``name``), the
            manifest lists no samples, or a training image given does not exist.
    """
    manifest, name, folder = _manifest(run_dir, name)
    figures = read_figures(folder / f"{name}.validation.jsonl")
    if manifest is None:
        return _figures_only(name, folder, figures, scorer)
    entries = _read_manifest(manifest)
    prompts: list[str] = []
    for item in entries:
        if item["_key"][1] not in prompts:
            prompts.append(item["_key"][1])
    columns = sorted({item["_key"][1:] for item in entries}, key=lambda pc: (prompts.index(pc[0]), pc[1]))
    by_key = {item["_key"]: item for item in entries}
    steps = sorted({item["_key"][0] for item in entries})
    train = _training_images(folder, name, train_images)
    references = References(train)

    cells, lines = [], []
    files: dict[Path, Any] = {}  # each file's identity, read once
    for step in steps:
        for prompt, cfg in columns:
            item = by_key.get((step, prompt, cfg))
            cell, found = _check_cell(step, prompt, cfg, item, folder, references, files)
            cells.append(cell)
            lines += found
    summaries = [_summary(step, [c for c in cells if c.step == step], lines) for step in steps]

    ranking = None
    if scorer is not None:
        scores = score_steps(cells, summaries, scorer, train)
        ranking = score_order(scores, {s.step for s in summaries if s.broken})
        summaries = [dataclasses.replace(s, score=scores.get(s.step)) for s in summaries]
    scorer_name = getattr(scorer, "name", type(scorer).__name__) if scorer else None
    rv = Review(
        name,
        folder,
        manifest,
        tuple(columns),
        tuple(cells),
        tuple(summaries),
        tuple(train),
        tuple(lines),
        ranking,
        scorer_name,
    )
    return rv if figures is None else _with_figures(rv, figures)


def _figures_only(name: str, folder: Path, figures: Figures | None, scorer: Scorer | None) -> Review:
    """The review of a run with held-out figures and no samples: a row per file measured (and the base model)."""
    if scorer is not None:
        raise ConfigError(
            f"{folder} has no {name}.samples.jsonl, so there are no samples to score; rank by the held-out loss "
            "(no scorer), or sample the saved files with `spyke-lora sample`"
        )
    if figures is None:
        raise ConfigError(
            f"{folder / (name + '.validation.jsonl')} lists no figures yet and the run has no samples; measure the "
            "saved files with validation_loss(files, cfg)"
        )
    rows = [StepSummary(r.step, r.checkpoint, 0, 0, 0, False) for r in figures.rows if r.step == 0 or r.checkpoint]
    rv = Review(name, folder, None, (), (), tuple(rows), (), ())
    return _with_figures(rv, figures)


def _check_cell(
    step: int,
    prompt: str,
    cfg: float,
    item: dict[str, Any] | None,
    folder: Path,
    references: References,
    files: dict[Path, Any],
) -> tuple[Cell, list[str]]:
    """One cell of the sheet, its sample checked, and the warning lines it adds; its file named only while the file
    holds the weights sampled (``files``: each file's identity, shared by the cells)."""
    where = f'{_step_text(step)}, CFG {cfg:g}, "{_prompt_text(prompt)}"'
    if item is None:
        found = (SampleWarning("missing", "no sample in the manifest", "missing"),)
        return Cell(step, prompt, cfg, None, None, None, found), [f"{where}: no sample in the manifest"]
    path = _sample_path(item.get("path"), folder)
    checkpoint, note = _sampled_file(step, item, folder, files)
    seed = item.get("seed") if isinstance(item.get("seed"), int) else None
    if path is None or not path.is_file():
        shown = _shown(path, folder) if path else "(no path)"
        found = (SampleWarning("missing", f"image missing: {shown}", "missing"),)
    else:
        try:
            found = tuple(check_sample(path, references))
        except (OSError, ValueError) as e:
            found = (SampleWarning("unreadable", f"image cannot be read ({e})", "unreadable"),)
    suffix = f" — {_shown(path, folder)}" if path is not None and path.is_file() else ""
    cell = Cell(step, prompt, cfg, seed, path, checkpoint, found, note)
    return cell, [f"{where}: {w.message}{suffix}" for w in found]


def _sampled_file(
    step: int, item: dict[str, Any], folder: Path, files: dict[Path, Any]
) -> tuple[str | None, str | None]:
    """The name of the file a sample was made from, while it holds those weights; else None and why not."""
    if not item.get("checkpoint") or step == 0:
        return None, None
    path = checkpoint_path(str(item["checkpoint"]), folder)
    check = check_recorded(path, step, item, files)
    return (path.name, None) if check.holds else (None, check.note)


def _summary(step: int, row: list[Cell], lines: list[str]) -> StepSummary:
    """The row of ``step`` from its cells; a line added to ``lines`` when every sample of it is broken."""
    images = [c for c in row if c.path is not None and not any(w.kind in ("missing", "unreadable") for w in c.warnings)]
    broken = [c for c in images if any(w.kind in BROKEN for w in c.warnings)]
    checkpoint = next((c.checkpoint for c in row if c.checkpoint), None)
    note = None if checkpoint else next((c.file_note for c in row if c.file_note), None)
    warnings = sum(len(c.warnings) for c in row)
    if images and len(broken) == len(images):
        lines.append(
            f"{_step_text(step)}: every sample is black, flat or NaN: the weights are broken; do not use this file"
        )
    return StepSummary(step, checkpoint, len(images), len(row) - len(images), warnings, bool(broken), file_note=note)


def _with_figures(rv: Review, figures: Figures) -> Review:
    """``rv`` with the run's held-out figures: on each step's summary, ranked, and the recommendation."""
    by_step = {r.step: r for r in figures.rows}
    summaries = []
    for s in rv.steps:
        r = by_step.get(s.step)
        summaries.append(
            s
            if r is None
            else dataclasses.replace(
                s, held_out_loss=r.held_out_loss, class_loss=r.class_loss, class_drift=r.class_drift
            )
        )
    loss_ranking = None
    if figures.has_held_out:  # the steps a file on disk holds: passes between files are a curve, not candidates
        loss_ranking = loss_order(figures.on_file(), {s.step for s in rv.steps if s.broken})
    recommended, recommendation = recommend(figures, {s.step: s for s in rv.steps})
    return dataclasses.replace(
        rv,
        steps=tuple(summaries),
        validation=figures.manifest,
        figures=figures.rows,
        held_out_folder=figures.held_out_folder,
        held_out_images=figures.held_out_images,
        class_folders=figures.class_folders,
        loss_ranking=loss_ranking,
        recommended=recommended,
        recommendation=recommendation,
        dropped=figures.dropped,
    )
