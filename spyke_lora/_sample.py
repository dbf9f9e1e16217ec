"""``sample(checkpoints, cfg)``: sample LoRA files already on disk, exactly as a training run samples its own."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import _engine
from ._config import TrainConfig
from ._errors import ConfigError
from ._header import check_base_model, inspect_model
from ._train import Callback, engine_log_path
from ._user_warnings import warn_caller
from .events import Event, SampleSaved

__all__ = ["sample"]


def sample(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    cfg: TrainConfig,
    callbacks: Iterable[Callback] | Callback = (),
    *,
    engine_log: str | os.PathLike[str] | None = "auto",
    base_only: bool = False,
) -> tuple[SampleSaved, ...]:
    """Sample LoRA files already on disk, exactly as a training run with ``cfg`` samples its own.

    ``cfg``'s ``sample_prompts``, ``sample_cfg_scales``, ``sample_seed``, steps, size and sampler, on
    ``cfg.base_model``, with sd-scripts' own sampler: the images a run with ``cfg`` made of the same file, so
    checkpoints from different runs (or new prompts) can be compared on equal terms. Images go to
    ``cfg.output_dir/sample``, one line each in the run's ``NAME.samples.jsonl`` (the newest line for a step, prompt
    and scale wins, so a contact sheet shows the latest).

    Args:
        checkpoints: LoRA files, or a folder (its LoRA files named ``cfg.output_name``, in step order). Each file's
            step is its ``ss_steps`` metadata.
        cfg: the config to sample with; ``cfg.sample_at_first`` adds the base model alone as step 0.
        callbacks: one callable or several, given every :class:`~spyke_lora.SampleSaved` event.
        engine_log: as for :func:`~spyke_lora.train`.
        base_only: sample the base model alone (step 0: the same prompts and seeds with no LoRA) and none of the
            files, which give the network's shape only: the floor :func:`~spyke_lora.likeness` compares with.

    Returns:
        The :class:`~spyke_lora.SampleSaved` events, in order.

    Raises:
        ConfigError: ``sample_prompts`` is empty, a checkpoint is not a LoRA file (every one is named at once), or
            the base model cannot be read.
    """
    with _engine.preserved_random_state():
        try:
            return _sample(checkpoints, cfg, callbacks, engine_log, base_only)
        finally:
            _engine.free_memory()


def _sample(checkpoints, cfg: TrainConfig, callbacks, engine_log, base_only=False) -> tuple[SampleSaved, ...]:
    started_at = time.perf_counter()
    callbacks = (callbacks,) if callable(callbacks) else tuple(callbacks)
    files = _files(checkpoints, cfg)
    check_base_model(cfg.base_model)
    plan = _engine.device_choice(cfg)
    for note in plan.corrections:
        warn_caller(note)
    made: list[SampleSaved] = []

    def emit(event: Event) -> None:
        if isinstance(event, SampleSaved):
            made.append(event)
        for callback in callbacks:
            callback(event)

    _engine.sample_checkpoints(
        cfg, plan, files, emit, started_at, engine_log_path(engine_log, cfg), base_only=base_only
    )
    return tuple(made)


def _files(checkpoints, cfg: TrainConfig) -> list[tuple[int, Path]]:
    if not cfg.sample_prompts:
        raise ConfigError("`sample_prompts` is empty, so there is nothing to sample; give at least one prompt")
    return checkpoint_files(checkpoints, cfg, "sampled")


def checkpoint_files(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], cfg: TrainConfig, verb: str
) -> list[tuple[int, Path]]:
    """The LoRA files to sample or validate, one per step.

    Args:
        checkpoints: LoRA files, or folders of ``cfg.output_name``'s files.
        cfg: the run's config.
        verb: what is done to them ("sampled"), for the warning about two files of one step.

    Returns:
        ``(step, path)`` in step order; a file without ``ss_steps`` gets its position, with a warning.

    Raises:
        ConfigError: a folder holds no LoRA file of ``cfg.output_name``, or files are not LoRA files (all named).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths: list[Path] = []
    for item in checkpoints:
        path = Path(item).expanduser().absolute()
        if path.is_dir():
            found = _engine.existing_outputs(cfg.replace(output_dir=path))
            if not found:
                raise ConfigError(f"{path} holds no LoRA file named `{cfg.output_name}`; pass the files themselves")
            paths += found
        else:
            paths.append(path)
    problems, files, seen = [], [], {}
    for position, path in enumerate(paths, 1):
        try:
            info = inspect_model(path)
        except ConfigError as e:
            problems += [p.replace("`base_model` ", "checkpoint ") for p in e.problems]
            continue
        if info.family != "lora":
            problems.append(f"checkpoint {str(path)!r} is {info.description}, not a LoRA file")
            continue
        step_text = info.metadata.get("ss_steps", "")
        step = int(step_text) if step_text.isdigit() else position
        if not step_text.isdigit():
            warn_caller(f"{path.name} has no ss_steps metadata: it is shown as step {step}")
        if step in seen:  # NAME-step00000920 and NAME (the final file) of one run are the same weights
            warn_caller(f"{path.name} is step {step} like {seen[step].name}: {verb} once")
            continue
        seen[step] = path
        files.append((step, path))
    if problems:
        raise ConfigError(problems)
    return sorted(files)
