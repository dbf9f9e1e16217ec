"""Training states: what sd-scripts saves with ``--save_state``, where, and whether a config may continue one.

sd-scripts (v0.10.1, ``library/train_util.py``) saves a state as a folder next to the LoRA files, written by
``accelerator.save_state``: the network weights, the optimizer, the learning-rate scheduler, the random generators,
and ``train_state.json`` (``{"current_epoch": E, "current_step": S}``, written by ``train_network.py``'s save hook).
Its names: ``NAME-step00000200-state`` (every ``save_every_n_steps``), ``NAME-000001-state`` (every
``save_every_n_epochs``), ``NAME-state`` (the end of the run). spyke-lora adds ``spyke-lora.json``: the config the
run trained with and a fingerprint of its dataset, so a resume that would change the training is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .._config import TrainConfig
from .._errors import ConfigError
from .._files import sha256
from ._dataset import dataset_folders, image_extensions

__all__ = [
    "DEVICE_RNG_NAME",
    "RECORD_NAME",
    "SavedState",
    "config_differences",
    "dataset_fingerprint",
    "find_states",
    "remove_partial_states",
    "resolve_resume",
    "state_record",
]

RECORD_NAME = "spyke-lora.json"
# the MPS generator at the save, which accelerate's save_state does not store (it keeps CPU, CUDA and XLA ones);
# read back on resume, so a resumed run on a Mac draws the noise an uninterrupted one would
DEVICE_RNG_NAME = "spyke-lora-mps-rng.pt"
_SD_SCRIPTS_STATE = "train_state.json"

# Fields a resumed run may change: where and how it runs, how often it saves, what it does on errors; none of them
# changes what is learned at a step.
RESUMABLE_CHANGES = frozenset(
    {
        "overwrite",
        "max_nonfinite_steps",
        "save_state",
        "save_every_n_steps",
        "sd_scripts_dir",
        "tokenizer_cache_dir",
        "device",
        "gradient_checkpointing",
        "memory_limit",
        "tensorboard",
        "sample_prompts",
        "sample_cfg_scales",
        "sample_seed",
        "sample_steps",
        "sample_size",
        "sample_sampler",
        "sample_negative_prompt",
        "sample_at_first",
    }
)
# extra_args that only change logging, saving or data-loading speed
_RESUMABLE_EXTRA_ARGS = frozenset(
    {
        "max_data_loader_n_workers",
        "persistent_data_loader_workers",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "logging_dir",
        "log_with",
        "log_prefix",
        "log_tracker_name",
        "training_comment",
        "save_state_on_train_end",
    }
)


@dataclasses.dataclass(frozen=True)
class SavedState:
    """A state folder sd-scripts can resume from."""

    path: Path
    step: int  # optimizer steps done when it was saved
    epoch: int  # the 1-based epoch that step belongs to
    record: dict[str, Any] | None  # spyke-lora.json, or None for a state saved by another tool


def _state_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(name)}(-step\d{{8}}|-\d{{6}})?-state")


def read_state(path: Path) -> SavedState:
    """The state folder at ``path``; :class:`ConfigError` when it is not one."""
    info = path / _SD_SCRIPTS_STATE
    if not path.is_dir():
        raise ConfigError(f"`resume` {str(path)!r} is not a folder; pass 'latest' or a NAME-step…-state folder")
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
        step, epoch = int(data["current_step"]), int(data["current_epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"`resume` {str(path)!r} is not a training state ({info.name} is missing or unreadable: {e}); a state is "
            f"a NAME-step…-state folder written by a run with `save_state = true`"
        ) from None
    record = None
    try:
        record = json.loads((path / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return SavedState(path, step, epoch, record)


def find_states(cfg: TrainConfig) -> list[SavedState]:
    """The states of ``cfg.output_name`` in ``cfg.output_dir``, oldest step first."""
    if not cfg.output_dir.is_dir():
        return []
    pattern = _state_pattern(cfg.output_name)
    found = []
    for path in cfg.output_dir.iterdir():
        if pattern.fullmatch(path.name) and (path / _SD_SCRIPTS_STATE).is_file():
            try:
                found.append(read_state(path))
            except ConfigError:
                continue  # a damaged folder is not a candidate for "latest"
    return sorted(found, key=lambda s: (s.step, s.path.name))


def resolve_resume(cfg: TrainConfig, resume: str | os.PathLike[str], processes: int = 1) -> SavedState:
    """The state ``resume`` names ("latest", or a folder), checked against ``cfg`` and the run's world size
    ``processes``: a state another config (or another dataset, or another number of processes) produced is refused
    with every difference listed."""
    if isinstance(resume, str) and resume == "latest":
        states = find_states(cfg)
        if not states:
            raise ConfigError(
                f"`resume = 'latest'`: no saved training state of `{cfg.output_name}` in {cfg.output_dir}; states "
                f"are saved with every checkpoint (and on a stop) when `save_state = true`"
            )
        state = states[-1]
    else:
        state = read_state(Path(resume).expanduser().absolute())
    problems = []
    if state.record is None:
        problems.append(
            f"{state.path} was not saved by spyke-lora (no {RECORD_NAME}), so it cannot be checked against this "
            f"config; resume it with the sd-scripts command line (--resume) instead"
        )
    else:
        problems += config_differences(state.record, cfg)
        saved_processes = int(state.record.get("processes", 1))
        if saved_processes != processes:
            problems.append(
                f"it was saved by a run of {saved_processes} process(es), and this one has {processes}: an epoch's "
                f"steps depend on the number of processes (sd-scripts divides its batches between them), so the "
                f"schedule would not go on where it stopped; resume with processes={saved_processes}"
            )
    if int(cfg.extra_args.get("gradient_accumulation_steps", 1) or 1) > 1:
        problems.append(
            "resuming with `extra_args.gradient_accumulation_steps` > 1 is refused: sd-scripts v0.10.1 skips the "
            "wrong number of batches then (kohya-ss/sd-scripts#2407)"
        )
    if problems:
        raise ConfigError([f"cannot resume from {state.path}: {p}" for p in problems])
    return state


def state_record(cfg: TrainConfig, processes: int = 1) -> dict[str, Any]:
    """What is saved next to every state, to check a resume against (``processes``: the run's world size)."""
    return {"config": cfg.to_dict(), "dataset": dataset_fingerprint(cfg), "processes": processes}


def config_differences(record: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Why ``cfg`` would train differently from the run that saved ``record`` (empty: it may resume)."""
    differences = []
    saved = TrainConfig.from_dict(record["config"]).to_dict()
    now = cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        before, after = saved.get(key), now.get(key)
        if key == "extra_args":
            before, after = (
                {k: v for k, v in (d or {}).items() if k not in _RESUMABLE_EXTRA_ARGS} for d in (before, after)
            )
        if before != after:
            differences.append(f"`{key}` was {_show(before)}, now {_show(after)}")
    fingerprint = dataset_fingerprint(cfg)
    if record.get("dataset") != fingerprint:
        differences += _dataset_differences(record.get("dataset") or {}, fingerprint)
    if differences:
        differences.append(
            "a resumed run must train exactly as the run it continues; undo these changes, or start a new run "
            "(another `output_name`)"
        )
    return differences


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def dataset_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """Per subset folder: repeats, regularisation flag, and a hash of every image and caption file's name, size and
    content (so an added, removed, replaced or re-captioned image is noticed)."""
    extensions = set(image_extensions(cfg))
    subsets: dict[str, Any] = {}
    for folder in dataset_folders(cfg):
        files: dict[str, str] = {}
        if folder.folder.is_dir():
            for path in sorted(folder.folder.iterdir()):
                if path.is_file() and (path.suffix.lower() in extensions or path.suffix == folder.caption_extension):
                    files[path.name] = _file_hash(path)
        subsets[str(folder.folder)] = {"repeats": folder.repeats, "is_reg": folder.is_reg, "files": files}
    return subsets


def _file_hash(path: Path) -> str:
    return sha256(path)[:16]


def _dataset_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for folder in sorted(set(before) | set(after)):
        if folder not in after:
            out.append(f"dataset folder {folder} is no longer used")
            continue
        if folder not in before:
            out.append(f"dataset folder {folder} is new")
            continue
        old, new = before[folder], after[folder]
        for key in ("repeats", "is_reg"):
            if old.get(key) != new.get(key):
                out.append(f"{folder}: {key} was {old.get(key)}, now {new.get(key)}")
        old_files, new_files = old.get("files", {}), new.get("files", {})
        added = sorted(set(new_files) - set(old_files))
        removed = sorted(set(old_files) - set(new_files))
        changed = sorted(n for n in set(old_files) & set(new_files) if old_files[n] != new_files[n])
        for label, names in (("added", added), ("removed", removed), ("changed", changed)):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                out.append(f"{folder}: {len(names)} file(s) {label} ({shown})")
    return out


def partial_state_dir(final: Path) -> Path:
    """Where a state folder is written before it is renamed to ``final`` (same folder, hidden)."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


def _old_state_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.old")


def replace_state_dir(partial: Path, final: Path) -> None:
    """Put the complete folder ``partial`` at ``final``: the previous ``final`` (a rerun with ``overwrite``) is moved
    aside first and deleted last, so at every moment one complete state is under one of the two names."""
    for root, _, files in os.walk(partial):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    old = None
    if final.exists():
        old = _old_state_dir(final)
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_states(cfg: TrainConfig) -> None:
    """Clean up after a killed run: half-written state folders are deleted; a previous state moved aside just
    before the kill goes back to its name when no complete new one took it."""
    if not cfg.output_dir.is_dir():
        return
    pattern = re.compile(rf"\.({re.escape(cfg.output_name)}(-step\d{{8}}|-\d{{6}})?-state)\.\d+\.(partial|old)")
    for leftover in sorted(cfg.output_dir.iterdir(), key=lambda p: p.name.endswith(".partial")):
        match = pattern.fullmatch(leftover.name)
        if match is None or not leftover.is_dir():
            continue
        final = leftover.with_name(match.group(1))
        if match.group(3) == "old" and not final.exists():
            os.replace(leftover, final)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def states_after(cfg: TrainConfig, step: int) -> list[Path]:
    """State folders of ``cfg.output_name`` beyond ``step`` (a resumed run would replace them)."""
    return [s.path for s in find_states(cfg) if s.step > step]
