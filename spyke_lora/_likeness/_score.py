"""``likeness(run_dir)``: every checkpoint's samples scored against the character's images, as the DreamBooth paper
scores subject-driven generation (docs/choosing.md, "Likeness").

The samples are the review's (:func:`~spyke_lora.review`: ``NAME.samples.jsonl``, the newest line per step, prompt
and CFG scale, a file named only while it still holds the weights sampled). Per sample:

* **DINO**: the mean cosine between its DINO ``[CLS]`` embedding and each reference image's;
* **CLIP-I**: the same with CLIP image embeddings;
* **CLIP-T**: the cosine between its CLIP image embedding and the CLIP text embedding of its CLIP-T prompt, the
  prompt as sampled with the trigger replaced by the class word (``spyke_plasma_v1, standing in a forest`` ->
  ``person, standing in a forest`` for a run whose class folder is ``1_person``);
* **copy**: its nearest training image by DINO, when it is closer than any two training images are to each other
  (the highest of the training images' nearest-neighbour similarities, at most :data:`COPY_CAP`).

The reference images are the training images (the character as the LoRA was taught). The rows of references: the
base model's samples (step 0, the same prompts and seeds with no LoRA: the floor), made once with :func:`sample`
when the run has none and cached in the run folder as its step-0 samples; the ceiling, the character's own images:
the held-out images against the training images when the run has a held-out set, else each training image against
the others.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._compare import Review, checkpoint_path, review
from .._config import TrainConfig, repeats_from_folder_name, tomllib
from .._engine import checkpoint_identity
from .._errors import ConfigError, SpykeLoraError
from .._user_warnings import warn_caller
from ._models import DEFAULT_CLIP, DEFAULT_DINO, LikenessEncoders, load_clip, load_dino
from ._recommend import recommend
from ._rows import Likeness, LikenessCell, LikenessCopy, LikenessRow

__all__ = ["COPY_CAP", "clip_t_prompt", "likeness"]

COPY_CAP = 0.99  # a copy threshold never above this: a training set with duplicate images still flags exact copies
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PathLike = str | os.PathLike[str]


def likeness(
    run_dir: PathLike,
    *,
    dino: str = DEFAULT_DINO,
    clip: str = DEFAULT_CLIP,
    name: str | None = None,
    train_images: PathLike | Sequence[PathLike] | None = None,
    encoders: LikenessEncoders | None = None,
    class_word: str | None = None,
    make_base: bool = True,
) -> Likeness:
    """Score every checkpoint's samples for likeness (DINO, CLIP-I), prompt fidelity (CLIP-T) and copies, with the
    base model's samples and the character's own images as references, and recommend one file.

    Args:
        run_dir: the run's ``output_dir`` (or its ``NAME.samples.jsonl``).
        dino: the DINO model, a transformers folder or hub id (default ``facebook/dino-vits16``).
        clip: the CLIP model, a transformers folder or hub id (default ``openai/clip-vit-base-patch32``).
        name: the run's ``output_name``, when the folder holds several runs.
        train_images: the character's training images (files or folders); None: the run's ``train_dir`` (its
            ``NAME.config.toml``).
        encoders: scorers to use instead of loading ``dino`` and ``clip`` (:class:`LikenessEncoders`).
        class_word: the word that replaces the trigger in the CLIP-T prompt; None: the name of the run's class
            (regularisation) folder (``1_person`` -> ``person``), else the trigger is left out.
        make_base: when the run has no step-0 samples, make them once with :func:`~spyke_lora.sample` (the run's
            ``NAME.config.toml`` and base model are needed); False: go without the base row.

    Returns:
        The :class:`Likeness`: a row per checkpoint (one without samples reported, with ``samples`` 0), the base and
        ceiling rows, the recommended file and why.

    Raises:
        ConfigError: the run folder has no samples, no training image is found, a model's files are not here (named,
            with how to fetch them), or an image cannot be read.
    """
    rv = review(run_dir, name, train_images=train_images)
    if rv.manifest is None:
        raise ConfigError(
            f"{rv.run_dir} has no {rv.name}.samples.jsonl, so there are no samples to score for likeness; sample the "
            "saved files with `spyke-lora sample`, or train with `sample_prompts` set"
        )
    train = list(rv.train_images)
    if not train:
        raise ConfigError(
            f"no training image found for {rv.name} (its {rv.name}.config.toml's train_dir is gone or empty); give "
            "the character's images with train_images= (--train-images)"
        )
    base_note = ""
    if not _has_base(rv) and make_base:
        rv, base_note = _make_base(rv, train_images)
    elif not _has_base(rv):
        base_note = (
            "no base samples (step 0): likeness(make_base=True) or `spyke-lora compare --likeness` makes them once"
        )
    trigger, found_class = _words(rv)
    word = class_word if class_word is not None else found_class
    held_out = _held_out_images(rv)
    if encoders is None:
        encoders = LikenessEncoders(load_dino(dino), load_clip(clip))
    return _score(rv, train, held_out, encoders, trigger, word, base_note)


def clip_t_prompt(prompt: str, trigger: str | None, class_word: str) -> str:
    """The text a sample's CLIP-T compares it with: ``prompt`` with the trigger replaced by ``class_word`` (or left
    out when ``class_word`` is ""), the commas left tidy.

    Args:
        prompt: the prompt as sampled.
        trigger: the run's trigger word (None: the prompt as it is).
        class_word: what the trigger stands for ("person", "1girl"), or "".

    Returns:
        The CLIP-T prompt.
    """
    if not trigger:
        return prompt
    text = re.sub(rf"(?<![\w]){re.escape(trigger)}(?![\w])", class_word, prompt)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,")


def _has_base(rv: Review) -> bool:
    return any(c.step == 0 and c.path is not None and c.path.is_file() for c in rv.cells)


def _config(rv: Review) -> TrainConfig | None:
    path = rv.run_dir / f"{rv.name}.config.toml"
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_toml(path)
    except ConfigError:
        return None


def _make_base(rv: Review, train_images: Any) -> tuple[Review, str]:
    """The review again after the base model's samples are made (once: they are the run's step-0 samples after);
    or the review as it was and why they could not be made."""
    from .._sample import sample

    cfg = _config(rv)
    files = sorted(
        (c.step, checkpoint_path(c.checkpoint, rv.run_dir)) for c in rv.cells if c.checkpoint and c.step != 0
    )
    if cfg is None or not files:
        why = f"no {rv.name}.config.toml to sample with" if cfg is None else "no LoRA file on disk to sample with"
        return rv, f"no base samples (step 0): {why}"
    prompts = tuple(dict.fromkeys(p for p, _ in rv.columns))
    scales = tuple(dict.fromkeys(s for _, s in rv.columns))
    cfg = cfg.replace(output_dir=rv.run_dir, sample_prompts=prompts, sample_cfg_scales=scales)
    try:
        sample(files[0][1], cfg, base_only=True)
    except SpykeLoraError as e:
        warn_caller(f"the base model's samples could not be made ({e}); likeness goes without the base row")
        return rv, f"no base samples (step 0): {e}"
    return review(rv.run_dir, rv.name, train_images=train_images), ""


def _words(rv: Review) -> tuple[str | None, str]:
    """The run's trigger (its training folder's name after ``N_``) and class word (its class folder's), from its
    ``NAME.config.toml``; else the first comma-separated word all prompts share, and ""."""
    data: dict[str, Any] = {}
    try:
        data = tomllib.loads((rv.run_dir / f"{rv.name}.config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    trigger = _folder_word(data.get("train_dir"))
    word = _folder_word(data.get("reg_dir")) or ""
    if trigger is None:
        firsts = {p.split(",")[0].strip() for p, _ in rv.columns}
        only = next(iter(firsts)) if len(firsts) == 1 else ""
        trigger = only if only and " " not in only else None
    return trigger, word


def _folder_word(value: Any) -> str | None:
    if not isinstance(value, str) or value.lower() == "none":
        return None
    found = repeats_from_folder_name(Path(value).name)
    return found[1] if found else None


def _held_out_images(rv: Review) -> list[Path]:
    """The run's held-out images (its validation folder's), or none."""
    folder = rv.held_out_folder
    if folder is None:
        try:
            data = tomllib.loads((rv.run_dir / f"{rv.name}.config.toml").read_text(encoding="utf-8"))
            value = data.get("validation_dir")
            if isinstance(value, str) and value.lower() != "none":
                folder = Path(os.path.normpath(rv.run_dir / Path(value).expanduser()))
        except (OSError, ValueError):
            return []
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(
        p
        for p in Path(folder).rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return mean, se


def _lora_files(folder: Path, name: str) -> dict[int, Path]:
    """``{step: file}`` of the run's LoRA files on disk (final, per-step and per-epoch names), by ``ss_steps``."""
    found: dict[int, Path] = {}
    for path in sorted(folder.glob(f"{name}*.safetensors")):
        rest = path.stem[len(name) :]
        if rest == "" or (rest.startswith("-step") and rest[5:].isdigit()) or (rest[:1] == "-" and rest[1:].isdigit()):
            steps = checkpoint_identity(path).get("ss_steps")
            if isinstance(steps, int) and steps not in found:
                found[steps] = path
    return found


def _score(
    rv: Review,
    train: list[Path],
    held_out: list[Path],
    encoders: LikenessEncoders,
    trigger: str | None,
    word: str,
    base_note: str,
) -> Likeness:
    readable = [c for c in rv.cells if c.path is not None and c.path.is_file()]
    images = list(dict.fromkeys([*train, *held_out, *(c.path for c in readable)]))
    index = {p: i for i, p in enumerate(images)}
    dino_all = encoders.dino.image_embeddings(images)
    clip_all = encoders.clip.image_embeddings(images)
    texts = {c.prompt: clip_t_prompt(c.prompt, trigger, word) for c in readable}
    unique = list(dict.fromkeys(texts.values()))
    text_all = encoders.clip.text_embeddings(unique) if unique else np.zeros((0, clip_all.shape[1]))
    text_row = {t: text_all[i] for i, t in enumerate(unique)}
    t_idx = [index[p] for p in train]
    dino_train, clip_train = dino_all[t_idx], clip_all[t_idx]
    threshold = _copy_threshold(dino_train)

    cells: dict[int, list[LikenessCell]] = {}
    for c in readable:
        assert c.path is not None
        d, ci = dino_all[index[c.path]], clip_all[index[c.path]]
        to_train = dino_train @ d
        nearest = int(np.argmax(to_train))
        copy = (
            LikenessCopy(c.path, train[nearest], float(to_train[nearest]), threshold)
            if float(to_train[nearest]) > threshold
            else None
        )
        cells.setdefault(c.step, []).append(
            LikenessCell(
                c.step,
                c.prompt,
                c.cfg_scale,
                c.path,
                float(np.mean(to_train)),
                float(np.mean(clip_train @ ci)),
                float(text_row[texts[c.prompt]] @ ci),
                copy,
                c.seed,
                texts[c.prompt],
            )
        )
    base = _row("base", 0, None, cells.get(0, []), "the base model's samples (no LoRA)") if 0 in cells else None
    on_disk = _lora_files(rv.run_dir, rv.name)
    rows = [_checkpoint_row(s, cells.get(s.step, []), rv.run_dir) for s in rv.steps if s.step != 0]
    sampled = {s.step for s in rv.steps}
    for step, path in sorted(on_disk.items()):
        if step not in sampled:
            rows.append(
                LikenessRow(
                    "checkpoint", step, path, 0, None, None, None, None, None, None, (), (),
                    "no samples: sample it with `spyke-lora sample`",
                )
            )  # fmt: skip
    rows.sort(key=lambda r: r.step or 0)
    ceiling = _ceiling(dino_all, clip_all, index, train, held_out)
    recommended, reason = recommend(rows, base, ceiling)
    if base is None and base_note:
        reason += f" ({base_note})"
    return Likeness(
        rv.name,
        rv.run_dir,
        tuple(rows),
        base,
        ceiling,
        recommended,
        reason,
        encoders.dino.name,
        encoders.clip.name,
        threshold,
        tuple(train),
        tuple(train),
    )


def _copy_threshold(dino_train: np.ndarray) -> float:
    """The highest DINO similarity of a training image to its nearest other training image, at most COPY_CAP (and
    COPY_CAP itself with one training image)."""
    if len(dino_train) < 2:
        return COPY_CAP
    sims = dino_train @ dino_train.T
    np.fill_diagonal(sims, -np.inf)
    return min(float(np.max(sims)), COPY_CAP)


def _row(kind: Any, step: int | None, checkpoint: Path | None, cells: list[LikenessCell], note: str) -> LikenessRow:
    dino, dino_se = _mean_se([c.dino for c in cells])
    clip_i, clip_i_se = _mean_se([c.clip_i for c in cells])
    clip_t, clip_t_se = _mean_se([c.clip_t for c in cells])
    copies = tuple(c.copy for c in cells if c.copy is not None)
    return LikenessRow(
        kind, step, checkpoint, len(cells), dino, clip_i, clip_t, dino_se, clip_i_se, clip_t_se, copies,
        tuple(cells), note,
    )  # fmt: skip


def _checkpoint_row(summary: Any, cells: list[LikenessCell], folder: Path) -> LikenessRow:
    """A checkpoint's row from the review's summary (its file, held-out figures, broken samples) and its cells."""
    path = checkpoint_path(summary.checkpoint, folder) if summary.checkpoint else None
    if path is not None and not path.is_file():
        path = None
    notes = []
    if summary.broken:
        notes.append("broken: a sample is black, flat or NaN")
    if summary.file_note:
        notes.append(summary.file_note)
    if not cells:
        notes.append("no samples: its images are missing")
    row = _row("checkpoint", summary.step, path, cells, "; ".join(notes))
    return dataclasses.replace(row, held_out_loss=summary.held_out_loss, class_drift=summary.class_drift)


def _ceiling(
    dino_all: np.ndarray, clip_all: np.ndarray, index: dict[Path, int], train: list[Path], held_out: list[Path]
) -> LikenessRow:
    """The character's own images: each held-out image against the training images, else each training image
    against the other training images (leave one out)."""
    t_idx = [index[p] for p in train]
    d_t, c_t = dino_all[t_idx], clip_all[t_idx]
    dinos, clips = [], []
    if held_out:
        for p in held_out:
            dinos.append(float(np.mean(d_t @ dino_all[index[p]])))
            clips.append(float(np.mean(c_t @ clip_all[index[p]])))
        note = f"{len(held_out)} held-out images against the {len(train)} training images"
    elif len(train) > 1:
        for i in range(len(train)):
            others = [j for j in range(len(train)) if j != i]
            dinos.append(float(np.mean(d_t[others] @ d_t[i])))
            clips.append(float(np.mean(c_t[others] @ c_t[i])))
        note = f"the {len(train)} training images against each other"
    else:
        note = "one training image and no held-out set: nothing to compare it with"
    dino, dino_se = _mean_se(dinos)
    clip_i, clip_i_se = _mean_se(clips)
    return LikenessRow("ceiling", None, None, len(dinos), dino, clip_i, None, dino_se, clip_i_se, None, (), (), note)
