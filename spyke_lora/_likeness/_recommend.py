"""The rule that picks one file by likeness, and its reason in words (docs/choosing.md, "Likeness").

1. Candidates: the checkpoint rows whose file is on disk, with samples, none broken and none a copy of a training
   image (when every candidate copies, the ones with the fewest copies stay, and the reason says so).
2. Prompt fidelity kept: a candidate's CLIP-T is not below the base model's by more than ``FIDELITY_MARGIN`` and
   ``Z`` standard errors of the difference (without base samples: the best candidate's). When none keeps it, the one with the highest
   CLIP-T is named, and the reason says every file loses prompt fidelity.
3. Among those, the highest DINO; every one whose DINO is within ``Z`` standard errors of the difference of it is
   "too close to tell apart" with the run's number of samples, and the earliest of them is recommended (fewer steps:
   less overfitting, and the figures cannot say the later one looks more like the character).
4. When the recommended file's DINO is within ``Z`` standard errors of the base model's, the reason says no file
   looks more like the character than the base model does (undertrained).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._rows import LikenessRow

__all__ = ["FIDELITY_MARGIN", "Z", "recommend"]

Z = 2.0  # two standard errors of a difference: about a 95% interval
# CLIP-T lower than the base model's by less than this is prompt fidelity kept, however many samples: the DreamBooth
# paper's methods differ by 0.005-0.05 (DreamBooth on SD 0.305, Textual Inversion 0.255), and a trained subject
# replacing the class word's picture costs some CLIP-T by design
FIDELITY_MARGIN = 0.02


def _se_diff(a: float | None, b: float | None) -> float:
    return math.sqrt((a or 0.0) ** 2 + (b or 0.0) ** 2)


def _apart(x: float, x_se: float | None, y: float, y_se: float | None) -> bool:
    """``x`` and ``y`` differ by more than ``Z`` standard errors of their difference (a 0.001 floor: exact ties
    from one sample each are ties)."""
    return abs(x - y) > max(Z * _se_diff(x_se, y_se), 0.001)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _signed(value: float) -> str:
    return f"{abs(value):.2f}"


def recommend(
    rows: Sequence[LikenessRow], base: LikenessRow | None, ceiling: LikenessRow
) -> tuple[LikenessRow | None, str]:
    """The checkpoint row to use and why, by the module's rule.

    Args:
        rows: the checkpoint rows, in step order (a row's ``note`` starting "broken" is not a candidate).
        base: the base model's row (None: no base samples; fidelity is then judged against the best file).
        ceiling: the character's own images' row.

    Returns:
        ``(row, reason)``: ``row`` is None only when no file on disk has scored samples (``reason`` says why).
    """
    scored = [r for r in rows if r.samples and r.dino is not None and r.clip_t is not None]
    on_disk = [r for r in scored if r.checkpoint is not None and r.checkpoint.is_file()]
    candidates = [r for r in on_disk if not r.note.startswith("broken")]
    if not candidates:
        why = (
            "no checkpoint has samples to score"
            if not scored
            else "no scored checkpoint's file is on disk"
            if not on_disk
            else "every checkpoint's samples are broken"
        )
        return None, f"no file recommended: {why}"
    notes: list[str] = []
    clean = [r for r in candidates if not r.copies]
    if not clean:
        fewest = min(len(r.copies) for r in candidates)
        clean = [r for r in candidates if len(r.copies) == fewest]
        notes.append(f"every file copies a training image in at least {fewest} sample(s)")
    if base is not None and base.clip_t is not None:
        floor, floor_se, against = base.clip_t, base.clip_t_se, "base"
    else:
        top = max(clean, key=lambda r: r.clip_t or 0.0)
        floor, floor_se, against = top.clip_t or 0.0, top.clip_t_se, f"step {top.step}"
    faithful = [
        r
        for r in clean
        if not (floor - (r.clip_t or 0.0) > FIDELITY_MARGIN and _apart(r.clip_t or 0.0, r.clip_t_se, floor, floor_se))
    ]
    if not faithful:
        pick = max(clean, key=lambda r: (r.clip_t or 0.0, -(r.step or 0)))
        notes.append(f"every file's CLIP-T is below the {against}'s ({_f(floor)}): each loses prompt fidelity")
    else:
        best = max(faithful, key=lambda r: (r.dino or 0.0, -(r.step or 0)))
        tied = [r for r in faithful if not _apart(r.dino or 0.0, r.dino_se, best.dino or 0.0, best.dino_se)]
        pick = min(tied, key=lambda r: r.step or 0)
        if len(tied) > 1:
            n = sorted({r.samples for r in tied})
            steps = ", ".join(str(r.step) for r in sorted(tied, key=lambda r: r.step or 0))
            notes.append(
                f"steps {steps} are too close to tell apart by DINO with {'/'.join(map(str, n))} samples each "
                f"(within {Z:g} standard errors); the earliest is recommended"
            )
    if (
        base is not None
        and base.dino is not None
        and not _apart(pick.dino or 0.0, pick.dino_se, base.dino, base.dino_se)
    ):
        notes.append("its DINO cannot be told apart from the base model's: the LoRA may be undertrained")
    return pick, _reason(pick, rows, base, ceiling, notes)


def _reason(
    pick: LikenessRow, rows: Sequence[LikenessRow], base: LikenessRow | None, ceiling: LikenessRow, notes: list[str]
) -> str:
    """``step 600: DINO 0.71 (base 0.42, own images 0.78) with CLIP-T 0.30 (base 0.31); later steps gain 0.01 DINO
    and lose 0.03 CLIP-T``, and the notes."""
    refs = []
    if base is not None and base.dino is not None:
        refs.append(f"base {_f(base.dino)}")
    if ceiling.dino is not None:
        refs.append(f"own images {_f(ceiling.dino)}")
    text = f"step {pick.step}: DINO {_f(pick.dino)}" + (f" ({', '.join(refs)})" if refs else "")
    text += f" with CLIP-T {_f(pick.clip_t)}"
    if base is not None and base.clip_t is not None:
        text += f" (base {_f(base.clip_t)})"
    later = [r for r in rows if r.samples and r.dino is not None and (r.step or 0) > (pick.step or 0)]
    if later:
        top = max(later, key=lambda r: r.dino or 0.0)
        gain = (top.dino or 0.0) - (pick.dino or 0.0)
        loss = (pick.clip_t or 0.0) - (top.clip_t or 0.0)
        text += (
            f"; later steps {'gain' if gain >= 0 else 'lose'} {_signed(gain)} DINO and "
            f"{'lose' if loss >= 0 else 'gain'} {_signed(loss)} CLIP-T"
            + (f" (step {top.step})" if len(later) > 1 else "")
        )
    if pick.copies:
        text += f"; {len(pick.copies)} of its samples copy a training image"
    file = pick.checkpoint.name if pick.checkpoint is not None else ""
    return text + (f"; {'; '.join(notes)}" if notes else "") + (f" — {file}" if file else "")
