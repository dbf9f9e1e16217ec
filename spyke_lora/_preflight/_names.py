"""Names and files a run resolves only after its model is loaded, checked before: the network module, the optimizer
and the scheduler (sd-scripts' own lookups, through ``_engine``), and the files named in ``extra_args``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .. import _engine
from .._header import HeaderError, file_problem, os_error_words, read_header
from ._context import CheckContext, Findings

__all__ = ["check_names", "check_option_files"]

# a Hugging Face Hub id (org/name, no file suffix), which sd-scripts' load_vae downloads (model_util.py l.1271)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}
_HEADER_WORDS = {
    "pickle": "{where} is not a .safetensors file although its name says so; download or convert it again",
    "short": "{where} is not a valid .safetensors file (only {size} bytes); download it again",
    "length": "{where} is not a valid .safetensors file (header length {length} for a {size}-byte file)",
    "not json": "{where} is not a valid .safetensors file (its header is not JSON: {detail})",
    "not object": "{where} is not a valid .safetensors file (its header is not a JSON object)",
    "no offsets": "{where} is not a valid .safetensors file (a tensor entry lacks data_offsets)",
    "truncated": "{where} is truncated or corrupt: its header promises {expected} bytes, the file has {size}; "
    "copy it again",
}


def check_names(ctx: CheckContext, found: Findings) -> None:
    """``network_module``, ``optimizer_type`` (and ``extra_args.optimizer_args``) and ``lr_scheduler`` (or
    ``extra_args.lr_scheduler_type``) resolve as sd-scripts resolves them after loading the model; a LyCORIS
    version known to fail is refused."""
    names = _engine.name_findings(ctx.cfg, ctx.device)
    found.problems += names.problems
    found.warnings += names.warnings


def check_option_files(ctx: CheckContext, found: Findings) -> None:
    """The files ``extra_args`` names exist and can be read: ``vae`` (a file or a diffusers VAE folder),
    ``network_weights`` (the weights the network starts from, train_network.py l.711) and every ``base_weights``
    file (merged into the model first, l.646)."""
    extra = ctx.cfg.extra_args
    if isinstance(extra.get("vae"), str):
        _check_vae(extra["vae"], found)
    if isinstance(extra.get("network_weights"), str):
        _check_weights(
            Path(extra["network_weights"]), f"`extra_args.network_weights` {extra['network_weights']!r}", found
        )
    base: Any = extra.get("base_weights")
    items = [base] if isinstance(base, str) else list(base) if isinstance(base, (list, tuple)) else []
    for i, item in enumerate(items):
        where = (
            f"`extra_args.base_weights[{i}]` {str(item)!r}"
            if len(items) > 1 or not isinstance(base, str)
            else (f"`extra_args.base_weights` {str(item)!r}")
        )
        _check_weights(Path(str(item)), where, found)


def _check_weights(path: Path, where: str, found: Findings) -> None:
    """A weights file sd-scripts loads: readable, and whole when it is a .safetensors file."""
    problem = file_problem(path, where)
    if problem is None and path.suffix.lower() == ".safetensors":
        try:
            read_header(path)
        except HeaderError as e:
            problem = e.worded(_HEADER_WORDS, where)
        except OSError as e:
            problem = f"{where} cannot be read: {os_error_words(e, path)}"
    if problem is not None:
        found.problem(problem)


def _check_vae(value: str, found: Findings) -> None:
    """``extra_args.vae``: sd-scripts' load_vae reads a file, or a diffusers folder (its config.json, or vae/'s), or
    else downloads a Hub id (model_util.py l.1269-1279)."""
    path, where = Path(value), f"`extra_args.vae` {value!r}"
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "vae" / "config.json").is_file()):
            found.problem(
                f"{where} is a folder without a diffusers VAE's config.json (nor vae/config.json); name the VAE's "
                ".safetensors file, or its diffusers folder"
            )
        return
    if not path.exists() and not path.is_symlink() and _HUB_ID.fullmatch(value) and path.suffix not in _FILE_SUFFIXES:
        found.warning(
            f"{where} is not a local file or folder: sd-scripts downloads it from the Hugging Face Hub as a VAE id "
            "when the model loads (a network connection then); name a local file to train offline"
        )
        return
    _check_weights(path, where, found)
