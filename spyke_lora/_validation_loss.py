"""``validation_loss(checkpoints, cfg, folder=None)``: the held-out loss of LoRA files already on disk."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from . import _engine
from ._config import TrainConfig
from ._errors import ConfigError
from ._header import check_base_model
from ._preflight import check_folder
from ._sample import checkpoint_files
from ._train import engine_log_path
from ._user_warnings import warn_caller

__all__ = ["HeldOutLoss", "validation_loss"]


@dataclasses.dataclass(frozen=True)
class HeldOutLoss:
    """The held-out loss of one LoRA file (``checkpoint``; None: the base model alone, as step 0) on ``folder``."""

    step: int
    checkpoint: Path | None
    loss: float
    folder: Path
    images: int


def validation_loss(
    checkpoints: str | os.PathLike[str] | None | Sequence[str | os.PathLike[str] | None],
    cfg: TrainConfig,
    folder: str | os.PathLike[str] | None = None,
    *,
    engine_log: str | os.PathLike[str] | None = "auto",
) -> tuple[HeldOutLoss, ...]:
    """The validation loss of LoRA files on held-out images, as a training run with ``cfg`` measures it.

    The same images, timesteps, seed and sd-scripts code as the run's own passes
    (:class:`~spyke_lora.events.ValidationEnded`), so a file's figure here is the one its run reported. When the
    run's folder exists, each figure is also a line of its ``NAME.validation.jsonl``, which :func:`review` reads.

    Args:
        checkpoints: LoRA files, folders (their files named ``cfg.output_name``), and None for the base model alone
            (step 0: the reference a LoRA's figures compare with).
        cfg: the run's config.
        folder: any folder of captioned images; None: ``cfg.validation_dir`` (or ``train_dir``'s held-out part
            with ``validation_split``). A folder of class images ("1girl, ...") measures how far each file has
            pulled the class away from the base model (class drift).
        engine_log: as for :func:`~spyke_lora.train`.

    Returns:
        One :class:`HeldOutLoss` per file, in step order (the base model first).

    Raises:
        ConfigError: nothing to measure, no held-out images (no ``folder`` and no ``validation_dir``), a problem in
            the folder's images or captions, or a checkpoint that is not a LoRA file.
    """
    with _engine.preserved_random_state():
        try:
            return _validation_loss(checkpoints, cfg, folder, engine_log)
        finally:
            _engine.free_memory()


def _validation_loss(checkpoints, cfg: TrainConfig, folder, engine_log) -> tuple[HeldOutLoss, ...]:
    items = [checkpoints] if checkpoints is None or isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not items:
        raise ConfigError("nothing to measure: give LoRA files (or a run folder), and None for the base model alone")
    if folder is not None:
        where = Path(folder).expanduser().absolute()
    elif cfg.validation_dir is not None or cfg.validation_split:
        where = cfg.validation_dir or cfg.train_dir  # validation_split: train_dir's held-out part
    else:
        raise ConfigError(
            "no held-out images: `validation_dir` is not set; pass folder= (a folder of captioned images the "
            "LoRA was not trained on) or set `validation_dir`"
        )
    held_out = _engine.Folder(where, 1, False, cfg.caption_extension, None, "held-out")
    problems, _ = check_folder(held_out, cfg, _engine.image_extensions(cfg))
    if problems:
        raise ConfigError(problems)
    base = any(item is None for item in items)
    files = (
        checkpoint_files([item for item in items if item is not None], cfg, "validated") if len(items) > base else []
    )
    check_base_model(cfg.base_model)
    plan = _engine.device_choice(cfg)
    for note in plan.corrections:
        warn_caller(note)
    steps = {path: step for step, path in files}
    ordered: list[Path | None] = ([None] if base else []) + [path for _, path in files]
    results: list[HeldOutLoss] = []

    manifest = _engine.validation_manifest_path(cfg)

    def report(path: Path | None, loss: float, images: int) -> None:
        figure = HeldOutLoss(steps.get(path, 0) if path else 0, path, loss, where, images)
        results.append(figure)
        if manifest.parent.is_dir():  # the run's folder: review() and compare read the figures there
            own = folder is None or where == cfg.validation_dir  # the config's held-out images, not another folder
            _engine.append_validation(manifest, figure.step, path, where, loss, images, own)

    _engine.validate_checkpoints(
        cfg, plan, ordered, None if folder is None else where, report, engine_log_path(engine_log, cfg)
    )
    return tuple(results)
