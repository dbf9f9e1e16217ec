"""A dataset folder's captions as sd-scripts reads them, with sd-scripts' own code, no model and no image decoded.

sd-scripts reads a caption in ``DreamBoothDataset.__init__``'s nested ``read_caption``
(``library/train_util.py`` l.1946-1970): it opens the file with ``encoding="utf-8"`` in text mode (universal
newlines: ``\\r\\n`` and a lone ``\\r`` end a line), ``readlines()``, asserts the file is not empty, and keeps
``lines[0].strip()`` (with ``enable_wildcard``: every non-empty line, stripped, joined by ``\\n``). An image without a
caption file trains on the subset's ``class_tokens`` (l.2069-2080). At every step ``BaseDataset.process_caption``
(l.821-930) adds ``caption_prefix``/``caption_suffix``, picks one line with ``enable_wildcard``, and shuffles the
tags after the first ``keep_tokens`` (split by ``caption_separator``, joined by ``", "``).

:func:`caption_reader` runs exactly that code: the nested ``read_caption`` is called as sd-scripts defines it (its
code object, which has no closure, bound to ``train_util``'s globals), per file, so a file it cannot read is named
rather than ending the whole folder; ``process_caption`` runs on sd-scripts' own subset, whose settings come from
sd-scripts' ``BlueprintGenerator`` (the subset's, its dataset's, ``[general]``'s, then the command line's).
Reading 123 captions this way takes about 2 ms, the subset's settings about 5 ms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import random
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import toml

from .._config import TrainConfig
from .._device import DeviceChoice
from .._errors import EngineError
from ._argv import build_argv, parse_argv
from ._dataset import Folder
from ._host import host_for

__all__ = ["CaptionRead", "CaptionReader", "caption_reader"]

# build_argv needs a device; no caption option depends on it
_ANY_DEVICE = DeviceChoice("cpu", "no", False, "sdpa", None)
# the randomness of process_caption that a shown caption leaves out (a caption dropped, tags dropped, warm-up)
_NOT_SHOWN = {"caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0}
_SHOWN_SEED = 0  # the shuffle of a shown caption: always the same, Python's random left as it was


@dataclasses.dataclass(frozen=True)
class CaptionRead:
    """One image's caption as sd-scripts reads it."""

    image: Path
    path: Path | None  # the caption file sd-scripts reads (None: none, the image trains on the class token)
    text: str | None  # what read_caption returns with the subset's enable_wildcard (None: no file, or an error)
    lines: tuple[str, ...] = ()  # the file's non-empty lines, stripped (read_caption with enable_wildcard)
    error: str = ""  # what sd-scripts raised reading the file, e.g. "UnicodeDecodeError: ..."


class _Quiet(logging.Filter):
    """Drops read_caption's own "illegal char in file" log line: the preflight reports the file itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("illegal char in file")


@functools.cache
def _read_caption(train_util: types.ModuleType) -> Callable[[str, str, bool], str | None]:
    """sd-scripts' nested ``read_caption`` (train_util.py l.1946), as a function of its own."""
    code = next(
        (c for c in train_util.DreamBoothDataset.__init__.__code__.co_consts if _is_read_caption(c)),
        None,
    )
    if code is None:
        raise EngineError(
            "this sd-scripts has no DreamBoothDataset read_caption (train_util.py), so captions cannot be read as "
            "it reads them; use the pinned v0.10.1 (git submodule update --init vendor/sd-scripts)"
        )
    return types.FunctionType(code, train_util.__dict__, "read_caption")


def _is_read_caption(const: Any) -> bool:
    return isinstance(const, types.CodeType) and const.co_name == "read_caption" and not const.co_freevars


class CaptionReader:
    """One folder's captions as sd-scripts reads and trains them (built by :func:`caption_reader`)."""

    def __init__(self, cfg: TrainConfig, folder: Folder, params: Any) -> None:
        self.cfg, self.folder, self.params = cfg, folder, params
        self.extension: str = params.caption_extension or folder.caption_extension
        self.enable_wildcard: bool = bool(params.enable_wildcard)
        self.shuffle_caption: bool = bool(params.shuffle_caption)
        self.keep_tokens: int = int(params.keep_tokens)
        self.caption_separator: str = params.caption_separator
        self.keep_tokens_separator: str = params.keep_tokens_separator or ""

    @contextlib.contextmanager
    def _engine(self) -> Iterator[Any]:
        host = host_for(self.cfg.sd_scripts_dir)
        with host.active():
            train_util = host.train_network().train_util
            quiet = _Quiet()
            train_util.logger.addFilter(quiet)
            try:
                yield train_util
            finally:
                train_util.logger.removeFilter(quiet)

    def caption_path(self, image: Path) -> Path | None:
        """The caption file sd-scripts reads for ``image``: ``stem + caption_extension``, else the face-crop
        name's (``a_b_c_d_e.png`` -> ``a.txt``: its first names before the last four, l.1948-1953); None: none."""
        base = os.path.splitext(str(image))[0]
        tokens = base.split("_")
        face = "_".join(tokens[:-4]) if len(tokens) >= 5 else base
        return next((Path(p) for p in (base + self.extension, face + self.extension) if os.path.isfile(p)), None)

    def read(self, images: list[Path]) -> list[CaptionRead]:
        """Each image's caption, read by sd-scripts' ``read_caption``; what it raises is kept, per file.

        Args:
            images: The folder's images (those sd-scripts' glob finds).

        Returns:
            One :class:`CaptionRead` per image, in their order.
        """
        with self._engine() as train_util:
            read = _read_caption(train_util)
            return [self._read_one(read, image) for image in images]

    def _read_one(self, read: Callable[[str, str, bool], str | None], image: Path) -> CaptionRead:
        path = self.caption_path(image)
        if path is None:
            return CaptionRead(image, None, None)
        try:
            every = read(str(image), self.extension, True)
            text = every if self.enable_wildcard else read(str(image), self.extension, False)
        except Exception as e:  # UnicodeDecodeError, its AssertionError for an empty file, an OSError
            return CaptionRead(image, path, None, (), f"{type(e).__name__}: {e}")
        return CaptionRead(image, path, text, tuple(every.split("\n")) if every else ())

    def trains_as(self, caption: str) -> str:
        """What one step trains for ``caption`` (as read): sd-scripts' ``process_caption`` with the subset's
        prefix, suffix, wildcard and shuffle, without the random dropouts; the shuffle is a fixed one.

        Args:
            caption: A caption as :meth:`read` returned it (or the class token).

        Returns:
            The text the text encoder is given.
        """
        with self._engine() as train_util:
            params = dataclasses.replace(self.params, **_NOT_SHOWN, token_warmup_step=0)
            subset = train_util.DreamBoothSubset(**dataclasses.asdict(params))
            dataset = train_util.BaseDataset(None, 1.0, False)
            state = random.getstate()
            try:
                random.seed(_SHOWN_SEED)
                return str(dataset.process_caption(subset, caption))
            finally:
                random.setstate(state)


def caption_reader(cfg: TrainConfig, folder: Folder) -> CaptionReader:
    """How sd-scripts reads and trains the captions of ``folder``: its subset's settings from sd-scripts'
    ``BlueprintGenerator`` (the dataset TOML's subset when ``dataset_config`` names the folder; else the folder
    alone, with the config's command line).

    Args:
        cfg: The run's config.
        folder: The dataset folder (``train_dir``, ``reg_dir``, a subset, ``validation_dir``).

    Returns:
        The folder's :class:`CaptionReader`.
    """
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        train_network = host.train_network()
        args = _args(cfg, train_network)
        config_util = train_network.config_util
        toml_path = cfg.dataset_config
        params = _toml_subset(toml_path, folder, args, config_util) if toml_path is not None else None
        if params is None:
            subset = {"image_dir": str(folder.folder), "is_reg": folder.is_reg}
            subset["caption_extension"] = folder.caption_extension
            if folder.class_tokens is not None:
                subset["class_tokens"] = folder.class_tokens
            user_config = {"datasets": [{"subsets": [subset]}]}
            try:
                params = _subsets(user_config, args, config_util)[0][1]
            except Exception:  # a value sd-scripts' schema rejects: its own checks report it; read with its defaults
                params = _subsets(user_config, _args(None, train_network), config_util)[0][1]
        return CaptionReader(cfg, folder, params)


def _args(cfg: TrainConfig | None, train_network: Any) -> Any:
    """sd-scripts' arguments for ``cfg`` (its caption options); its defaults for None, or when the config cannot be
    turned into arguments (that is reported by the config's own checks)."""
    parser = train_network.setup_parser()
    try:
        argv = build_argv(cfg, _ANY_DEVICE) if cfg is not None else []
    except Exception:
        argv = []
    try:
        args = parse_argv(parser, argv)
    except Exception:
        args = parse_argv(train_network.setup_parser(), [])
    train_network.train_util.prepare_dataset_args(args, True)  # e.g. resolution "512" -> (512, 512)
    return args


def _subsets(user_config: dict[str, Any], args: Any, config_util: Any) -> list[tuple[Path, Any]]:
    """(image_dir, params) of every subset of a dataset config, as sd-scripts' blueprint resolves them."""
    sanitizer = config_util.ConfigSanitizer(True, True, args.masked_loss, True)
    with contextlib.redirect_stdout(io.StringIO()):
        blueprint = config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
    return [(Path(s.params.image_dir), s.params) for d in blueprint.dataset_group.datasets for s in d.subsets]


def _toml_subset(path: Path, folder: Folder, args: Any, config_util: Any) -> Any:
    """The params of the dataset TOML's subset whose ``image_dir`` is ``folder`` (relative: from the working
    directory, as sd-scripts opens it, or from the TOML's folder); None when none is, or the TOML does not read."""
    try:
        subsets = _subsets(toml.loads(path.read_text(encoding="utf-8")), args, config_util)
    except Exception:
        return None
    want = _resolved(folder.folder)
    for image_dir, params in subsets:
        if want in {_resolved(image_dir), _resolved(path.parent / image_dir)}:
            return params
    return None


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):
        return path
