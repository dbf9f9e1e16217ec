"""Ranking the checkpoints: with a scorer, a score per step, best first; without one, by the run's held-out loss,
lowest first; broken steps last either way (:func:`rank_checkpoints`).

A ranking flags broken checkpoints and drift; it does not choose the checkpoint: see docs/choosing.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import ConfigError
from ._review import review
from ._sample_checks import PathLike
from ._scorers import Scorer

__all__ = ["rank_checkpoints"]


def rank_checkpoints(
    run_dir: PathLike,
    scorer: Scorer | None = None,
    name: str | None = None,
    train_images: PathLike | Sequence[PathLike] | None = None,
) -> list[tuple[int, float]]:
    """Rank a run's checkpoints by a scorer, or by the run's held-out loss.

    A ranking flags broken checkpoints and drift; it does not choose the checkpoint: see docs/choosing.md.

    Args:
        run_dir: the run's ``output_dir``, or its ``NAME.samples.jsonl`` itself.
        scorer: called once per step with all that step's sample images and the training images, higher is better.
            None: rank by the held-out loss in the run's ``NAME.validation.jsonl``.
        name: the run's ``output_name``, when the folder holds the samples of several runs.
        train_images: image files or folders the scorer compares with (see :func:`review`).

    Returns:
        With a ``scorer``: ``(step, score)`` for every checkpoint with samples, best first. Without one: ``(step,
        held-out loss)`` for every step measured (with samples or not), lowest loss first. Either way steps with a
        black, flat or NaN sample come last whatever their figure (non-finite losses too), and the base model (step
        0) is not ranked.

    Raises:
        ConfigError: the run has no samples manifest, or (without a ``scorer``) no held-out figures to rank by.
    """
    rv = review(run_dir, name, train_images=train_images, scorer=scorer)
    if scorer is not None:
        return list(rv.ranking or ())
    if rv.loss_ranking is None:
        raise ConfigError(
            f"{rv.run_dir} has no held-out figures to rank by ({rv.name}.validation.jsonl: set `validation_dir` in "
            "training, or measure the saved files with validation_loss(files, cfg)); or give a scorer, e.g. "
            "rank_checkpoints(run_dir, ColourHistogramScorer())"
        )
    return list(rv.loss_ranking)
