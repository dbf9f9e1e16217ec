"""The likeness rows: a :class:`LikenessCell` per sample, a :class:`LikenessRow` per checkpoint (and the base and
ceiling reference rows), and :class:`Likeness`, the whole run. Plain data: :func:`~spyke_lora.likeness` fills them
in; docs/choosing.md ("Likeness") says what each figure is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

__all__ = ["Kind", "Likeness", "LikenessCell", "LikenessCopy", "LikenessRow"]

Kind = Literal["base", "checkpoint", "ceiling"]


@dataclasses.dataclass(frozen=True)
class LikenessCopy:
    """A sample whose nearest training image (by DINO) is closer than the training images are to each other.

    ``similarity``: the DINO cosine between ``sample`` and ``image``; ``threshold``: the training images' own
    nearest-neighbour similarity it beat (the highest of them: see docs/choosing.md)."""

    sample: Path
    image: Path  # the nearest training image
    similarity: float
    threshold: float


@dataclasses.dataclass(frozen=True)
class LikenessCell:
    """One sample of one checkpoint (one prompt x CFG cell), scored.

    ``dino`` and ``clip_i``: the mean cosine to the reference images (DINO [CLS], CLIP image embeddings);
    ``clip_t``: the cosine to the CLIP-T prompt's text embedding (the prompt with the trigger replaced by the class
    word); ``copy``: the training image it copies, if any."""

    step: int
    prompt: str  # the prompt as sampled (with the trigger)
    cfg_scale: float
    sample: Path
    dino: float
    clip_i: float
    clip_t: float
    copy: LikenessCopy | None
    seed: int | None = None
    clip_t_prompt: str = ""  # the text CLIP-T compared the sample with


@dataclasses.dataclass(frozen=True)
class LikenessRow:
    """One row: a checkpoint (``kind`` "checkpoint"), the base model's samples (``"base"``, step 0: the floor) or the
    character's own images (``"ceiling"``, step None: held-out images against the training images, or the training
    images against each other).

    ``dino``, ``clip_i``, ``clip_t``: means over the row's images (None when ``samples`` is 0; ``clip_t`` None for the
    ceiling: real images have no prompt); ``*_se``: their standard errors (the sample standard deviation over
    sqrt(n); None below 2 images). ``held_out_loss`` and ``class_drift``: the step's held-out figures, when the run
    measured them (the review's)."""

    kind: Kind
    step: int | None  # 0 for "base", None for "ceiling"
    checkpoint: Path | None  # the LoRA file on disk ("checkpoint" rows); None otherwise
    samples: int  # how many images were scored (0: the checkpoint has no samples: reported)
    dino: float | None
    clip_i: float | None
    clip_t: float | None
    dino_se: float | None
    clip_i_se: float | None
    clip_t_se: float | None
    copies: tuple[LikenessCopy, ...]
    cells: tuple[LikenessCell, ...]
    note: str  # "" or why the row is as it is ("no samples", "the base model's samples", ...)
    held_out_loss: float | None = None
    class_drift: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        """How the row is named in the table and the reason: "step 600", "base", "own images"."""
        if self.kind == "base":
            return "base"
        if self.kind == "ceiling":
            return "own images"
        return f"step {self.step}"


def _figure(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if se is None else f"{value:.3f}±{se:.3f}"


@dataclasses.dataclass(frozen=True)
class Likeness:
    """A run's likeness: every checkpoint's samples scored against the character's images (DINO, CLIP-I), against
    their prompts (CLIP-T), and checked for copies, with the base model's samples (the floor) and the character's own
    images (the ceiling) as references, and the one file recommended with its ``reason`` in words.

    ``recommended`` is always a row whose ``checkpoint`` is a file on disk, or None (``reason`` says why)."""

    name: str  # the run's output_name
    run_dir: Path
    rows: tuple[LikenessRow, ...]  # the checkpoint rows, in step order
    base: LikenessRow | None  # None only when the base samples cannot be made/found (said in reason)
    ceiling: LikenessRow
    recommended: LikenessRow | None
    reason: str
    dino_model: str  # what was loaded (folder or hub id)
    clip_model: str
    copy_threshold: float | None = None  # the training images' highest nearest-neighbour DINO similarity
    reference: tuple[Path, ...] = ()  # the images DINO and CLIP-I compare samples with
    train_images: tuple[Path, ...] = ()  # the images copies are looked for among

    def table(self) -> str:
        """The rows as text: step, held-out loss, class drift, DINO, CLIP-I, CLIP-T, copies (base first, the ceiling
        last, the recommended file marked ``*``), then the reason."""
        header = ("", "step", "held-out", "drift", "DINO", "CLIP-I", "CLIP-T", "copies", "samples", "file / note")
        lines: list[tuple[str, ...]] = [header]
        ordered = ([self.base] if self.base else []) + list(self.rows) + [self.ceiling]
        for row in ordered:
            drift = max((d for _, d in row.class_drift), default=None)
            mark = "*" if self.recommended is not None and row is self.recommended else ""
            what = row.checkpoint.name if row.checkpoint is not None else ""
            lines.append(
                (
                    mark,
                    row.label if row.kind != "checkpoint" else str(row.step),
                    "-" if row.held_out_loss is None else f"{row.held_out_loss:.4f}",
                    "-" if drift is None else f"{drift:+.4f}",
                    _figure(row.dino, row.dino_se),
                    _figure(row.clip_i, row.clip_i_se),
                    _figure(row.clip_t, row.clip_t_se),
                    str(len(row.copies)) if row.kind != "ceiling" else "-",
                    str(row.samples),
                    "; ".join(p for p in (what, row.note) if p),
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
        text.append(f"recommended: {self.reason}")
        return "\n".join(text)
