"""``plan(cfg)``: the dry run. Every check, the device, the exact arguments and the step math, with no model loaded.

The checks are the preflight's rules (``spyke_lora/_preflight/``); this module runs them and puts what they found,
and what the run will do, in a :class:`Plan` (``_data``), whose text is written by ``_text``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .. import _engine
from .._config import TrainConfig
from .._errors import ConfigError, SpykeLoraError
from .._launch import AloneOnRankZero, Launch, alone_on_rank_zero, resolve_launch
from .._memory import MemoryBudget
from .._preflight import (
    INPUT_RULES,
    RUN_RULES,
    CheckContext,
    bytes_per_file,
    caption_example,
    count_captions,
    list_images,
    run_rules,
)
from ._data import Plan, SubsetPlan, ValidationPlan

__all__ = ["Plan", "SubsetPlan", "ValidationPlan", "plan"]


def plan(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    memory_budget: MemoryBudget | None = None,
    processes: int | None = None,
    launch: Launch | None = None,
) -> Plan:
    """Check ``cfg`` and compute what its run will do, without loading a model.

    Checks the base model's header, every image and caption, the output folder and the device policy, counts the
    steps as sd-scripts does, and predicts the run's peak memory against the device's budget (resolving
    ``gradient_checkpointing = "auto"``).

    Args:
        cfg: The run's config.
        resume: ``"latest"`` or a state folder: plan the continuation of a run saved with ``save_state``. The state
            must come from the same training (config and dataset).
        memory_budget: Replaces the device's own budget (``device_budget``), e.g. to plan for another machine.
            ``memory_limit`` still caps it.
        processes: Plan a run of this many processes: the step math for that world size (each process takes its
            share of an epoch's batches), and on the CPU each process's share of the memory budget.
        launch: For several machines, instead of ``processes``: the run's :class:`Launch`.

    Returns:
        The :class:`Plan`: device, arguments, step math, checkpoints, memory, disk and every warning.

    Raises:
        ConfigError: Listing every problem found: the inputs' first (files, folders, settings, a resume, earlier
            outputs); when they pass, the run's (a peak over ``memory_limit``, nothing left to resume, the disk).
        DeviceError: The device cannot run the config.
    """
    launch = resolve_launch(processes, launch)
    device = _engine.device_choice(cfg)  # DeviceError: the machine, not the data
    ctx = CheckContext(cfg, device, launch, resume, memory_budget)
    found = run_rules(INPUT_RULES, ctx)
    if found.problems:
        raise ConfigError(found.problems)
    with _only_spyke_lora_errors("counting the steps with sd-scripts' dataset code"):
        ctx.count  # noqa: B018 -- once, here: a ConfigError from sd-scripts' dataset code is the run's only problem
    run_rules(RUN_RULES, ctx, found)  # sd-scripts counts the steps of folders that passed
    if found.problems:
        raise ConfigError(found.problems)
    with _only_spyke_lora_errors("assembling the plan"):
        return _assemble(ctx, tuple(found.warnings))


@contextlib.contextmanager
def _only_spyke_lora_errors(doing: str) -> Iterator[None]:
    """What plan() does outside a rule raises only SpykeLoraErrors: anything else becomes a ConfigError saying what
    was being done (the original chained)."""
    try:
        yield
    except SpykeLoraError:
        raise
    except Exception as e:  # noqa: BLE001 -- the contract: only SpykeLoraErrors leave plan()
        raise ConfigError(
            f"planning failed while {doing}: {type(e).__name__}: {e}; fix what it names, or report it with this "
            f"message if it names nothing you gave"
        ) from e


def _assemble(ctx: CheckContext, warnings: tuple[str, ...]) -> Plan:
    """The :class:`Plan` of a context whose checks passed."""
    cfg, device, count, state = ctx.run_cfg, ctx.device, ctx.count, ctx.resumed.value
    validation = _validation_plan(ctx)
    alone = _alone(ctx, validation)
    if alone is not None and alone.ddp_timeout is not None:  # CUDA: the other ranks wait this long for rank 0
        cfg = cfg.replace(extra_args={**cfg.extra_args, "ddp_timeout": alone.ddp_timeout})
    captions = {f.folder: count_captions(f, cfg) for f in ctx.dataset.value}
    shown = {f.folder: caption_example(f, cfg) for f in ctx.dataset.value}
    files = len(ctx.checkpoints) + 1
    return Plan(
        device=device.device,
        mixed_precision=device.mixed_precision,
        corrections=device.corrections,
        base_model=cfg.base_model,
        model_family=ctx.model.value,
        argv=tuple(_engine.build_argv(cfg, device, state.path if state else None)),
        subsets=tuple(
            SubsetPlan(s.folder, s.images, captions.get(s.folder, 0), s.repeats, s.is_reg, shown.get(s.folder, ""))
            for s in count.subsets
        ),
        batches_per_epoch=count.batches_per_epoch,
        steps_per_epoch=count.steps_per_epoch,
        epochs=count.epochs,
        total_steps=count.total_steps,
        checkpoints=tuple((step, cfg.output_dir / name) for step, name in ctx.checkpoints),
        final_path=cfg.output_dir / count.final_name,
        estimated_disk_bytes=int(files * bytes_per_file(cfg)),
        warnings=warnings,
        samples_per_checkpoint=len(cfg.sample_prompts) * len(cfg.sample_cfg_scales),
        sample_summary=_sample_summary(cfg),
        resume_from=state.path if state else None,
        resume_step=ctx.done,
        validation=validation,
        memory=ctx.memory,
        alone=alone,
        launch=ctx.launch,
        train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=int(cfg.extra_args.get("gradient_accumulation_steps", 1) or 1),
    )


def _alone(ctx: CheckContext, validation: ValidationPlan | None) -> AloneOnRankZero | None:
    """What rank 0 of a multi-process run samples and validates alone after each file (None: one process, or
    nothing), and the collective timeout that lets the other ranks wait for it."""
    cfg = ctx.cfg
    if not ctx.launch.multi_process:
        return None
    held_out = validation.images if validation is not None else 0
    if held_out and cfg.max_validation_steps:
        held_out = min(held_out, cfg.max_validation_steps * cfg.train_batch_size)
    samples = len(cfg.sample_prompts) * len(cfg.sample_cfg_scales)
    size = cfg.sample_size or cfg.resolution
    return alone_on_rank_zero(
        ctx.device.device, samples, cfg.sample_steps, size, held_out, cfg.extra_args.get("ddp_timeout")
    )


def _validation_plan(ctx: CheckContext) -> ValidationPlan | None:
    """Which steps get a validation pass: every saved file's, or every ``validate_every_n_steps`` and the last."""
    cfg, count, held_out = ctx.cfg, ctx.count, ctx.held_out
    if held_out is None and not cfg.validation_split:
        return None
    every, total = cfg.validate_every_n_steps, count.total_steps
    saved = [step for step, _ in count.checkpoints]
    steps = tuple(sorted({s for s in (range(every, total + 1, every) if every else saved) if s > ctx.done} | {total}))
    seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
    if held_out is None:  # validation_split: the images sd-scripts' own split holds out of train_dir
        paths = count.held_out
        return ValidationPlan(cfg.train_dir, len(paths), steps, seed, paths, cfg.validation_split)
    paths = tuple(sorted(list_images(held_out.folder, ctx.extensions, ctx.cfg.sd_scripts_dir)))
    return ValidationPlan(held_out.folder, len(paths), steps, seed, paths)


def _sample_summary(cfg: TrainConfig) -> str:
    """What sampling makes, in one line (see ``Plan.sample_summary``); "" when sampling is off."""
    if not cfg.sample_prompts:
        return ""
    scales = ", ".join(f"{s:g}" for s in cfg.sample_cfg_scales)
    return (
        f"{len(cfg.sample_prompts)} prompts x CFG {scales} ({cfg.sample_steps} steps, {cfg.sample_sampler}, "
        f"{cfg.sample_size or cfg.resolution} px, seed {cfg.sample_seed})"
    )
