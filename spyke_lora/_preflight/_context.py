"""What every check reads and writes: :class:`CheckContext` (a run's inputs, and what is derived from them once),
:class:`FolderContext` (one dataset folder) and :class:`Findings` (the problems and warnings found so far).

A check is a function ``check_x(ctx, found) -> None`` that reads its context and adds to ``found``: a problem
refuses the run, a warning is shown and the run goes on. The context computes what several checks need (the base
model's family, the dataset's folders, the step count, the memory plan) the first time one asks, once.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import toml

from .. import _engine
from .._config import TrainConfig, repeats_from_folder_name
from .._device import DeviceChoice
from .._errors import ConfigError
from .._launch import Launch
from .._memory import MemoryBudget, MemoryPlan, memory_plan

__all__ = ["CheckContext", "Derived", "Findings", "FolderContext", "FolderRule", "Rule", "list_images", "names"]

T = TypeVar("T")
_LIST = 5  # file names shown per problem before "... and N more"


@dataclasses.dataclass
class Findings:
    """The problems (the run is refused) and warnings (shown; the run goes on) found so far, in the order found."""

    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def problem(self, message: str) -> None:
        """Add a problem: a message naming the file or field, the value found and a fix."""
        self.problems.append(message)

    def warning(self, message: str) -> None:
        """Add a warning: a message naming the file or field and what the run will do."""
        self.warnings.append(message)

    def add(self, other: Findings) -> None:
        """Add every problem and warning of ``other``, in its order."""
        self.problems += other.problems
        self.warnings += other.warnings


@dataclasses.dataclass(frozen=True)
class Derived(Generic[T]):
    """A value the checks derive from the config, and the problems found deriving it (then ``value`` is a
    fallback)."""

    value: T
    problems: tuple[str, ...] = ()


def _derive(compute: Callable[[], T], fallback: T) -> Derived[T]:
    try:
        return Derived(compute())
    except ConfigError as e:
        return Derived(fallback, e.problems)


class CheckContext:
    """One ``plan()``'s inputs and what the checks derive from them, each computed once, when first asked for.

    The inputs' checks read ``cfg``, ``device``, ``launch``, ``model``, ``dataset``, ``held_out``, ``resumed``;
    the run's checks (after the inputs passed) also read ``count``, ``memory`` and ``checkpoints``."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: DeviceChoice,
        launch: Launch,
        resume: Any = None,
        memory_budget: MemoryBudget | None = None,
    ) -> None:
        self.cfg, self.device, self.launch = cfg, device, launch
        self.resume, self.memory_budget = resume, memory_budget

    @functools.cached_property
    def model(self) -> Derived[str]:
        """The base model's family ("sd1", "sd2"; "unknown" with the problems of a file that is not one)."""
        from .._header import check_base_model

        return _derive(lambda: check_base_model(self.cfg.base_model).family, "unknown")

    @functools.cached_property
    def dataset(self) -> Derived[list[_engine.Folder]]:
        """The dataset's folders (``train_dir``/``reg_dir``, or the dataset TOML's subsets)."""
        return _derive(lambda: _engine.dataset_folders(self.cfg), [])

    @functools.cached_property
    def extensions(self) -> tuple[str, ...]:
        """The file extensions sd-scripts treats as images."""
        return _engine.image_extensions(self.cfg)

    @functools.cached_property
    def held_out(self) -> _engine.Folder | None:
        """``validation_dir`` as a dataset folder, or None."""
        folder = self.cfg.validation_dir
        if folder is None:
            return None
        parsed = repeats_from_folder_name(folder)
        tokens = parsed[1] if parsed else folder.name
        return _engine.Folder(folder, 1, False, self.cfg.caption_extension, tokens, "`validation_dir`")

    @functools.cached_property
    def resumed(self) -> Derived[_engine.SavedState | None]:
        """The training state ``resume`` names, checked against the config (None: a fresh run)."""
        if self.resume is None:
            return Derived(None)
        return _derive(lambda: _engine.resolve_resume(self.cfg, self.resume, self.launch.world_size), None)

    @property
    def done(self) -> int:
        """The step the run continues after (0: a fresh run)."""
        state = self.resumed.value
        return state.step if state is not None else 0

    # --- the run: only once the inputs' checks passed (sd-scripts' dataset code needs the folders) ----------------
    @functools.cached_property
    def count(self) -> _engine.StepCount:
        """The step math, from sd-scripts' own dataset code."""
        return _engine.count_steps(self.cfg, self.device, self.launch.world_size)

    @functools.cached_property
    def memory(self) -> MemoryPlan:
        """The predicted peak memory against the device's budget; ``"auto"`` gradient checkpointing resolved."""
        held_out = (
            len(list_images(self.held_out.folder, sd_scripts_dir=self.cfg.sd_scripts_dir))
            if self.held_out is not None
            else 0
        )
        images = sum(s.images for s in self.count.subsets) + held_out
        sharing = self.launch.local_processes if self.device.device == "cpu" else 1  # a GPU per process elsewhere
        device, precision = self.device.device, self.device.mixed_precision
        return memory_plan(self.cfg, device, precision, images, budget=self.memory_budget, sharing=sharing)

    @property
    def run_cfg(self) -> TrainConfig:
        """``cfg`` as the run trains it: ``gradient_checkpointing = "auto"`` resolved by the memory plan."""
        return self.cfg.replace(gradient_checkpointing=self.memory.gradient_checkpointing)

    @property
    def checkpoints(self) -> list[tuple[int, str]]:
        """(step, file name) of each step checkpoint this run saves (after ``done`` when resuming)."""
        return [(step, name) for step, name in self.count.checkpoints if step > self.done]


class FolderContext:
    """One dataset folder as its checks see it: the engine's ``Folder``, the config, and its images."""

    def __init__(self, folder: _engine.Folder, cfg: TrainConfig, extensions: tuple[str, ...]) -> None:
        self.folder, self.cfg = folder, cfg
        self.where = folder.source  # the field or dataset TOML entry that names it, for messages
        self.extensions = {e.lower() for e in extensions}
        self._once: dict[Callable[[FolderContext], Any], Any] = {}

    @functools.cached_property
    def images(self) -> list[Path]:
        """The folder's images as sd-scripts lists them (its own ``glob_images``: case-sensitive extensions, no
        dot-files; a dangling symlink or a folder named ``x.png`` included, as sd-scripts opens them), sorted."""
        return _engine.glob_images(self.folder.folder, self.cfg.sd_scripts_dir)

    @functools.cached_property
    def skipped(self) -> list[Path]:
        """Files whose extension is an image's in another case (``a.Png``, ``b.jPeg``) that sd-scripts' listing does
        not return, so never trains; dot-files (macOS's ``._a.png``) left out, as sd-scripts leaves them out."""
        listed = set(self.images)
        return sorted(
            path
            for path in self.folder.folder.iterdir()
            if path.suffix.lower() in self.extensions and not path.name.startswith(".") and path not in listed
        )

    @functools.cached_property
    def alpha_mask(self) -> bool:
        """Whether sd-scripts loads this folder's images with their alpha as the loss mask (``alpha_mask``): the
        subset's, its dataset's or ``[general]``'s value in a dataset TOML, else ``extra_args.alpha_mask`` (sd-scripts'
        ``BlueprintGenerator`` falls back in that order, config_util.py l.439)."""
        default = bool(self.cfg.extra_args.get("alpha_mask", False))
        index = re.search(r"datasets\[(\d+)\]\.subsets\[(\d+)\]$", self.where)
        if self.cfg.dataset_config is None or index is None:
            return default
        try:
            data = toml.loads(self.cfg.dataset_config.read_text(encoding="utf-8-sig"))
            dataset = data["datasets"][int(index[1])]
            tables = (dataset["subsets"][int(index[2])], dataset, data.get("general", {}))
        except (OSError, UnicodeDecodeError, toml.TomlDecodeError, KeyError, IndexError, TypeError):
            return default
        return bool(next((table["alpha_mask"] for table in tables if "alpha_mask" in table), default))

    def once(self, compute: Callable[[FolderContext], T]) -> T:
        """``compute(self)``, computed once for this folder: what several checks read (each image's header, each
        caption's text) is read once."""
        if compute not in self._once:
            self._once[compute] = compute(self)
        return self._once[compute]


Rule = Callable[[CheckContext, Findings], None]
FolderRule = Callable[[FolderContext, Findings], None]


def list_images(folder: Path, extensions: tuple[str, ...] = (), sd_scripts_dir: Path | None = None) -> list[Path]:
    """The images in a folder, as sd-scripts' own listing finds them (``glob_images``, see :attr:`FolderContext.images`).

    Args:
        folder: The folder.
        extensions: Not read any more: sd-scripts' listing knows its extensions (kept so that callers need not change).
        sd_scripts_dir: ``TrainConfig.sd_scripts_dir``, the sd-scripts whose listing is used.

    Returns:
        Its images, sorted; [] if it is not a folder.
    """
    del extensions  # sd-scripts' IMAGE_EXTENSIONS, matched as its glob matches them
    return _engine.glob_images(folder, sd_scripts_dir)


def names(paths: list[Any]) -> str:
    """Files for a message.

    Args:
        paths: The files (or any items) a message names.

    Returns:
        The first five, comma-separated, then "... and N more".
    """
    shown = ", ".join(str(p) for p in paths[:_LIST])
    return shown + (f" ... and {len(paths) - _LIST} more" if len(paths) > _LIST else "")
