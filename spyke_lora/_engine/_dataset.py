"""The dataset as sd-scripts sees it: its folders, and its step count from sd-scripts' own dataset code, no model.

sd-scripts builds its datasets from the dataset TOML and the command line (``BlueprintGenerator`` +
``generate_dataset_group_by_blueprint``), and ``len()`` of the resulting group is the number of batches per epoch:
it registers regularisation images, repeated as needed, until they match the training images with repeats, so an
epoch with regularisation has twice the batches. ``train()`` then derives steps and epochs from that length
(``train_network.py`` l.739-745 and l.978-980); :func:`count_steps` does the same arithmetic on the same length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import random
from pathlib import Path
from typing import Any

import toml

from .._config import TrainConfig, repeats_from_folder_name
from .._device import DeviceChoice
from .._errors import ConfigError
from ._argv import build_argv, dataset_toml_text, parse_argv
from ._host import host_for


@dataclasses.dataclass(frozen=True)
class Folder:
    """One dataset subset: where its images are, how it is repeated, and how its captions are found."""

    folder: Path
    repeats: int
    is_reg: bool
    caption_extension: str
    class_tokens: str | None  # the caption sd-scripts uses for an image without a caption file
    source: str  # the config field or dataset TOML entry that names it, for messages
    fresh_latents: tuple[str, ...] = ()  # augmentations that need a new latent every step (color_aug, random_crop)


def dataset_folders(cfg: TrainConfig) -> list[Folder]:
    """The subsets of ``cfg``: ``train_dir``/``reg_dir``, or every subset of the user's dataset TOML (values
    inherited from the dataset and ``[general]`` tables as sd-scripts does, then from the config)."""
    if cfg.dataset_config is not None:
        return _toml_folders(cfg, cfg.dataset_config)
    train, reg, extension = cfg.train_dir, cfg.reg_dir, cfg.caption_extension
    folders = [Folder(train, cfg.resolved_num_repeats() or 1, False, extension, _class_tokens(train), "`train_dir`")]
    if reg is not None:
        folders.append(Folder(reg, cfg.reg_repeats, True, extension, _class_tokens(reg), "`reg_dir`"))
    return folders


def _toml_folders(cfg: TrainConfig, path: Path) -> list[Folder]:
    """Every subset of the dataset TOML at ``path``, a relative ``image_dir`` from the TOML's folder."""
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, toml.TomlDecodeError) as e:
        raise ConfigError(f"`dataset_config` {str(path)!r} cannot be read as TOML: {e}") from None
    general = data.get("general", {})
    folders = []
    for d, dataset in enumerate(data.get("datasets", [])):
        for s, subset in enumerate(dataset.get("subsets", [])):
            where = f"{path.name} datasets[{d}].subsets[{s}]"
            if "image_dir" not in subset:
                raise ConfigError(f"{where} has no `image_dir`; add the folder of its images")
            folder = Path(subset["image_dir"]).expanduser()
            if not folder.is_absolute():
                folder = path.parent / folder
            tables = (subset, dataset, general)  # the value of a key: the subset's, else the dataset's, else general's
            fresh = tuple(key for key in ("color_aug", "random_crop") if _inherited(tables, key, False))
            repeats = int(_inherited(tables, "num_repeats", 1))
            extension = _inherited(tables, "caption_extension", cfg.caption_extension)
            is_reg, tokens = bool(subset.get("is_reg", False)), subset.get("class_tokens")
            folders.append(Folder(folder, repeats, is_reg, extension, tokens, where, fresh))
    if not folders:
        raise ConfigError(f"`dataset_config` {str(path)!r} has no [[datasets.subsets]] entry")
    return folders


def _inherited(tables: tuple[dict[str, Any], ...], key: str, default: Any) -> Any:
    """``key`` from the first of ``tables`` that sets it, else ``default``."""
    return next((table[key] for table in tables if key in table), default)


def _class_tokens(folder: Path | None) -> str | None:
    parsed = repeats_from_folder_name(folder) if folder is not None else None
    return parsed[1] if parsed else (folder.name if folder is not None else None)


def image_extensions(cfg: TrainConfig) -> tuple[str, ...]:
    """The file extensions sd-scripts treats as images."""
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        return tuple(host.train_network().train_util.IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class SubsetCount:
    """One dataset folder as sd-scripts counted it."""

    folder: Path
    images: int
    repeats: int
    is_reg: bool


@dataclasses.dataclass(frozen=True)
class StepCount:
    """A run's step math as sd-scripts does it: batches, steps, epochs and the files it will save."""

    subsets: tuple[SubsetCount, ...]
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps: batches / gradient accumulation
    total_steps: int
    epochs: int
    checkpoints: tuple[tuple[int, str], ...]  # (step, file name) of every step checkpoint
    final_name: str
    held_out: tuple[Path, ...] = ()  # the images sd-scripts' own split holds out (validation_split), sorted
    processes: int = 1  # the world size the steps are counted for: each process takes its share of the batches


def count_steps(cfg: TrainConfig, device: DeviceChoice, processes: int = 1) -> StepCount:
    """The step plan of ``cfg`` for a run of ``processes`` processes, from sd-scripts' own dataset code (reads image
    sizes and captions, loads no model). Python's ``random`` is left as it was (sd-scripts draws a dataset seed from
    it).

    With several processes, accelerate gives each process ceil(batches / processes) batches of every epoch (its
    ``BatchSamplerShard`` with ``even_batches``), and an optimizer step takes one batch on every process:
    ``train()`` counts ``max_train_epochs`` as ``ceil(batches / processes / gradient_accumulation_steps)`` steps
    per epoch (l.800) and its epochs from the prepared loader's length (l.979)."""
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        train_network = host.train_network()
        train_util = train_network.train_util
        args = parse_argv(train_network.setup_parser(), build_argv(cfg, device))
        train_util.prepare_dataset_args(args, True)
        if args.enable_bucket:
            _check_buckets(args)
        group, held_out = _dataset_group(cfg, args, train_network.config_util)
        subsets = tuple(
            SubsetCount(Path(s.image_dir), s.img_count, s.num_repeats, s.is_reg)
            for dataset in group.datasets
            for s in dataset.subsets
        )
        batches = len(group)
        steps_per_epoch = math.ceil(math.ceil(batches / processes) / args.gradient_accumulation_steps)
        if args.max_train_epochs is not None:
            total = args.max_train_epochs * steps_per_epoch
        else:
            total = args.max_train_steps
        epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0
        every, ext = args.save_every_n_steps, "." + args.save_model_as
        steps = range(every, total + 1, every) if every else ()
        checkpoints = tuple((step, train_util.get_step_ckpt_name(args, ext, step)) for step in steps)
        final = train_util.get_last_ckpt_name(args, ext)
        held = image_paths(held_out)
        return StepCount(subsets, batches, steps_per_epoch, total, epochs, checkpoints, final, held, processes)


def _dataset_group(cfg: TrainConfig, args: Any, config_util: Any) -> tuple[Any, Any]:
    """sd-scripts' own dataset code on the run's dataset TOML and arguments: captions, image sizes, repeats,
    regularisation pairing, buckets. Returns its training ``DatasetGroup`` and its held-out one (None without
    ``validation_split``). Python's ``random`` is left as it was; the "read caption" progress bars are swallowed (a
    plan prints its own summary)."""
    text = dataset_toml_text(cfg)
    user_config: dict[str, Any] = (
        toml.loads(text) if text is not None else config_util.load_user_config(str(cfg.dataset_config))
    )
    state = random.getstate()
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            sanitizer = config_util.ConfigSanitizer(True, True, args.masked_loss, True)
            blueprint = config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
            return config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    finally:
        random.setstate(state)


def image_paths(group: Any) -> tuple[Path, ...]:
    """The images of an sd-scripts ``DatasetGroup`` (None: none), sorted."""
    if group is None:
        return ()
    return tuple(sorted({Path(info.absolute_path) for d in group.datasets for info in d.image_data.values()}))


def _check_buckets(args: Any) -> None:
    """What sd-scripts' bucket manager would reject (or silently get wrong) for this resolution."""
    problems = []
    low, high = min(args.resolution), max(args.resolution)
    if args.min_bucket_reso > low:
        problems.append(
            f"`extra_args.min_bucket_reso` is {args.min_bucket_reso} but `resolution` is {low}: bucketing needs "
            f"min_bucket_reso <= resolution; set min_bucket_reso = {max(64, low // 2)} or enable_bucket = false"
        )
    if args.max_bucket_reso < high:
        problems.append(
            f"`extra_args.max_bucket_reso` is {args.max_bucket_reso} but `resolution` is {high}: bucketing needs "
            f"max_bucket_reso >= resolution; set max_bucket_reso = {high * 2}"
        )
    if args.bucket_reso_steps % 8:
        problems.append(f"`extra_args.bucket_reso_steps` must be a multiple of 8, got {args.bucket_reso_steps}; try 64")
    if problems:
        raise ConfigError(problems)
