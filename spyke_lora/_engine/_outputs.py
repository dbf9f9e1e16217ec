"""What a run writes next to its LoRA files, and what it finds there.

Earlier outputs of the same name, leftovers of a killed run, the prompt and dataset files sd-scripts reads, and the
samples manifest.
"""

from __future__ import annotations

import re
from pathlib import Path

from .._config import TrainConfig
from .._errors import SpykeLoraError
from .._files import write_atomically
from ._after_save import SampleSpec
from ._argv import dataset_toml_path, dataset_toml_text, sample_prompts_path, sample_prompts_text
from ._state import find_states

__all__ = [
    "existing_outputs",
    "prepare_samples",
    "remove_partial_files",
    "samples_manifest_path",
    "write_dataset_toml",
    "write_sample_prompts",
]


def existing_outputs(cfg: TrainConfig, after_step: int | None = None) -> list[Path]:
    """LoRA files of ``cfg.output_name`` already in ``cfg.output_dir`` (final, per-step and per-epoch names).

    With ``after_step`` (a resume from that step): only what the resumed run would replace although it holds later
    work: files saved after that step (their ``ss_steps`` metadata says so) and state folders beyond it. The
    stopped run's own final file, saved at that step, is meant to be replaced."""
    if not cfg.output_dir.is_dir():
        return []
    name = cfg.output_name
    found = []
    for path in sorted(cfg.output_dir.iterdir()):
        stem, suffix = path.stem, path.suffix
        if suffix != ".safetensors" or not path.is_file():
            continue
        if not stem.startswith(name):
            continue
        # sd-scripts' names: NAME, NAME-step00000200 (STEP_FILE_NAME), NAME-000001 (EPOCH_FILE_NAME)
        rest = stem[len(name) :]
        is_step = rest.startswith("-step") and rest[5:].isdigit()
        is_epoch = rest.startswith("-") and rest[1:].isdigit()
        if rest == "" or is_step or is_epoch:
            if after_step is None or _saved_at_step(path) > after_step:
                found.append(path)
    if after_step is not None:
        found += [s.path for s in find_states(cfg) if s.step > after_step]
    return found


def _saved_at_step(path: Path) -> float:
    """The step a LoRA file was saved at (sd-scripts' ``ss_steps``); infinity when unknown, so it is kept."""
    from .._header import inspect_model

    try:
        return int(inspect_model(path).metadata.get("ss_steps", ""))
    except (SpykeLoraError, ValueError):
        return float("inf")


def remove_partial_files(cfg: TrainConfig) -> None:
    """Files a killed run left half-written under a temporary name (never under a final name)."""
    if not cfg.output_dir.is_dir():
        return
    # the temporary names (_files.temporary_name, keep_suffix) of NAME, NAME-step00000200 and NAME-000001, and no
    # other output_name's
    pattern = re.compile(rf"\.{re.escape(cfg.output_name)}(-step\d+|-\d+)?\.\d+(\.\d+)?\.partial\.safetensors")
    for leftover in cfg.output_dir.iterdir():
        if pattern.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def samples_manifest_path(cfg: TrainConfig) -> Path:
    """The run's sample manifest: one JSON line per sample image (step, prompt, cfg_scale, seed, path, checkpoint)."""
    return cfg.output_dir / f"{cfg.output_name}.samples.jsonl"


def prepare_samples(cfg: TrainConfig, *, fresh: bool) -> SampleSpec | None:
    """Write sd-scripts' prompt file; start a new manifest for a fresh run (a resumed one appends to its own)."""
    if write_sample_prompts(cfg) is None:
        return None
    manifest = samples_manifest_path(cfg)
    if fresh:
        manifest.unlink(missing_ok=True)
    return SampleSpec(
        lines=tuple((prompt, float(scale)) for prompt in cfg.sample_prompts for scale in cfg.sample_cfg_scales),
        seed=cfg.sample_seed,
        output_name=cfg.output_name,
        folder=cfg.output_dir / "sample",
        manifest=manifest,
    )


def write_sample_prompts(cfg: TrainConfig) -> Path | None:
    """Write the prompt file that ``sd_scripts_argv(cfg)`` points at (atomically); None when sampling is off."""
    text = sample_prompts_text(cfg)
    if text is None:
        return None
    return write_atomically(sample_prompts_path(cfg), text)


def write_dataset_toml(cfg: TrainConfig) -> Path | None:
    """Write the dataset TOML that ``sd_scripts_argv(cfg)`` points at (atomically); None for ``dataset_config``."""
    text = dataset_toml_text(cfg)
    if text is None:
        return None
    return write_atomically(dataset_toml_path(cfg), text)
