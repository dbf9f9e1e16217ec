"""`TrainConfig`: one flat, frozen, typed description of a LoRA run.

Field names follow kohya-ss/sd-scripts' option names wherever one exists, so a kohya user recognises every field.
Defaults are the reference recipe (LORA-01, the Spyke character LoRA). Paths are made absolute when the config is
built (relative to the working directory, or to the TOML file's folder in :meth:`TrainConfig.from_toml`), so a config
means the same thing wherever it is later used.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from ._errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["TrainConfig", "kohya_parent_problem", "read_toml", "repeats_from_folder_name"]

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
SavePrecision = Literal["float", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda", "mps"]

_FOLDER_PREFIX = re.compile(r"^(\d+)_(.+)$")

# The recipe's test prompts (LORA-02): the same ones for every checkpoint, each starting with the trigger.
RECIPE_SAMPLE_PROMPTS = (
    "spyke_plasma_v1, standing in a forest, dramatic lighting, anime style",
    "spyke_plasma_v1, crouching, looking up, urban environment",
    "spyke_plasma_v1, full body, front view, detailed character study",
)


def repeats_from_folder_name(folder: Path | str) -> tuple[int, str] | None:
    """kohya's ``N_name`` folder convention: ``10_spyke_plasma_v1`` -> ``(10, "spyke_plasma_v1")``.

    Args:
        folder: A dataset folder (only its name is read).

    Returns:
        The repeats and the class token (the caption of an image without a caption file), or None when the name
        has no ``N_`` prefix.
    """
    match = _FOLDER_PREFIX.match(Path(folder).name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def kohya_parent_problem(field: str, folder: Path) -> str | None:
    """The problem of a dataset folder given one level too high: kohya's habit of ``train_data_dir = /data/img``
    holding ``/data/img/10_spyke_plasma_v1`` (sd-scripts' layout without a dataset TOML, where each ``N_name``
    subfolder is a subset), where spyke-lora's field names the ``N_name`` folder itself.

    Args:
        field: The field that names ``folder`` (``train_dir``, ``reg_dir``).
        folder: The folder given.

    Returns:
        The message naming the ``N_name`` folders inside and the setting to use (one of them, or a dataset TOML
        for several), or None when ``folder`` holds no ``N_name`` folder (or cannot be read).
    """
    try:
        inside = sorted(p for p in Path(folder).iterdir() if repeats_from_folder_name(p) and p.is_dir())
    except OSError:
        return None
    if not inside:
        return None
    if len(inside) == 1:
        return (
            f"`{field}` {str(folder)!r} holds the kohya dataset folder {inside[0].name!r} instead of being one "
            f"(spyke-lora's `{field}` is the N_name folder itself, not sd-scripts' train_data_dir above it); "
            f"set `{field} = {str(inside[0])!r}`"
        )
    names = ", ".join(repr(p.name) for p in inside[:5]) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
    return (
        f"`{field}` {str(folder)!r} holds {len(inside)} kohya dataset folders ({names}) instead of being one "
        f"(spyke-lora's `{field}` is one N_name folder, not sd-scripts' train_data_dir above them); pick one, "
        f"e.g. `{field} = {str(inside[0])!r}`, or train on all of them with a dataset TOML (`dataset_config`) "
        f"that lists each folder as a subset"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A LoRA training run. Required: ``base_model``, ``output_dir``, ``output_name`` and a dataset
    (``train_dir``, optionally ``reg_dir``; or ``dataset_config``). Everything else defaults to the LORA-01 recipe."""

    # --- what to train on -------------------------------------------------------------------------------------------
    base_model: Path  # an SD1.x checkpoint (.safetensors)
    output_dir: Path  # where the LoRA files (and the generated dataset TOML) are written
    output_name: str  # file stem: NAME.safetensors, NAME-step00000200.safetensors, ...
    train_dir: Path | None = None  # folder of images + captions, e.g. .../10_spyke_plasma_v1
    num_repeats: int | None = None  # None: the N_ prefix of train_dir's folder name (10_spyke_plasma_v1 -> 10)
    reg_dir: Path | None = None  # regularisation images (optional)
    reg_repeats: int = 1
    dataset_config: Path | None = None  # an existing kohya dataset TOML, instead of train_dir/reg_dir
    # --- dataset ----------------------------------------------------------------------------------------------------
    resolution: int = 512
    train_batch_size: int = 1
    enable_bucket: bool = True
    caption_extension: str = ".txt"
    shuffle_caption: bool = True
    keep_tokens: int = 1  # the trigger word stays first when captions are shuffled
    flip_aug: bool = False  # off: mirroring breaks asymmetric costumes
    # --- network and optimiser --------------------------------------------------------------------------------------
    network_module: str = "networks.lora"
    network_dim: int = 32
    network_alpha: float = 16.0
    optimizer_type: str = "AdamW"
    learning_rate: float = 1e-4
    unet_lr: float | None = 1e-4
    text_encoder_lr: float | None = 5e-5
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    # --- length and saving ------------------------------------------------------------------------------------------
    max_train_epochs: int | None = 4
    max_train_steps: int | None = None  # when set, wins over max_train_epochs
    save_every_n_steps: int | None = 200
    save_precision: SavePrecision = "float"
    save_state: bool = False  # also save the training state with every checkpoint (and on a stop): resumable
    tensorboard: bool = False  # sd-scripts' own TensorBoard logging, into OUTPUT_DIR/tensorboard/NAME-<time>/
    overwrite: bool = False  # False: refuse to start when files of this output_name already exist
    max_nonfinite_steps: int = 1  # stop after this many consecutive NaN/Inf losses (1: at once; 0: never stop)
    # --- samples of every checkpoint (sd-scripts' own sampler), to choose the best one --------------------------------
    sample_prompts: tuple[str, ...] = RECIPE_SAMPLE_PROMPTS  # () turns sampling off
    sample_cfg_scales: tuple[float, ...] = (5.0, 7.0, 9.0)  # every prompt at each of these CFG scales
    sample_seed: int = 1234  # the same seed for every image, so checkpoints are compared on equal terms
    sample_steps: int = 20
    sample_size: int | None = None  # width and height in pixels; None: the training resolution
    sample_sampler: str = "euler_a"  # sd-scripts' sampler names: ddim, euler, euler_a, dpmsolver++, k_dpm_2, ...
    sample_negative_prompt: str = ""
    sample_at_first: bool = False  # also sample the untrained base model (a "step 0" row to compare with)
    # --- held-out validation: sd-scripts' validation loss, measured without changing what is trained ----------------
    validation_dir: Path | None = None  # held-out images of the character with captions, never trained on
    validation_split: float = 0.0  # or: this fraction of train_dir's images held out (sd-scripts' seeded split)
    validate_every_n_steps: int | None = None  # None: at every saved file; N: every N steps (and the final file)
    validation_seed: int | None = None  # the noise of every pass; None: `seed`
    max_validation_steps: int | None = None  # held-out batches per pass (sd-scripts' name); None: all of them
    # --- model behaviour --------------------------------------------------------------------------------------------
    mixed_precision: MixedPrecision = "auto"  # auto: fp16 on CUDA, no on MPS and CPU
    clip_skip: int | None = 2
    prior_loss_weight: float = 1.0
    # auto: off when the run fits the device's memory without it (faster: about 1.5x per step), on otherwise; plan()
    # says which was chosen and why (docs/memory.md)
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # latents made once by the VAE, before step 1, instead of at every step: faster (the VAE leaves the loop) and
    # changes what is learnt slightly: each image's latent is sampled once rather than anew each epoch
    cache_latents: bool = True
    cache_latents_to_disk: bool = False  # also keep them as IMAGE_WxH_sd.npz next to each image, for the next run
    seed: int = 42
    # --- where it runs ----------------------------------------------------------------------------------------------
    device: Device = "auto"  # auto: cuda, else mps, else cpu
    # refuse a run whose predicted peak memory is above this: bytes, or a size such as "12GB" or "11.5GiB"; None: a
    # predicted peak above the device's budget is only a warning
    memory_limit: int | None = None
    tokenizer_cache_dir: Path | None = None  # holds openai_clip-vit-large-patch14/ (offline runs)
    sd_scripts_dir: Path | None = None  # None: $SPYKE_LORA_SD_SCRIPTS, else the vendored submodule
    extra_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # any other sd-scripts option

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in dataclasses.fields(self):
            value, problem = _coerce(f.name, _HINTS[f.name], getattr(self, f.name))
            if problem:
                problems.append(problem)
            else:
                object.__setattr__(self, f.name, value)
        if not problems:
            problems += self._cross_field_problems()
        if problems:
            raise ConfigError(problems)

    # --- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a config written by :meth:`to_toml` or by hand.

        Args:
            path: The TOML file. Relative paths in it are relative to its folder.

        Returns:
            The config, checked.

        Raises:
            ConfigError: The file is missing, a folder, unreadable, not text (:func:`read_toml`) or not TOML, or its
                keys and values have problems: every unknown key (with the closest field) and bad value, together,
                each naming its key.
        """
        path = Path(path).expanduser()
        data = read_toml(path, "config file")
        return cls.from_dict(data, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: Path | None = None, source: str | None = None
    ) -> TrainConfig:
        """Build a config from plain data (a parsed TOML).

        Args:
            data: Field names to values, as TOML gives them (paths as strings, ``"none"`` for an unset field).
            base_dir: Where relative paths are resolved from (default: the working directory).
            source: Where ``data`` comes from, named in the error (e.g. the TOML's path).

        Returns:
            The config, checked.

        Raises:
            ConfigError: Every unknown key, missing required field and bad value, together.
        """
        problems = _unknown_key_problems(data.keys())
        missing = [n for n in _REQUIRED if n not in data]
        problems += [f"`{n}` is required but missing; add `{n} = ...`" for n in missing]
        values = {k: v for k, v in data.items() if k in _HINTS}
        for name, value in values.items():  # "none" unsets an optional field whose default is a value
            if isinstance(value, str) and value.lower() == _NONE and type(None) in typing.get_args(_HINTS[name]):
                values[name] = None
        if base_dir is not None:
            for name in _PATH_FIELDS:
                if isinstance(values.get(name), str):
                    values[name] = _absolute(Path(base_dir) / Path(values[name]).expanduser())
        config = None
        if missing:  # cannot build: report the values' own problems with the missing keys
            problems += [p for name, v in values.items() if (p := _coerce(name, _HINTS[name], v)[1])]
        else:
            try:
                config = cls(**values)
            except ConfigError as e:
                problems += e.problems
        if problems or config is None:
            raise ConfigError(problems, source=source)
        return config

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied, and checked as a new config is.

        Args:
            **changes: Field names to new values.

        Returns:
            The new config (this one is unchanged: configs are frozen).

        Raises:
            ConfigError: An unknown field name (with the closest one), or a value with a problem.
        """
        problems = _unknown_key_problems(changes.keys())
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(self, **changes)

    # --- output -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, what :meth:`to_toml` writes.

        Returns:
            Field names to values: paths as strings, tuples as lists, ``extra_args`` as a dict; ``None`` left out
            where it is the default, else written as ``"none"`` (TOML has no null).
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.default is not None:
                    out[f.name] = _NONE
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_toml(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as TOML (:meth:`to_toml_string`), so that ``TrainConfig.from_toml(path) == self``.

        Args:
            path: The file to write (replaced if it exists).

        Returns:
            ``path``, as a :class:`~pathlib.Path`.
        """
        path = Path(path)
        path.write_text(self.to_toml_string(), encoding="utf-8")
        return path

    def to_toml_string(self) -> str:
        """The TOML text :meth:`to_toml` writes.

        Returns:
            One ``key = value`` line per field of :meth:`to_dict`, then an ``[extra_args]`` table when it has any.
        """
        data = self.to_dict()
        extra = data.pop("extra_args", {})
        lines = ["# spyke-lora TrainConfig", *(f"{k} = {_toml_value(v)}" for k, v in data.items())]
        if extra:
            lines += ["", "[extra_args]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in extra.items())]
        return "\n".join(lines) + "\n"

    # --- derived values ---------------------------------------------------------------------------------------------
    def resolved_num_repeats(self) -> int | None:
        """How many times each training image is repeated per epoch.

        Returns:
            ``num_repeats``, else the ``N_`` prefix of ``train_dir``'s name, else None (no ``train_dir``, or no
            prefix).
        """
        if self.num_repeats is not None:
            return self.num_repeats
        if self.train_dir is None:
            return None
        parsed = repeats_from_folder_name(self.train_dir)
        return parsed[0] if parsed else None

    def _cross_field_problems(self) -> list[str]:
        problems = []
        if self.train_dir is None and self.dataset_config is None:
            problems.append("no dataset: set `train_dir` (a folder of images and captions) or `dataset_config`")
        if self.train_dir is not None and self.dataset_config is not None:
            problems.append(
                "`train_dir` and `dataset_config` are both set; use one: the dataset TOML already names its folders"
            )
        if self.cache_latents_to_disk and not self.cache_latents:
            problems.append("`cache_latents_to_disk = true` needs `cache_latents = true`; set both, or neither")
        if self.reg_dir is not None and self.dataset_config is not None:
            problems.append("`reg_dir` cannot be combined with `dataset_config`; add the folder to the dataset TOML")
        if self.reg_dir is not None and self.train_dir is None and self.dataset_config is None:
            problems.append("`reg_dir` is set without `train_dir`; set `train_dir` too")
        if self.train_dir is not None and self.resolved_num_repeats() is None:
            name = self.train_dir.name
            problems.append(
                kohya_parent_problem("train_dir", self.train_dir)
                or f"`num_repeats` is not set and the folder name {name!r} of `train_dir` has no `N_` prefix; "
                f"set `num_repeats = 10` or rename the folder to '10_{name}'"
            )
        if self.max_train_epochs is None and self.max_train_steps is None:
            problems.append("set `max_train_epochs` or `max_train_steps`; both are empty")
        if self.resolution % 64:
            suggestion = max(64, round(self.resolution / 64) * 64)
            problems.append(f"`resolution` must be a multiple of 64, got {self.resolution}; try {suggestion}")
        if not self.output_name or any(c in self.output_name for c in "/\\") or self.output_name in {".", ".."}:
            problems.append(
                f"`output_name` must be a plain file stem such as 'spyke_plasma_v1', got {self.output_name!r}"
            )
        if not self.caption_extension.startswith("."):
            problems.append(
                f"`caption_extension` must start with a dot, got {self.caption_extension!r}; "
                f"try '.{self.caption_extension}'"
            )
        problems += _extra_args_problems(self.extra_args)
        problems += self._sample_problems()
        problems += self._validation_problems()
        return problems

    def _validation_problems(self) -> list[str]:
        problems = []
        if not 0 <= self.validation_split < 1:
            problems.append(
                f"`validation_split` is the fraction of `train_dir` held out, from 0 (none) to below 1, got "
                f"{self.validation_split}; try 0.1"
            )
        if self.validation_split and self.validation_dir is not None:
            problems.append(
                "`validation_dir` and `validation_split` are both set; hold out one way: a folder of "
                "its own (`validation_dir`), or a fraction of `train_dir` (`validation_split`)"
            )
        if self.validation_split and self.train_dir is None:
            problems.append(
                "`validation_split` holds out part of `train_dir`, which is not set (with "
                "`dataset_config`, set `validation_dir` to a folder of held-out images)"
            )
        if self.validation_dir is None and not self.validation_split:
            unused = [n for n in ("validate_every_n_steps", "max_validation_steps") if getattr(self, n) is not None]
            return problems + [
                f"`{n}` is set but there are no held-out images; set `validation_dir` (a folder of held-out images) "
                f"or `validation_split`, or remove `{n}`"
                for n in unused
            ]
        if self.validation_dir is None:
            return problems
        for name in ("train_dir", "reg_dir"):
            folder = getattr(self, name)
            if folder is not None and (folder == self.validation_dir or self.validation_dir in folder.parents):
                problems.append(
                    f"`validation_dir` {str(self.validation_dir)!r} is (or holds) `{name}`: held-out images must be "
                    f"images the run never trains on; put them in a folder of their own"
                )
        return problems

    def _sample_problems(self) -> list[str]:
        problems = []
        for i, prompt in enumerate(self.sample_prompts):
            if not prompt.strip() or "\n" in prompt or " --" in prompt:
                problems.append(
                    f"`sample_prompts[{i}]` must be one non-empty line without ' --' (sd-scripts reads ' --' as the "
                    f"start of an option), got {prompt!r}"
                )
        if " --" in self.sample_negative_prompt or "\n" in self.sample_negative_prompt:
            problems.append(
                f"`sample_negative_prompt` must be one line without ' --', got {self.sample_negative_prompt!r}"
            )
        if self.sample_prompts and not self.sample_cfg_scales:
            problems.append("`sample_cfg_scales` is empty; give at least one, e.g. [7], or set `sample_prompts = []`")
        if self.sample_size is not None and self.sample_size % 8:
            problems.append(
                f"`sample_size` must be a multiple of 8, got {self.sample_size}; try {self.sample_size // 8 * 8}"
            )
        return problems


# --- checking values --------------------------------------------------------------------------------------------------

_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)
_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
_PATH_FIELDS = tuple(name for name, hint in _HINTS.items() if hint is Path or Path in typing.get_args(hint))
_MINIMUM: dict[str, float] = {  # the smallest allowed value of numeric fields
    "num_repeats": 1,
    "reg_repeats": 1,
    "resolution": 64,
    "train_batch_size": 1,
    "keep_tokens": 0,
    "network_dim": 1,
    "network_alpha": 0,
    "learning_rate": 0,
    "unet_lr": 0,
    "text_encoder_lr": 0,
    "lr_warmup_steps": 0,
    "max_train_epochs": 1,
    "max_train_steps": 1,
    "save_every_n_steps": 1,
    "clip_skip": 1,
    "prior_loss_weight": 0,
    "max_nonfinite_steps": 0,
    "sample_cfg_scales": 0,
    "sample_steps": 1,
    "sample_size": 64,
    "validate_every_n_steps": 1,
    "max_validation_steps": 1,
}


def _absolute(path: Path) -> Path:
    """Absolute and normalised (``..`` removed) without resolving symlinks."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(hint))
    return {Path: "a path", int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
# accelerate's convention (max_memory="10GiB"): GB is 10^9 bytes, GiB is 2^30
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: Any) -> int | None:
    """Bytes from a size, as ``memory_limit`` takes it.

    Args:
        value: An integer (bytes) or a size such as "12GB" (10^9 bytes per GB) or "11.5GiB" (2^30 per GiB).

    Returns:
        The bytes, or None when ``value`` is neither.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _coerce(name: str, hint: Any, value: Any) -> tuple[Any, str | None]:
    """Check ``value`` against the field's type; return (normalised value, problem or None)."""
    if name == "gradient_checkpointing":
        if isinstance(value, bool) or value == "auto":
            return value, None
        return value, f"`gradient_checkpointing` must be true, false or 'auto', got {value!r}"
    if name == "memory_limit" and value is not None:
        size = parse_size(value)
        if size is None or size <= 0:
            return value, (
                f"`memory_limit` must be a number of bytes or a size such as '12GB' or '11.5GiB' (GB = 10^9 bytes, "
                f"GiB = 2^30), got {value!r}"
            )
        return size, None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None, None
        return _coerce(name, args[0], value)
    if value is None:
        return value, f"`{name}` is required, got None; set it to {_type_name(hint)}"
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value, None
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        return value, f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}{hint_text}"
    if hint is Path:
        if isinstance(value, (str, os.PathLike)) and str(value):
            return _absolute(Path(value)), None
        return value, f"`{name}` must be a path, got {value!r}"
    if hint is bool:
        if isinstance(value, bool):
            return value, None
        return value, f"`{name}` must be true or false, got {value!r}"
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _range_checked(name, value)
        return value, f"`{name}` must be an integer, got {value!r}"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                return value, f"`{name}` must be a finite number, got {value!r}"
            return _range_checked(name, float(value))
        return value, f"`{name}` must be a number, got {value!r}"
    if hint is str:
        if isinstance(value, str):
            return value, None
        return value, f"`{name}` must be a string, got {value!r}"
    if origin is tuple:  # tuple[T, ...]: a TOML array
        if not isinstance(value, (list, tuple)):
            return value, f"`{name}` must be a list, got {value!r}"
        items = []
        for item in value:
            coerced, problem = _coerce(name, typing.get_args(hint)[0], item)
            if problem:
                return value, f"{problem} (in the list `{name}`)"
            items.append(coerced)
        return tuple(items), None
    if typing.get_origin(hint) in (Mapping, dict) or hint is Mapping:
        if isinstance(value, Mapping):
            return types.MappingProxyType(dict(value)), None
        return value, f"`{name}` must be a table of sd-scripts options, got {value!r}"
    raise AssertionError(f"unhandled type {hint!r} for {name}")  # pragma: no cover


# sd-scripts seeds NumPy with `seed` (train_network.py line 505: accelerate's set_seed -> np.random.seed), and the
# held-out passes seed it with `validation_seed`; NumPy takes 0..2**32-1 and nothing else ("Seed must be between 0 and
# 2**32 - 1"). A sample seed outside it is not read as a seed at all: sd-scripts' prompt line parser
# (library/train_util.py line 6272, r"d (\d+)") skips "--d -1" and samples every checkpoint with a random seed.
_SEEDS = {"seed": 42, "sample_seed": 1234, "validation_seed": 42}  # the field and the fix offered
_SEED_MAX = 2**32 - 1
# SD1.5's text encoder (CLIP ViT-L/14) has 12 layers (library/model_util.py line 1058, num_hidden_layers=12): sd-scripts
# takes hidden_states[-clip_skip] of its 13 (the token embeddings, then each layer; library/strategy_sd.py line 77),
# so 13 trains on the embeddings before any layer and 14 or more fail with an IndexError at the first step.
_TEXT_ENCODER_LAYERS = 12


def _range_checked(name: str, value: float) -> tuple[Any, str | None]:
    """(value, problem or None) against the field's minimum in ``_MINIMUM``, a seed's range, clip_skip's layers."""
    if name in _SEEDS and not 0 <= value <= _SEED_MAX:
        habit = "; a negative seed does not mean a random one here" if value < 0 else ""
        return value, (
            f"`{name}` must be from 0 to {_SEED_MAX}, the seeds sd-scripts takes (it seeds NumPy, which takes no "
            f"other), got {value!r}{habit}: pick one, e.g. `{name} = {_SEEDS[name]}`"
        )
    if name == "clip_skip" and value > _TEXT_ENCODER_LAYERS:
        return value, (
            f"`clip_skip` must be at most {_TEXT_ENCODER_LAYERS}, got {value!r}: SD1.5's text encoder has "
            f"{_TEXT_ENCODER_LAYERS} layers, and sd-scripts would train on the token embeddings (13) or fail at the "
            f"first step (14 or more); try 2 (the anime models' habit) or 1 (the last layer)"
        )
    low = _MINIMUM.get(name)
    if low is not None and value < low:
        return value, f"`{name}` must be at least {low:g}, got {value!r}"
    if name == "network_alpha" and value == 0:
        return value, f"`network_alpha` must be above 0, got {value!r}; the recipe uses 16 (half of network_dim)"
    return value, None


def _unknown_key_problems(keys: typing.Iterable[str]) -> list[str]:
    """One problem per key that is not a field, with the closest field name when there is one."""
    problems = []
    for key in keys:
        if key in _HINTS:
            continue
        close = difflib.get_close_matches(key, list(_HINTS), n=1, cutoff=0.6)
        fix = f"did you mean `{close[0]}`?" if close else "remove it, or put an sd-scripts option under [extra_args]"
        problems.append(f"unknown key `{key}`; {fix}")
    return problems


_EXTRA_SCALARS = (bool, int, float, str)
_NONE = "none"


def _extra_args_problems(extra: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, value in extra.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            fix = f"write {key.lstrip('-')!r}" if isinstance(key, str) and key.startswith("-") else "use its name"
            problems.append(f"`extra_args` key {key!r} is not an sd-scripts option name; {fix}")
            continue
        if key in _HINTS:
            problems.append(f"`extra_args.{key}` duplicates the config field `{key}`; set the field instead")
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, _EXTRA_SCALARS) for v in items):
            problems.append(
                f"`extra_args.{key}` must be true/false, a number, a string or a list of those, got {value!r}"
            )
    return problems


# --- reading TOML -----------------------------------------------------------------------------------------------------

# The byte-order marks an editor writes (Notepad's "UTF-8 with BOM" and "Unicode"), UTF-32's first: UTF-32 LE's
# starts with UTF-16 LE's. A mark says unambiguously how the text is encoded.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
_SAVE_AS_UTF8 = "save it as UTF-8 (TOML files are UTF-8; in Notepad: Save As, Encoding: UTF-8)"


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a table, read as a text editor saved it.

    TOML is UTF-8, and Python's ``tomllib`` reads nothing else (not even a UTF-8 byte-order mark: "Invalid
    statement (at line 1, column 1)"). A byte-order mark says for sure how a file is encoded, so UTF-8, UTF-16 and
    UTF-32 with one are read; text without one must be UTF-8.

    Args:
        path: The file.
        what: What the file is, the first words of every message ("config file", "dataset TOML").

    Returns:
        The parsed table.

    Raises:
        ConfigError: Naming the file: it does not exist, is a folder (with the TOML files in it), cannot be read,
            is UTF-16 without a byte-order mark, is not text, has bytes that are not UTF-8 (the first one's offset,
            line and column), or is not valid TOML.
    """
    text = _toml_text(Path(path), what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def _toml_text(path: Path, what: str) -> str:
    """The text of a TOML file (a byte-order mark honoured and removed); ConfigError when there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise ConfigError(f"{what} {str(path)!r} is a link to {target!r}, which does not exist; check it") from None
        raise ConfigError(f"{what} {str(path)!r} does not exist; check the path") from None
    except OSError as e:
        if path.is_dir():
            raise ConfigError(_folder_problem(path, what)) from None
        raise ConfigError(
            f"{what} {str(path)!r} cannot be read: {e.strerror or e}; check it and its permissions"
        ) from None
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(codec)
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{what} {str(path)!r} starts with a {name} byte-order mark but is not {name} text after it "
                    f"(at offset {e.start + len(bom)}); {_SAVE_AS_UTF8}"
                ) from None
    if b"\0" in data:
        order = _utf16_order(data)
        if order:
            raise ConfigError(
                f"{what} {str(path)!r} is UTF-16 ({order}) text without a byte-order mark, which cannot be told "
                f"apart for sure; {_SAVE_AS_UTF8}"
            )
        raise ConfigError(
            f"{what} {str(path)!r} is not a text file (a NUL byte at offset {data.index(0)}); give the TOML file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(_not_utf8_problem(path, what, data, e.start)) from None


def _folder_problem(path: Path, what: str) -> str:
    try:
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".toml" and p.is_file())
    except OSError:
        found = []
    inside = ", ".join(repr(str(p)) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    hint = f": the TOML files in it are {inside}" if found else ""
    return f"{what} {str(path)!r} is a folder, not a TOML file; give the file itself{hint}"


def _utf16_order(data: bytes) -> str | None:
    """ "little-endian" or "big-endian" when ``data`` reads as UTF-16 text of mostly ASCII (every other byte NUL)."""
    high, low = data[1::2], data[0::2]  # little-endian: the high byte of an ASCII character, NUL, comes second
    for order, zeros, others in (("little-endian", high, low), ("big-endian", low, high)):
        if zeros and zeros.count(0) >= 0.8 * len(zeros) and others.count(0) <= 0.05 * len(others):
            return order
    return None


def _not_utf8_problem(path: Path, what: str, data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    try:  # what the byte most likely is: Windows' own code page (Latin-1's superset)
        seen = f" (in Windows-1252 or Latin-1 it reads {data[offset : offset + 1].decode('cp1252')!r})"
    except UnicodeDecodeError:
        seen = ""
    return (
        f"{what} {str(path)!r} is not UTF-8 text: byte 0x{data[offset]:02X} at offset {offset} (line {line}, "
        f"column {column}) cannot be decoded{seen}; {_SAVE_AS_UTF8}"
    )


# --- writing TOML -----------------------------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".eEn") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover
