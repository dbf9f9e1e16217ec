"""``plan(cfg)``: the dry run. Every check, the device, the exact arguments and the step math, with no model loaded."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path

from . import _engine
from ._config import TrainConfig, repeats_from_folder_name
from ._doctor import free_disk
from ._errors import ConfigError
from ._launch import Launch, resolve_launch
from ._memory import MemoryBudget, MemoryPlan, gib, memory_plan
from ._preflight import check_folder, config_warnings, held_out_problems

__all__ = ["Plan", "SubsetPlan", "ValidationPlan", "plan"]

# Measured: an SD1.5 LoRA of network_dim 32 saved as fp32 is 75.6 MB (792 tensors); size scales with dim.
_BYTES_PER_DIM_FP32 = 75_600_000 / 32
_SAVE_BYTES = {"float": 4, "fp16": 2, "bf16": 2}
_STATE_BYTES_PER_DIM = 3 * _BYTES_PER_DIM_FP32  # estimate, checked by a test: weights + AdamW's exp_avg, exp_avg_sq


@dataclasses.dataclass(frozen=True)
class SubsetPlan:
    """One dataset folder as the run reads it: its images, non-empty captions and repeats; ``is_reg`` for
    regularisation images."""

    folder: Path
    images: int
    captions: int
    repeats: int
    is_reg: bool


@dataclasses.dataclass(frozen=True)
class ValidationPlan:
    """The held-out images a run validates on, and the validation passes it will make."""

    folder: Path
    images: int
    steps: tuple[int, ...]  # the steps whose weights are validated (one pass each)
    seed: int
    paths: tuple[Path, ...] = ()  # the held-out images (with validation_split: those sd-scripts' split holds out)
    split: float = 1.0  # the fraction of ``folder`` held out: 1 for validation_dir, validation_split of train_dir


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``train(cfg)`` will do. ``str(plan)`` is a readable summary."""

    device: str
    mixed_precision: str
    corrections: tuple[str, ...]  # device-policy changes to the request, each with its reason
    base_model: Path
    model_family: str  # "sd1" or "sd2"
    argv: tuple[str, ...]  # the exact train_network.py arguments
    subsets: tuple[SubsetPlan, ...]
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    checkpoints: tuple[tuple[int, Path], ...]  # (step, file) of each step checkpoint
    final_path: Path
    estimated_disk_bytes: int
    warnings: tuple[str, ...]  # everything worth knowing that does not stop the run (corrections included)
    samples_per_checkpoint: int = 0  # sample images made after every saved file (prompts x CFG scales)
    sample_summary: str = ""  # e.g. "3 prompts x CFG 5, 7, 9 (20 steps, euler_a, 512 px, seed 1234)"
    resume_from: Path | None = None  # the training state this run continues
    resume_step: int = 0  # the step it continues after (0: a fresh run)
    validation: ValidationPlan | None = None  # held-out validation (None: no validation_dir)
    memory: MemoryPlan | None = None  # the predicted peak memory against the device's budget (docs/memory.md)
    launch: Launch = Launch()  # the run's processes and machines (train(cfg, processes=N)); one process by default
    train_batch_size: int = 1  # the batch of one process (per device)
    gradient_accumulation_steps: int = 1

    @property
    def processes(self) -> int:
        """The run's processes over every machine (its world size)."""
        return self.launch.world_size

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step: the per-process batch x processes x gradient accumulation."""
        return self.train_batch_size * self.processes * self.gradient_accumulation_steps

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the run uses gradient checkpointing (``"auto"`` resolved: see ``memory.reason``)."""
        return self.memory.gradient_checkpointing if self.memory is not None else True

    def __str__(self) -> str:
        lines = [
            f"base model      {self.base_model} ({self.model_family})",
            f"device          {self.device}, mixed precision {self.mixed_precision}",
            *(f"  corrected: {c}" for c in self.corrections),
            "dataset",
            *(
                f"  {'reg  ' if s.is_reg else 'train'} {s.folder}: {s.images} images, {s.captions} captions, "
                f"x{s.repeats}"
                for s in self.subsets
            ),
            *self._launch_lines(),
            f"steps           {self.steps_per_epoch} per epoch x {self.epochs} epochs = {self.total_steps}",
            *(
                [f"resume          after step {self.resume_step} from {self.resume_from}; "
                 f"{self.total_steps - self.resume_step} steps left"]
                if self.resume_from else []
            ),  # fmt: skip
            "checkpoints     " + (", ".join(str(step) for step, _ in self.checkpoints) or "none") + ", final",
            *(f"  {path}" for _, path in self.checkpoints),
            f"  {self.final_path}",
            "samples         " + (
                f"{self.sample_summary} = {self.samples_per_checkpoint} images per saved file"
                if self.samples_per_checkpoint else "none"
            ),
            "validation      " + (
                f"{self.validation.images} held-out images in {self.validation.folder}, a pass at steps "
                f"{', '.join(str(s) for s in self.validation.steps)} (seed {self.validation.seed})"
                if self.validation else "none (set `validation_dir` to measure a held-out loss)"
            ),
            *(
                [f"  held out of train_dir by sd-scripts' split (never trained on): "
                 f"{', '.join(p.name for p in self.validation.paths)}"]
                if self.validation and self.validation.split < 1 else []
            ),  # fmt: skip
            *(self.memory.lines() if self.memory else []),
            f"disk            about {self.estimated_disk_bytes / 1e6:.0f} MB",
            *(f"warning: {w}" for w in self.warnings if w not in self.corrections),
        ]
        return "\n".join(lines)

    def _launch_lines(self) -> list[str]:
        if not self.launch.multi_process:
            return []
        machines = f"{self.launch.num_machines} machines" if self.launch.num_machines > 1 else "1 machine"
        accumulation = f" x {self.gradient_accumulation_steps} accumulated" if self.gradient_accumulation_steps > 1 else ""
        return [
            f"processes       {self.processes} on {machines} ({self.launch.local_processes} here, machine_rank "
            f"{self.launch.machine_rank}), started by accelerate launch",
            f"  batch {self.train_batch_size} per process x {self.processes} processes{accumulation} = "
            f"{self.effective_batch} images per step; each process takes ceil({self.batches_per_epoch} / "
            f"{self.processes}) = {-(-self.batches_per_epoch // self.processes)} of an epoch's {self.batches_per_epoch} "
            f"batches",
        ]


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
    ``gradient_checkpointing = "auto"``; a peak over ``memory_limit`` is refused, one over the device's budget is a
    warning with the fixes). ``memory_budget`` replaces the device's own budget (``device_budget``), e.g. to plan
    for another machine.
    ``resume`` ("latest" or a state folder) plans the continuation of a run saved with ``save_state``: the state
    must come from the same training (config and dataset). Raises :class:`ConfigError` listing every problem; a
    :class:`DeviceError` when the device cannot run it.
    ``processes`` (or ``launch``, for several machines) plans a multi-process run: the step math for that world
    size (each process takes its share of an epoch's batches), and on the CPU each process's share of the memory
    budget."""
    from ._header import check_base_model

    launch = resolve_launch(processes, launch)
    device_choice = _engine.device_choice(cfg)  # DeviceError: the machine, not the data
    problems: list[str] = []
    if device_choice.device == "mps" and launch.multi_process:
        problems.append(
            f"`processes` {launch.world_size} on MPS: a Mac has one GPU, and torch.distributed has no MPS backend, "
            f"so a run on MPS is one process; train with processes=1 (the default), or on CUDA machines for several"
        )
    warnings: list[str] = list(device_choice.corrections)
    family = "unknown"
    try:
        family = check_base_model(cfg.base_model).family
    except ConfigError as e:
        problems += e.problems
    if family == "sd2":
        warnings.append(
            "the base model is SD2.x: it is trained with sd-scripts' v2 settings; a 768-v model (SD 2.0-v, 2.1-768) "
            "also needs extra_args.v_parameterization = true"
        )
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append(
            "`tensorboard = true` needs the tensorboard package, which is not installed: "
            "pip install 'spyke-lora[tensorboard]' (or set tensorboard = false)"
        )
    for name in ("tokenizer_cache_dir",):
        folder = getattr(cfg, name)
        if folder is not None and not folder.is_dir():
            problems.append(f"`{name}` {str(folder)!r} is not a folder; check the path")
    try:
        folders = _engine.dataset_folders(cfg)
    except ConfigError as e:
        problems += e.problems
        folders = []
    if cfg.dataset_config is not None and not cfg.dataset_config.is_file():
        problems.append(f"`dataset_config` {str(cfg.dataset_config)!r} does not exist; check the path")
    extensions = _engine.image_extensions(cfg) if folders else ()
    for folder in folders:
        found, noted = check_folder(folder, cfg, extensions)
        problems += found
        warnings += noted
        if cfg.cache_latents and folder.fresh_latents:
            problems.append(
                f"{folder.source} sets {' and '.join(folder.fresh_latents)}, which change the image at every step, so "
                f"its latents cannot be cached; set `cache_latents = false` (slower: the VAE encodes every step)"
            )
    held_out = _held_out_folder(cfg)
    if held_out is not None:
        found, noted = check_folder(held_out, cfg, extensions or _engine.image_extensions(cfg))
        problems += found
        warnings += noted
        if not found:
            problems += held_out_problems(held_out, folders, extensions or _engine.image_extensions(cfg))
    problems += _split_problems(cfg, extensions or _engine.image_extensions(cfg))
    state = None
    if resume is not None:
        try:
            state = _engine.resolve_resume(cfg, resume, launch.world_size)
        except ConfigError as e:
            problems += e.problems
    existing = [] if cfg.overwrite else _engine.existing_outputs(cfg, state.step if state else None)
    if existing:
        names = ", ".join(p.name for p in existing[:5]) + (", ..." if len(existing) > 5 else "")
        if state is None:
            problems.append(
                f"{len(existing)} LoRA file(s) named `{cfg.output_name}` already exist in {cfg.output_dir} "
                f"({names}); choose another `output_name` or `output_dir`, or set `overwrite = true` to replace them"
            )
        else:
            problems.append(
                f"resuming after step {state.step} would replace {len(existing)} file(s) saved later ({names}) in "
                f"{cfg.output_dir}; resume from the latest state (resume='latest'), or set `overwrite = true`"
            )
    if problems:
        raise ConfigError(problems)

    count = _engine.count_steps(cfg, device_choice, launch.world_size)
    held_out_images = len(_images(held_out.folder, extensions)) if held_out is not None else 0
    sharing = launch.local_processes if device_choice.device == "cpu" else 1  # a GPU per process elsewhere
    memory = memory_plan(cfg, device_choice.device, device_choice.mixed_precision,
                         sum(s.images for s in count.subsets) + held_out_images, budget=memory_budget,
                         sharing=sharing)  # fmt: skip
    if memory.limit_bytes is not None and memory.peak_bytes > memory.limit_bytes:
        raise ConfigError(
            f"the run's predicted peak memory {gib(memory.peak_bytes)} is above `memory_limit` "
            f"{gib(memory.limit_bytes)}; " + "; ".join(f"fix: {fix}" for fix in memory.fixes)
        )
    if not memory.fits:
        warnings.append(
            f"the run's predicted peak memory {gib(memory.peak_bytes)} is above the {device_choice.device} budget "
            f"{gib(memory.budget_bytes)} ({memory.budget_source}): it may swap (hours instead of minutes) or fail "
            f"part-way; " + "; ".join(f"fix: {fix}" for fix in memory.fixes)
        )
    cfg = cfg.replace(gradient_checkpointing=memory.gradient_checkpointing)  # "auto" resolved for the argv
    if state is not None and state.step >= count.total_steps:
        raise ConfigError(
            f"cannot resume from {state.path}: it is at step {state.step} and this run ends at step "
            f"{count.total_steps}, so there is nothing left to train (the run's LoRA is {count.final_name})"
        )
    done = state.step if state else 0
    warnings += config_warnings(cfg, count.total_steps)
    captions = {f.folder: _count_captions(f) for f in folders}
    warnings += _sample_warnings(cfg, folders)
    checkpoints = [(step, name) for step, name in count.checkpoints if step > done]
    files = len(checkpoints) + 1
    per_file = _BYTES_PER_DIM_FP32 * cfg.network_dim * _SAVE_BYTES[cfg.save_precision] / 4
    if cfg.save_state:  # a state holds the fp32 weights and AdamW's two moments per weight, next to each file
        per_file += _STATE_BYTES_PER_DIM * cfg.network_dim
    free = free_disk(cfg.output_dir)
    needed = files * per_file + 2 * per_file  # the files, plus room for one being written and slack
    if free is not None and free < needed:
        raise ConfigError(
            f"`output_dir` {str(cfg.output_dir)!r} has {free / 1e6:.0f} MB free, and the run writes about "
            f"{files * per_file / 1e6:.0f} MB ({files} files of {per_file / 1e6:.0f} MB"
            f"{' with its training state' if cfg.save_state else ''}); free some space, choose another output_dir, "
            f"or save fewer checkpoints (save_every_n_steps)"
        )
    return Plan(
        device=device_choice.device,
        mixed_precision=device_choice.mixed_precision,
        corrections=device_choice.corrections,
        base_model=cfg.base_model,
        model_family=family,
        argv=tuple(_engine.build_argv(cfg, device_choice, state.path if state else None)),
        subsets=tuple(
            SubsetPlan(s.folder, s.images, captions.get(s.folder, 0), s.repeats, s.is_reg) for s in count.subsets
        ),
        batches_per_epoch=count.batches_per_epoch,
        steps_per_epoch=count.steps_per_epoch,
        epochs=count.epochs,
        total_steps=count.total_steps,
        checkpoints=tuple((step, cfg.output_dir / name) for step, name in checkpoints),
        final_path=cfg.output_dir / count.final_name,
        estimated_disk_bytes=int(files * per_file),
        warnings=tuple(warnings),
        samples_per_checkpoint=len(cfg.sample_prompts) * len(cfg.sample_cfg_scales),
        sample_summary=_sample_summary(cfg),
        resume_from=state.path if state else None,
        resume_step=done,
        validation=_validation_plan(cfg, held_out, count, done, extensions or _engine.image_extensions(cfg)),
        memory=memory,
        launch=launch,
        train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=int(cfg.extra_args.get("gradient_accumulation_steps", 1) or 1),
    )


def _held_out_folder(cfg: TrainConfig):
    """``validation_dir`` as a dataset folder (an ``_engine`` ``Folder``), or None."""
    if cfg.validation_dir is None:
        return None
    parsed = repeats_from_folder_name(cfg.validation_dir)
    tokens = parsed[1] if parsed else cfg.validation_dir.name
    return _engine.Folder(cfg.validation_dir, 1, False, cfg.caption_extension, tokens, "`validation_dir`")


def _validation_plan(cfg: TrainConfig, held_out, count, done: int, extensions: tuple[str, ...]) -> ValidationPlan | None:
    """Which steps get a validation pass: every saved file's, or every ``validate_every_n_steps`` and the last."""
    if held_out is None and not cfg.validation_split:
        return None
    every, total = cfg.validate_every_n_steps, count.total_steps
    saved = [step for step, _ in count.checkpoints]
    steps = {s for s in (range(every, total + 1, every) if every else saved) if s > done} | {total}
    seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
    if held_out is None:  # validation_split: the images sd-scripts' own split holds out of train_dir
        paths = count.held_out
        return ValidationPlan(cfg.train_dir, len(paths), tuple(sorted(steps)), seed, paths, cfg.validation_split)
    paths = tuple(sorted(_images(held_out.folder, extensions)))
    return ValidationPlan(held_out.folder, len(paths), tuple(sorted(steps)), seed, paths)


def _images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    wanted = {e.lower() for e in extensions}
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in wanted] if folder.is_dir() else []


def _split_problems(cfg: TrainConfig, extensions: tuple[str, ...]) -> list[str]:
    """sd-scripts' split (``split_train_val``) trains on the first ceil(n * (1 - split)) images and validates on the
    last round(n * split): for some n and split both round up, and an image is in both; or none is held out."""
    if not cfg.validation_split or cfg.train_dir is None:
        return []
    n = len(_images(cfg.train_dir, extensions))
    if not n:
        return []
    trained, held = math.ceil(n * (1 - cfg.validation_split)), round(n * cfg.validation_split)
    wanted = max(1, held)
    better = f"{(wanted + 0.25) / n:.3g}"  # holds out exactly `wanted` images, with no overlap
    if held == 0:
        return [f"`validation_split` {cfg.validation_split} of the {n} images in `train_dir` holds out none; "
                f"try {better} (1 image)"]  # fmt: skip
    if trained + held > n:
        return [
            f"`validation_split` {cfg.validation_split} of the {n} images in `train_dir`: sd-scripts would train on "
            f"{trained} and validate on {held}, so {trained + held - n} image(s) would be in both; try {better} "
            f"({wanted} held out)"
        ]
    return []


def _sample_summary(cfg: TrainConfig) -> str:
    """What sampling makes, in one line (see ``Plan.sample_summary``); "" when sampling is off."""
    if not cfg.sample_prompts:
        return ""
    scales = ", ".join(f"{s:g}" for s in cfg.sample_cfg_scales)
    return (
        f"{len(cfg.sample_prompts)} prompts x CFG {scales} ({cfg.sample_steps} steps, {cfg.sample_sampler}, "
        f"{cfg.sample_size or cfg.resolution} px, seed {cfg.sample_seed})"
    )


def _sample_warnings(cfg: TrainConfig, folders) -> list[str]:
    """Sample prompts that lack the trigger show the base model, not the LoRA: the recipe's defaults name Spyke's."""
    triggers = {f.class_tokens for f in folders if not f.is_reg and f.class_tokens}
    if not cfg.sample_prompts or len(triggers) != 1 or cfg.keep_tokens < 1:
        return []
    trigger = triggers.pop()
    missing = [i for i, prompt in enumerate(cfg.sample_prompts) if trigger not in prompt]
    if not missing:
        return []
    return [
        f"`sample_prompts` {missing} do not contain the trigger {trigger!r} of the training folder, so their samples "
        f"will not show what the LoRA learned; start each prompt with {trigger!r} (the defaults are the Spyke "
        f"recipe's prompts)"
    ]


def _count_captions(folder) -> int:
    return sum(1 for p in folder.folder.iterdir() if p.suffix == folder.caption_extension and p.stat().st_size > 0)
