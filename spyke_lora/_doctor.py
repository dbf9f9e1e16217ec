"""``doctor()``: can this machine train, on which device, with which precision (LORA-04), before loading anything."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
from pathlib import Path

from . import _device, _engine
from ._config import TrainConfig
from ._device import choose_device, resolve_device
from ._errors import DeviceError, EngineError
from ._memory import constants_for, load_calibrations
from ._mps_fallback import fallback_missing

__all__ = ["DeviceReport", "doctor", "free_disk", "output_dir_problem"]


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """What :func:`doctor` found. ``problems`` stop a run; ``warnings`` do not. ``str(report)`` is a readable
    summary."""

    python: str
    platform: str
    torch_version: str | None
    mps_built: bool
    mps_available: bool
    cuda_available: bool
    cuda_device: str | None
    device: str | None  # what the run will use (what accelerate picks, given the environment the run sets)
    mixed_precision: str | None  # what the device policy picks for the config
    mps_fallback_set: bool  # PYTORCH_ENABLE_MPS_FALLBACK=1 was in the environment when torch was imported
    sd_scripts_dir: Path | None
    sd_scripts_commit: str | None
    sd_scripts_pinned: bool
    output_dir: Path
    free_disk_bytes: int | None  # in output_dir (or its nearest existing parent)
    total_memory_bytes: int | None
    memory_model: str = ""  # where plan()'s memory figures for the device come from (docs/memory.md)
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing stops a run (no problems)."""
        return not self.problems

    def __str__(self) -> str:
        def gib(n: int | None) -> str:
            return "unknown" if n is None else f"{n / 2**30:.1f} GiB"

        commit = (self.sd_scripts_commit or "not a git checkout")[:10]
        pin = " (pinned v0.10.1)" if self.sd_scripts_pinned else ""
        lines = [
            f"python          {self.python} on {self.platform}",
            f"torch           {self.torch_version or 'not installed'}",
            f"mps             built {_yes(self.mps_built)}, available {_yes(self.mps_available)}, "
            f"fallback {'set' if self.mps_fallback_set else 'NOT set'}",
            f"cuda            {self.cuda_device if self.cuda_available else 'not available'}",
            f"device          {self.device or '-'}",
            f"mixed precision {self.mixed_precision or '-'}",
            f"sd-scripts      {self.sd_scripts_dir or 'missing'} @ {commit}{pin}",
            f"output folder   {self.output_dir} ({gib(self.free_disk_bytes)} free)",
            f"memory          {gib(self.total_memory_bytes)}",
            *([f"memory model    {self.memory_model}"] if self.memory_model else []),
        ]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("ready to train" if self.ok else "cannot train: fix the problems above")
        return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def doctor(cfg: TrainConfig | None = None) -> DeviceReport:
    """Check this machine for a run of ``cfg``. Loads no model; imports torch.

    Args:
        cfg: The run's config; by default the recipe's device and precision settings, the vendored engine and the
            working directory as output folder.

    Returns:
        The :class:`DeviceReport`: what the machine has, the device and precision a run would use, the engine, the
        disk and memory; ``problems`` that stop a run (then ``ok`` is False) and ``warnings`` that do not.
    """
    problems: list[str] = []
    warnings: list[str] = []
    facts = _device.device_facts()  # one seam: tests give it another machine's facts
    if facts.torch_version is None:
        problems.append("torch is not installed; run `make setup` (or pip install -e .)")
    device, precision = _device_and_precision(cfg, facts, problems, warnings)
    fallback_set = not fallback_missing()
    if device == "mps" and not fallback_set:
        warnings.append(
            "PYTORCH_ENABLE_MPS_FALLBACK=1 was not set before torch was imported: an operation MPS lacks will fail; "
            "import spyke_lora before torch, or export the variable before starting Python"
        )
    sd_dir, commit = _engine_checkout(cfg, problems, warnings)
    output_dir = cfg.output_dir if cfg else Path.cwd()
    unwritable = output_dir_problem(output_dir) if cfg else None
    if unwritable:
        problems.append(unwritable)
    free, memory = _room(output_dir, device, warnings)
    return DeviceReport(
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        torch_version=facts.torch_version,
        mps_built=facts.mps_built,
        mps_available=facts.mps_available,
        cuda_available=facts.cuda_available,
        cuda_device=facts.cuda_device,
        device=device,
        mixed_precision=precision,
        mps_fallback_set=fallback_set,
        sd_scripts_dir=sd_dir,
        sd_scripts_commit=commit,
        sd_scripts_pinned=commit == _engine.PINNED_COMMIT,
        output_dir=output_dir,
        free_disk_bytes=free,
        total_memory_bytes=memory,
        memory_model=_memory_model(device, warnings),
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def _device_and_precision(
    cfg: TrainConfig | None, facts: _device.DeviceFacts, problems: list[str], warnings: list[str]
) -> tuple[str | None, str | None]:
    """The device ``cfg`` resolves to on this machine and the mixed precision the policy picks there; its
    corrections are warnings. A device that is not available is a problem (device None), and so is what the
    device cannot run (precision None)."""
    requested = cfg.device if cfg else "auto"
    try:
        device = resolve_device(requested, cuda_available=facts.cuda_available, mps_available=facts.mps_available)
    except DeviceError as e:
        problems.append(str(e))
        return None, None
    try:
        choice = choose_device(
            device,
            mixed_precision=cfg.mixed_precision if cfg else "auto",
            optimizer_type=cfg.optimizer_type if cfg else "AdamW",
            xformers=bool(cfg.extra_args.get("xformers", False)) if cfg else False,
        )
    except DeviceError as e:
        problems.append(str(e))
        return device, None
    warnings += choice.corrections
    return device, choice.mixed_precision


def _engine_checkout(
    cfg: TrainConfig | None, problems: list[str], warnings: list[str]
) -> tuple[Path | None, str | None]:
    """sd-scripts' folder and commit; a missing or broken checkout is a problem, one not at the pinned commit a
    warning."""
    sd_dir = commit = None
    try:
        sd_dir = _engine.locate_engine(cfg.sd_scripts_dir if cfg else None)
        commit = _engine.engine_commit(sd_dir)
    except EngineError as e:
        problems.append(str(e))
    note = _engine.commit_note(commit) if sd_dir is not None else None
    if note is not None:
        warnings.append(f"sd-scripts at {sd_dir}: {note}")
    return sd_dir, commit


def _room(output_dir: Path, device: str | None, warnings: list[str]) -> tuple[int | None, int | None]:
    """Free disk in ``output_dir`` and the machine's memory, each a warning when short for a recipe run."""
    free = free_disk(output_dir)
    if free is not None and free < 1 * 2**30:
        warnings.append(f"only {free / 2**20:.0f} MiB free in {output_dir}; a recipe run writes about 400 MB")
    memory = _total_memory()
    if device == "mps" and memory is not None and memory < 15 * 2**30:
        warnings.append(
            f"{memory / 2**30:.0f} GiB of unified memory: SD1.5 LoRA training wants 16 GB; close other apps"
        )
    return free, memory


def _memory_model(device: str | None, warnings: list[str]) -> str:
    """Where plan()'s memory figures for ``device`` come from ("" without a device); estimates are a warning."""
    if device is None:
        return ""
    constants = constants_for(device, load_calibrations((device,)))
    if not constants.calibrated:
        warnings.append(
            f"plan()'s memory figures for {device} are estimates, so gradient_checkpointing 'auto' keeps "
            f"checkpointing on unless the run needs under half the budget; `spyke-lora calibrate` measures this "
            f"machine in a few minutes"
        )
    return constants.source


def output_dir_problem(folder: Path) -> str | None:
    """Why a run could not write its files in ``folder``, its ``output_dir``, or None. Writes nothing to find out.

    Args:
        folder: The ``output_dir`` (it is created when missing, with its parents).

    Returns:
        A message naming the folder, what is wrong (a file there or above it, a dangling symlink, no write
        permission or a read-only file system where the folder is or would be created: ``os.access``) and the fix;
        None when it can be written.
    """
    fix = "choose another output_dir (a folder you can write; it is created if missing)"
    if folder.is_symlink() and not folder.exists():
        return f"`output_dir` {str(folder)!r} is a symlink to {os.readlink(folder)!r}, which does not exist; {fix}"
    if folder.exists() and not folder.is_dir():
        return f"`output_dir` {str(folder)!r} is a file, not a folder; {fix}"
    for candidate in (folder, *folder.parents):
        if not candidate.exists():
            continue
        if not candidate.is_dir():
            return f"`output_dir` {str(folder)!r} cannot be created: {str(candidate)!r} is a file; {fix}"
        if not os.access(candidate, os.W_OK | os.X_OK):
            where = "it" if candidate == folder else f"{str(candidate)!r}, where it would be created,"
            return (
                f"`output_dir` {str(folder)!r} cannot be written: {where} is not writable (its permissions, or a "
                f"read-only file system); {fix}, or make {str(candidate)!r} writable"
            )
        return None
    return None


def free_disk(folder: Path) -> int | None:
    """Free bytes where ``folder`` is (or would be created: its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def _total_memory() -> int | None:
    """The machine's RAM (unified memory on a Mac), from psutil."""
    import psutil

    return int(psutil.virtual_memory().total)
