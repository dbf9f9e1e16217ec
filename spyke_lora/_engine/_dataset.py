"""The dataset as sd-scripts sees it: its folders, and its step count from sd-scripts' own dataset code, no model.

sd-scripts builds its datasets from the dataset TOML and the command line (``BlueprintGenerator`` +
``generate_dataset_group_by_blueprint``), and ``len()`` of the resulting group is the number of batches per epoch:
it registers regularisation images, repeated as needed, until they match the training images with repeats, so an
epoch with regularisation has twice the batches. ``train()`` then derives steps and epochs from that length
(``train_network.py`` l.739-745 and l.978-980); :func:`count_steps` does the same arithmetic on the same length.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import toml

from .._config import TrainConfig, repeats_from_folder_name
from .._device import DeviceChoice
from .._errors import ConfigError, SpykeLoraError
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
    dataset: int = 0  # the index of its dataset (sd-scripts drops a second subset of one folder in a dataset)
    written: str = ""  # ``image_dir`` as sd-scripts reads it ("": ``str(folder)``); its subsets compare these

    @property
    def image_dir(self) -> str:
        """The folder as sd-scripts' ``DreamBoothSubset.image_dir`` holds it (the string its ``__eq__`` compares)."""
        return self.written or str(self.folder)


def dataset_folders(cfg: TrainConfig) -> list[Folder]:
    """The subsets of ``cfg``: ``train_dir``/``reg_dir``, or every subset of the user's dataset TOML (values
    inherited from the dataset and ``[general]`` tables as sd-scripts does, then from the config)."""
    if cfg.dataset_config is not None:
        return _toml_folders(cfg, cfg.dataset_config)
    train, reg, extension = cfg.train_dir, cfg.reg_dir, cfg.caption_extension
    repeats = cfg.resolved_num_repeats()  # 0 from a '0_' folder: sd-scripts ignores it (the preflight refuses it)
    repeats = 1 if repeats is None else repeats
    folders = [Folder(train, repeats, False, extension, _class_tokens(train), "`train_dir`")]
    if reg is not None:
        folders.append(Folder(reg, cfg.reg_repeats, True, extension, _class_tokens(reg), "`reg_dir`"))
    return folders


def _toml_folders(cfg: TrainConfig, path: Path) -> list[Folder]:
    """Every subset of the dataset TOML at ``path``, read by sd-scripts' own ``load_user_config``; a relative
    ``image_dir`` resolved as sd-scripts resolves it (from the working directory, ``os.path.isdir`` in
    ``load_dreambooth_dir``, train_util.py l.1973), refused where the TOML's folder would give another folder."""
    data = read_dataset_config(cfg, path)
    general = data.get("general", {})
    folders, problems = [], []
    for d, dataset in enumerate(data.get("datasets", [])):
        for s, subset in enumerate(dataset.get("subsets", [])):
            where = f"{path.name} datasets[{d}].subsets[{s}]"
            if "image_dir" not in subset:
                problems.append(f"{where} has no `image_dir`; add the folder of its images")
                continue
            problems += _relative_path_problems(where, path, subset)
            tables = (subset, dataset, general)  # the value of a key: the subset's, else the dataset's, else general's
            repeats = _inherited(tables, "num_repeats", 1)
            if isinstance(repeats, bool) or not isinstance(repeats, int):
                problems.append(f"{where} `num_repeats` must be a whole number such as 10, got {repeats!r}")
                continue
            fresh = tuple(key for key in ("color_aug", "random_crop") if _inherited(tables, key, False))
            extension = _inherited(tables, "caption_extension", cfg.caption_extension)
            is_reg, tokens = bool(subset.get("is_reg", False)), subset.get("class_tokens")
            written = str(subset["image_dir"])
            folder = Path(os.path.abspath(written))
            folders.append(Folder(folder, repeats, is_reg, extension, tokens, where, fresh, d, written))
    if problems:
        raise ConfigError(problems)
    if not folders:
        raise ConfigError(f"`dataset_config` {str(path)!r} has no [[datasets.subsets]] entry")
    return folders


# The paths of a dataset TOML's subset that sd-scripts opens as written (relative: from the working directory):
# the images, the masks (``conditioning_data_dir``, with masked_loss) and a fine-tuning subset's metadata.
_SUBSET_PATHS = ("image_dir", "conditioning_data_dir", "metadata_file")


def _relative_path_problems(where: str, toml_path: Path, subset: dict[str, Any]) -> list[str]:
    """A relative path of a subset names another file from the working directory (what sd-scripts reads) than
    from the TOML's folder (what a reader of the TOML expects), or a path starting with ``~`` (sd-scripts does not
    expand it): each is a problem naming both, and the absolute path to write."""
    problems = []
    for key in (k for k in _SUBSET_PATHS if isinstance(subset.get(k), str)):
        written = subset[key]
        from_cwd = Path(os.path.abspath(written))
        if written.startswith("~"):
            meant = Path(os.path.expanduser(written))
            why = "starts with '~', which sd-scripts does not expand"
        elif not os.path.isabs(written):
            meant = Path(os.path.abspath(toml_path.parent / written))
            why = f"is relative: sd-scripts reads it from the working directory, as {str(from_cwd)!r}"
        else:
            continue
        if os.path.realpath(from_cwd) == os.path.realpath(meant):
            continue  # the working directory is the TOML's folder: both read the same folder
        label = "folder" if key == "image_dir" else key
        problems.append(
            f"{where} {label} {written!r} {why}, not from the TOML's folder ({str(meant)!r}); write the absolute "
            f"path: {key} = {str(meant)!r}"
        )
    return problems


def read_dataset_config(cfg: TrainConfig, path: Path) -> dict[str, Any]:
    """The user's dataset TOML (or JSON) as sd-scripts reads it: its own ``config_util.load_user_config``, which
    opens a ``.toml`` as UTF-8 with the ``toml`` package (a byte-order mark is then part of the first key) and
    refuses any other extension but ``.json``.

    Args:
        cfg: The run's config (which sd-scripts).
        path: The ``dataset_config`` file.

    Returns:
        Its tables.

    Raises:
        ConfigError: The file is missing, a folder, or sd-scripts cannot read it: naming the file, why, and the fix.
    """
    if path.is_dir():
        raise ConfigError(f"`dataset_config` {str(path)!r} is a folder, not a dataset TOML file; name the .toml file")
    if not path.is_file():
        raise ConfigError(f"`dataset_config` {str(path)!r} does not exist; check the path")
    host = host_for(cfg.sd_scripts_dir)
    quiet = io.StringIO()
    try:
        with host.active(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            return dict(host.train_network().config_util.load_user_config(str(path)))
    except SpykeLoraError:
        raise
    except Exception as e:  # noqa: BLE001 -- what sd-scripts' reader raises, as a problem naming the file
        raise ConfigError(f"`dataset_config` {str(path)!r} {_unreadable(path, e)}") from None


def _unreadable(path: Path, error: Exception) -> str:
    """Why sd-scripts' reader could not read ``path``, and the fix (for a message after the file's name)."""
    head = path.read_bytes()[:4096]
    encoding_fix = "save it as UTF-8 (without a BOM: in a Windows editor, 'UTF-8', not 'UTF-8 with BOM')"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in head:
        return f"is UTF-16, and sd-scripts reads a dataset TOML as UTF-8; {encoding_fix}"
    if head.startswith(codecs.BOM_UTF8):
        return (
            f"starts with a UTF-8 byte-order mark (BOM), which sd-scripts' TOML reader takes for part of the first "
            f"key ({error}); {encoding_fix}"
        )
    if isinstance(error, UnicodeDecodeError):
        return (
            f"is not UTF-8 (byte {error.object[error.start]:#04x} at offset {error.start}, perhaps Latin-1 or "
            f"Windows-1252), and sd-scripts reads a dataset TOML as UTF-8; {encoding_fix}"
        )
    if path.suffix.lower() not in (".toml", ".json"):
        return f"is not a .toml or .json file, the only kinds sd-scripts reads; rename it to {path.stem}.toml"
    return f"cannot be read as TOML: {error}; fix the line it names"


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
        if args.gradient_accumulation_steps < 1:  # the preflight refuses it first; other callers get the same
            raise ConfigError(
                f"`extra_args.gradient_accumulation_steps` must be at least 1, got {args.gradient_accumulation_steps}"
            )
        with sd_scripts_errors(cfg, host.root):
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


# sd-scripts' local names of the file its dataset code is reading (read_caption's cap_path, load_image's image_path,
# make_buckets' absolute path, a subset's info cache), innermost first.
_FILE_LOCALS = ("cap_path", "image_path", "img_path", "abs_path", "absolute_path", "npz_path", "info_cache_file")


@contextlib.contextmanager
def sd_scripts_errors(cfg: TrainConfig, root: Path) -> Iterator[None]:
    """What sd-scripts' dataset code raises while planning becomes a :class:`ConfigError` naming the file it was
    reading: the innermost frame of sd-scripts' own code (under ``root``) holding one of its file variables, else its
    subset's ``image_dir``, else the dataset's folders.

    Args:
        cfg: The run's config (its folders, when no frame names a file).
        root: sd-scripts' checkout: only frames of its code are read.

    Raises:
        ConfigError: For any exception but a :class:`~spyke_lora.SpykeLoraError` (raised as it is), the original
            chained.
    """
    try:
        yield
    except SpykeLoraError:
        raise
    except Exception as e:  # noqa: BLE001 -- only SpykeLoraErrors leave the planning
        file, folder = _read_when_raised(e, str(root) + os.sep)
        if file is not None:
            where = f"reading {file!r}"
        else:
            named = [folder] if folder else [str(p) for p in (cfg.dataset_config, cfg.train_dir, cfg.reg_dir) if p]
            where = f"reading the dataset ({', '.join(repr(f) for f in named)})"
        raise ConfigError(
            f"sd-scripts' dataset code failed {where}: {type(e).__name__}: {e}; fix or remove that file (sd-scripts "
            f"would fail the same way when the run starts)"
        ) from e


def _read_when_raised(error: BaseException, root: str) -> tuple[str | None, str | None]:
    """(the file, the subset's folder) sd-scripts' code was reading when it raised ``error``, innermost first."""
    file = folder = None
    tb = error.__traceback__
    while tb is not None:  # outermost to innermost: a later frame's names win
        frame = tb.tb_frame
        if frame.f_code.co_filename.startswith(root):
            names = frame.f_locals
            value = next((names[n] for n in _FILE_LOCALS if isinstance(names.get(n), (str, os.PathLike))), None)
            file = str(value) if value else file
            subset_dir = getattr(names.get("subset"), "image_dir", None)
            folder = str(subset_dir) if isinstance(subset_dir, str) else folder
        tb = tb.tb_next
    return file, folder


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
