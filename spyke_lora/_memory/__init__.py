"""Memory: the peak a run will need on its device, the device's budget, ``gradient_checkpointing = "auto"``, and
what to change when a run does not fit. ``plan()`` calls :func:`memory_plan`; the model is in ``_predict``, the
budget in ``_budget``, the constants fitted to a device's measurements and their files in ``_fit``, a run's measured
peak in ``_peak``. Nothing here trains or imports the engine: ``spyke-lora calibrate`` (which trains) is
``spyke_lora._calibrate``, a feature that uses this package."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ._budget import MemoryBudget, device_budget, resident_now
from ._fit import calibration_path, fit, load_calibrations, point_shape, training_residual
from ._peak import PeakMeter
from ._predict import (
    CPU,
    SD15_FP16,
    MemoryConstants,
    MemoryPrediction,
    ModelSize,
    RunShape,
    constants_for,
    host_loading_bytes,
    latent_pixels,
    predict,
    read_model_size,
)

if TYPE_CHECKING:  # pragma: no cover
    from .._config import TrainConfig

__all__ = [
    "AUTO_MARGIN",
    "CPU",
    "ESTIMATE_MARGIN",
    "SD15_FP16",
    "UNDERESTIMATE",
    "MemoryBudget",
    "MemoryConstants",
    "MemoryPlan",
    "MemoryPrediction",
    "ModelSize",
    "PeakMeter",
    "RunShape",
    "calibration_path",
    "constants_for",
    "device_budget",
    "fit",
    "gib",
    "host_loading_bytes",
    "latent_pixels",
    "load_calibrations",
    "memory_plan",
    "point_shape",
    "predict",
    "read_model_size",
    "resident_now",
    "run_shape",
    "training_residual",
]

# gradient_checkpointing = "auto" turns checkpointing off only when the predicted peak without it, times this, fits
# the budget: the model lands within 15 % of the measured peak (docs/benchmarks.md), and the rest is headroom for
# what the budget reading cannot see coming (another app growing while the run goes on, the allocator's
# fragmentation on MPS and CUDA).
AUTO_MARGIN = 1.25
# ... and this when a CUDA device's figures are estimates (not calibrated): its attention and allocator are not the
# CPU's, so an uncalibrated GPU turns checkpointing off only with twice what the estimate needs. An uncalibrated Mac
# never does (see `_auto_checkpointing`): unified memory swaps for hours where a GPU fails at its first step, and
# nobody here has measured a Mac, so any margin would be a guess at an edge (a 16 GB Mac at 256 px: 10.64 GiB with
# the 2x margin against a 10.67 GiB budget)
ESTIMATE_MARGIN = 2.0
# a run whose measured peak exceeds the prediction by more than this shows that the model is wrong for this machine
UNDERESTIMATE = 1.15


def gib(value: int | None) -> str:
    """Bytes as GiB, in words ("7.11 GiB"; "unknown" for None)."""
    return "unknown" if value is None else f"{value / 2**30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """``Plan.memory``: the run's predicted peak on its device against the device's budget, by part, and whether
    gradient checkpointing is on, and why."""

    peak_bytes: int
    budget_bytes: int | None  # None: the device's budget cannot be read
    parts: Mapping[str, int]  # bytes by part (``_predict.predict``); the phases' totals are in ``phases``
    phases: Mapping[str, int]  # "loading", "training", "sampling" -> the phase's predicted total
    gradient_checkpointing: bool  # what the run uses
    reason: str  # why, in words
    budget_source: str
    ram_bytes: int | None
    estimate: bool  # True: constants not measured on this kind of device (MPS or CUDA before `spyke-lora calibrate`)
    source: str  # where the constants come from
    fixes: tuple[str, ...] = ()  # when the peak is over the budget: each change that brings it under, with its figure
    limit_bytes: int | None = None  # memory_limit
    host_loading_bytes: int | None = None  # CUDA and MPS: what loading takes from the host's RAM

    @property
    def fits(self) -> bool:
        """True when the peak is within the budget (or the budget is unknown)."""
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    def lines(self) -> list[str]:
        """The plan's memory section."""
        phase = max(self.phases, key=lambda k: self.phases[k])
        budget = (
            f"budget {gib(self.budget_bytes)} ({self.budget_source})"
            if self.budget_bytes is not None
            else f"budget unknown ({self.budget_source} could not be read)"
        )
        lines = [
            f"memory          peak {gib(self.peak_bytes)} while {phase}{' (estimate)' if self.estimate else ''}, "
            f"{budget}" + (f", RAM {gib(self.ram_bytes)}" if self.ram_bytes else ""),
            "  " + ", ".join(f"{name.replace('_', ' ')} {gib(value)}" for name, value in self.parts.items() if value),
            f"  gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}: {self.reason}",
        ]
        if self.host_loading_bytes:
            lines.append(f"  loading takes {gib(self.host_loading_bytes)} of the host's RAM")
        if self.estimate:
            lines.append(f"  the figures are {self.source}")
        lines += [f"  fix: {fix}" for fix in self.fixes]
        return lines


def run_shape(
    cfg: TrainConfig, device: str, mixed_precision: str, images: int, gradient_checkpointing: bool
) -> RunShape:
    """The :class:`RunShape` of a :class:`~spyke_lora.TrainConfig` on its device."""
    unet_only = bool(cfg.extra_args.get("network_train_unet_only")) or cfg.text_encoder_lr == 0
    return RunShape(
        resolution=cfg.resolution,
        batch_size=cfg.train_batch_size,
        gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision,
        cache_latents=cfg.cache_latents,
        images=images,
        network_dim=cfg.network_dim,
        optimizer=cfg.optimizer_type,
        train_text_encoder=not unet_only,
        sample_size=(cfg.sample_size or cfg.resolution) if cfg.sample_prompts else None,
        full_precision_vae=device != "cuda" or bool(cfg.extra_args.get("no_half_vae")),
    )


def memory_plan(
    cfg: TrainConfig,
    device: str,
    mixed_precision: str,
    images: int,
    *,
    budget: MemoryBudget | None = None,
    calibrated: Mapping[str, MemoryConstants] | None = None,
    model: ModelSize | None = None,
    resident: int | None = None,
    sharing: int = 1,
) -> MemoryPlan:
    """The memory section of ``plan(cfg)`` on ``device``.

    Args:
        cfg: the run's :class:`~spyke_lora.TrainConfig`.
        device: "cpu", "cuda" or "mps".
        mixed_precision: the precision the run uses on that device.
        images: the training images a step draws from (the latents cached).
        budget: the device's memory budget; None: ``device_budget(device)``. Either way capped by ``memory_limit``.
        calibrated: constants measured on this machine, by device; None: :func:`load_calibrations`.
        model: the base model's sizes; None: read from ``cfg.base_model``'s header.
        resident: this process's resident memory now (read when None): on the CPU, the run's runtime when it is
            more than a fresh process's (a notebook kernel that holds data, or an earlier run's freed memory).
        sharing: the processes of a multi-process run that share this device's memory (several CPU workers on one
            machine): each is a fresh process, and gets its share of the budget, less what this (the caller's)
            process holds.

    Returns:
        The prediction against the budget, ``gradient_checkpointing = "auto"`` resolved with its reason, and the
        fixes when the peak is over the budget.
    """
    model = model or read_model_size(Path(cfg.base_model))
    constants = constants_for(device, load_calibrations() if calibrated is None else calibrated)
    held = 0
    if constants.resident:  # the run's process is this one: what it holds already is its runtime, if that is more
        held = resident_now() if resident is None else resident
        if held and held > constants.runtime_bytes and sharing <= 1:
            constants = dataclasses.replace(constants, runtime_bytes=held)
    budget = _shared_budget(device, budget, held, sharing).limited(cfg.memory_limit)

    def peak_with(**changes) -> MemoryPrediction:
        shape = run_shape(
            cfg.replace(**{k: v for k, v in changes.items() if k != "gc"}),
            device,
            mixed_precision,
            images,
            changes.get("gc", checkpointing),
        )
        return predict(shape, model, constants)

    checkpointing = True if cfg.gradient_checkpointing == "auto" else bool(cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing == "auto":
        checkpointing, reason = _auto_checkpointing(peak_with(gc=False), budget, constants, device)
    else:
        reason = f"set in the config (gradient_checkpointing = {str(checkpointing).lower()})"
    prediction = peak_with()
    fixes: tuple[str, ...] = ()
    if budget.bytes is not None and prediction.peak_bytes > budget.bytes:
        fixes = tuple(_fixes(cfg, prediction, budget.bytes, peak_with, checkpointing))
    return MemoryPlan(
        peak_bytes=prediction.peak_bytes,
        budget_bytes=budget.bytes,
        parts=dict(prediction.parts),
        phases=dict(prediction.phases),
        gradient_checkpointing=checkpointing,
        reason=reason,
        budget_source=budget.source,
        ram_bytes=budget.ram_bytes,
        estimate=not constants.calibrated,
        source=constants.source,
        fixes=fixes,
        limit_bytes=cfg.memory_limit,
        host_loading_bytes=None if constants.resident else host_loading_bytes(model, constants),
    )


def _shared_budget(device: str, budget: MemoryBudget | None, held: int, sharing: int) -> MemoryBudget:
    """``budget`` (``device_budget(device)`` when None), split between ``sharing`` processes on one device; the CPU's
    budget read here less what this process already ``held``."""
    if budget is None:
        budget = device_budget(device)
        if sharing > 1 and held and budget.bytes is not None:  # the CPU's budget counts the caller's own memory
            budget = dataclasses.replace(budget, bytes=budget.bytes - held, source="available RAM (psutil)")
    if sharing > 1 and budget.bytes is not None:
        budget = dataclasses.replace(
            budget, bytes=budget.bytes // sharing, source=f"{budget.source}, shared by {sharing} processes"
        )
    return budget


def _auto_checkpointing(
    without: MemoryPrediction, budget: MemoryBudget, constants: MemoryConstants, device: str
) -> tuple[bool, str]:
    """``gradient_checkpointing = "auto"`` resolved: off only when the peak ``without`` it, with the margin, fits;
    always on for an uncalibrated Mac (its figures are estimates, and running out of memory there means swapping)."""
    margin = AUTO_MARGIN if constants.calibrated else ESTIMATE_MARGIN
    needed = int(without.peak_bytes * margin)
    kind = "" if constants.calibrated else f" (an estimate: {device.upper()} is not calibrated)"
    if budget.bytes is None:
        return True, "auto: on, because the device's memory budget cannot be read"
    if device == "mps" and not constants.calibrated:
        return True, (
            f"auto: on until this Mac is calibrated: without it the peak would be {gib(without.peak_bytes)}{kind}, "
            f"and a Mac that runs out of memory swaps (hours instead of minutes); `spyke-lora calibrate` measures "
            f"this device, and may turn it off"
        )
    if needed <= budget.bytes:
        return False, (
            f"auto: off (faster): without it the peak is {gib(without.peak_bytes)}{kind}, within the budget with "
            f"the {margin:g}x margin ({gib(needed)})"
        )
    return True, (
        f"auto: on: without it the peak would be {gib(without.peak_bytes)}{kind}, which with the {margin:g}x "
        f"margin ({gib(needed)}) is over the budget"
        + ("" if constants.calibrated else "; `spyke-lora calibrate` measures this device, and may turn it off")
    )


def _fixes(cfg: TrainConfig, prediction: MemoryPrediction, budget: int, peak_with, checkpointing: bool) -> list[str]:
    """The changes that bring the peak under ``budget``, each with its predicted peak. When loading alone is over
    the budget no setting helps (only a smaller checkpoint file), and that is the one fix given."""
    fixes = []
    if prediction.phases["loading"] > budget:  # no setting of the run brings loading down
        return [
            f"loading the base model alone needs {gib(prediction.phases['loading'])}: use an fp16 checkpoint "
            f"without EMA weights (about 2 GB for SD1.5), or free memory (close other programs)"
        ]
    if not checkpointing:
        fixes.append(("gradient_checkpointing = true", peak_with(gc=True)))
    if cfg.train_batch_size > 1:
        for batch in range(cfg.train_batch_size - 1, 0, -1):
            smaller = peak_with(train_batch_size=batch)
            if smaller.peak_bytes <= budget or batch == 1:
                fixes.append((f"train_batch_size = {batch}", smaller))
                break
    for resolution in range(cfg.resolution - 64, 255, -64):
        lower = peak_with(resolution=resolution)
        if lower.peak_bytes <= budget or resolution == 256:
            fixes.append((f"resolution = {resolution}", lower))
            break
    if not cfg.cache_latents:
        fixes.append(("cache_latents = true", peak_with(cache_latents=True)))
    if prediction.phase == "sampling" and (cfg.sample_size or cfg.resolution) > 256:
        fixes.append(("sample_size = 256", peak_with(sample_size=256)))
    words = [
        f"{change} (peak {gib(p.peak_bytes)}{'' if p.peak_bytes <= budget else ', still over'})" for change, p in fixes
    ]
    return words or ["free memory (close other programs): no setting of this config brings the peak under it"]
