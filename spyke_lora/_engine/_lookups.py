"""The names a run resolves only after its model is loaded, resolved now with sd-scripts' own code: no model.

``train_network.py`` imports ``network_module`` (l.644), builds the optimizer with ``train_util.get_optimizer``
(l.767) and the scheduler with ``train_util.get_scheduler_fix`` (l.811), all after loading the base model, so a
misspelt name fails minutes into a run (longer on a Mac). :func:`name_findings` runs the same three lookups before
anything is loaded: the network module is imported in the engine's host and must have ``create_network``; the
optimizer is built by ``get_optimizer`` on one dummy parameter (so its name's case, ``module.Class`` names, the
packages it imports and ``optimizer_args`` are sd-scripts' rules, not a copy); the scheduler by ``get_scheduler_fix``
on that optimizer. What they raise is worded with the field, the value and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import importlib
import importlib.metadata
import io
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .._config import TrainConfig
from .._device import DeviceChoice
from .._errors import SpykeLoraError
from ._argv import build_argv, parse_argv
from ._host import PINNED_VERSION, EngineHost, host_for

__all__ = ["LYCORIS_WORKS", "NameFindings", "name_findings"]

# lycoris-lora's version that trains with the pinned sd-scripts (LoCon and LoHa measured in-process, issue 22).
LYCORIS_WORKS = "3.4.0"
# From 4.0.0 LyCORIS also wraps the U-Net's TimestepEmbedding module (lycoris/kohya.py UNET_TARGET_REPLACE_MODULE)
# besides its time_embedding.linear_1 Linear, so create_network asserts on the second wrapper of the same name.
_LYCORIS_FAILS = (4, 0)
_LYCORIS_FAILURE = "AssertionError: duplicated lora name: lora_unet_time_embedding_linear_1"
_LYCORIS_FIX = f"pip install 'spyke-lora[lycoris]' (lycoris-lora=={LYCORIS_WORKS})"

# The names train_util.get_optimizer maps itself (l.4881-5119), for the messages; any torch.optim class and any
# "module.Class" name are accepted too, and the lookup itself is always sd-scripts' own.
_OPTIMIZERS = (
    "AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, "
    "SGDNesterov8bit, DAdaptation, DAdaptAdamPreprint, DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, "
    "DAdaptLion, DAdaptSGD, Prodigy, Adafactor, RAdamScheduleFree, AdamWScheduleFree, SGDScheduleFree"
).split(", ")
# the module get_optimizer imports -> the pip package that provides it
_PACKAGES = {"lion_pytorch": "lion-pytorch", "bitsandbytes": "bitsandbytes", "prodigyopt": "prodigyopt"}
_NETWORKS = ("networks.lora", "networks.dylora", "networks.lora_fa", "networks.oft", "lycoris.kohya")


@dataclasses.dataclass
class NameFindings:
    """What :func:`name_findings` found: problems (the run would fail) and warnings, each a message."""

    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def name_findings(cfg: TrainConfig, device: DeviceChoice) -> NameFindings:
    """Resolve ``network_module``, ``optimizer_type`` (with ``extra_args.optimizer_args``) and ``lr_scheduler``
    (or ``extra_args.lr_scheduler_type``) as the run will, with sd-scripts' own code, loading no model.

    Args:
        cfg: The run's config.
        device: The device policy's choice (its arguments are the run's).

    Returns:
        The problems and warnings found; none when the arguments cannot be built (``extra_args`` that sd-scripts'
        parser rejects are reported by the dataset checks that parse them).
    """
    found = NameFindings()
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        train_network = host.train_network()
        try:
            args = parse_argv(train_network.setup_parser(), build_argv(cfg, device))
        except SpykeLoraError:
            return found
        _check_network_module(host, args.network_module, found)
        optimizer = _check_optimizer(train_network.train_util, args, found)
        _check_scheduler(train_network.train_util, args, optimizer, found)
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """sd-scripts' log lines of a lookup ("use AdamW optimizer | {}") are not the plan's."""
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield


def _missing_module(error: BaseException) -> str | None:
    """The module a ModuleNotFoundError in ``error``'s chain names (sd-scripts re-raises its own ImportError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return seen.name
        seen = seen.__cause__ or seen.__context__
    return None


def _close(value: str, names: list[str]) -> str:
    """``"; did you mean 'X'?"`` for the name closest to ``value`` (in any case), or ""."""
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


# --- network_module ---------------------------------------------------------------------------------------------------


def _check_network_module(host: EngineHost, name: str, found: NameFindings) -> None:
    """``network_module`` is imported as train_network.py l.644 does, in the engine's host; sd-scripts then calls
    its ``create_network`` (l.678). A LyCORIS version known to fail is refused before it is imported."""
    where = f"`network_module` {name!r}"
    if name.split(".", 1)[0] == "lycoris" and _lycoris_refused(where, found):
        return
    try:
        with _quiet():
            module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        found.problems.append(_network_not_found(host, name, where, e))
        return
    except Exception as e:  # noqa: BLE001 -- a user's module may raise anything on import
        found.problems.append(f"{where} fails to import: {type(e).__name__}: {e}; fix the module or the name")
        return
    if not callable(getattr(module, "create_network", None)):
        found.problems.append(
            f"{where} has no create_network(), which sd-scripts calls to build the network "
            f"(train_network.py l.678); name a network module such as {', '.join(_NETWORKS)}"
        )


def _network_not_found(host: EngineHost, name: str, where: str, error: ModuleNotFoundError) -> str:
    missing = error.name or name
    if missing.split(".", 1)[0] == "lycoris":
        return f"{where} cannot be imported: the LyCORIS package is not installed; {_LYCORIS_FIX}"
    if not (name == missing or name.startswith(missing + ".")):  # the module exists, a package it imports does not
        top = missing.split(".", 1)[0]
        return f"{where} needs the package {top!r}, which is not installed: pip install {_PACKAGES.get(top, top)}"
    known = sorted({*_sd_scripts_networks(host.root), *_NETWORKS})
    fix = _close(name, known) or f"; sd-scripts' network modules: {', '.join(_NETWORKS)}"
    return f"{where} cannot be imported (no module named {missing!r}){fix}"


def _sd_scripts_networks(root: Path) -> list[str]:
    """The engine's ``networks.*`` modules that define ``create_network`` (read as text, not imported)."""
    names = []
    for path in sorted((root / "networks").glob("*.py")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if "\ndef create_network(" in path.read_text(encoding="utf-8"):
                names.append(f"networks.{path.stem}")
    return names


def _lycoris_refused(where: str, found: NameFindings) -> bool:
    """A lycoris-lora known to fail with the pinned engine is a problem; another untested one a warning."""
    try:
        version = importlib.metadata.version("lycoris-lora")
    except importlib.metadata.PackageNotFoundError:
        return False  # the import then says how to install it
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers >= _LYCORIS_FAILS:
        found.problems.append(
            f"{where}: lycoris-lora {version} is installed, which fails in sd-scripts {PINNED_VERSION} before the "
            f"first step ({_LYCORIS_FAILURE}); lycoris-lora {LYCORIS_WORKS} trains LoCon and LoHa: {_LYCORIS_FIX}"
        )
        return True
    if version != LYCORIS_WORKS:
        found.warnings.append(
            f"{where}: lycoris-lora {version} is installed; the version tested with sd-scripts {PINNED_VERSION} is "
            f"{LYCORIS_WORKS} ({_LYCORIS_FIX})"
        )
    return False


# --- optimizer_type ---------------------------------------------------------------------------------------------------


def _check_optimizer(train_util: ModuleType, args: argparse.Namespace, found: NameFindings) -> Any:
    """The optimizer sd-scripts' get_optimizer builds for ``args`` on one dummy parameter (None when it fails).
    ``args`` is changed as get_optimizer changes it (Adafactor's own scheduler), as train_network.py's is."""
    import torch

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": args.unet_lr or args.learning_rate}]
    try:
        with _quiet():
            return train_util.get_optimizer(args, groups)[2]
    except Exception as e:  # noqa: BLE001 -- what sd-scripts raises, worded
        found.problems.append(_optimizer_words(args, e))
        return None


def _optimizer_words(args: argparse.Namespace, error: Exception) -> str:
    name = args.optimizer_type or "AdamW"
    where = f"`optimizer_type` {name!r}"
    module, _, cls = name.rpartition(".")
    missing = _missing_module(error)
    if missing is not None:
        top = missing.split(".", 1)[0]
        if module and (module == missing or module.startswith(missing + ".")):
            return f"{where}: the module {module} cannot be imported (no module named {missing!r}); check the name"
        return f"{where} needs the package {top!r}, which is not installed: pip install {_PACKAGES.get(top, top)}"
    if isinstance(error, AttributeError):
        if module:
            return f"{where}: {module} has no {cls}; check the class name"
        import torch

        known = _OPTIMIZERS + [n for n in dir(torch.optim) if n[:1].isupper() and n != "Optimizer"]
        return (
            f"{where} is not an optimizer sd-scripts knows{_close(name, known) or '.'} It accepts {', '.join(_OPTIMIZERS)} "
            f"(in any case), any torch.optim class (SGD, RMSprop, ...) or a 'module.Class' name"
        )
    if args.optimizer_args:
        return (
            f"`extra_args.optimizer_args` {list(args.optimizer_args)!r} is rejected by {name}: "
            f"{type(error).__name__}: {error}; each item is key=value, the key one of the optimizer's arguments and "
            f"the value a Python literal (betas=(0.9,0.99))"
        )
    return f"{where} is rejected by sd-scripts' get_optimizer: {type(error).__name__}: {error}"


# --- lr_scheduler -----------------------------------------------------------------------------------------------------


def _check_scheduler(train_util: ModuleType, args: argparse.Namespace, optimizer: Any, found: NameFindings) -> None:
    """The scheduler sd-scripts' get_scheduler_fix builds on ``optimizer`` (an AdamW when the optimizer failed)."""
    import torch

    if optimizer is None:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    args = copy.copy(args)
    # with max_train_epochs, train_network.py sets max_train_steps from the dataset (l.800); any count resolves a name
    args.max_train_steps = args.max_train_steps or 1000
    try:
        with _quiet():
            train_util.get_scheduler_fix(args, optimizer, 1)
    except Exception as e:  # noqa: BLE001 -- what sd-scripts raises, worded
        found.problems.append(_scheduler_words(train_util, args, e))


def _scheduler_words(train_util: ModuleType, args: argparse.Namespace, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    if args.lr_scheduler_type:
        where = f"`extra_args.lr_scheduler_type` {args.lr_scheduler_type!r}"
        module, _, cls = args.lr_scheduler_type.rpartition(".")
        missing = _missing_module(error)
        if missing is not None:
            return f"{where}: the module {module or missing} cannot be imported (no module named {missing!r})"
        if isinstance(error, AttributeError):
            return f"{where}: {module or 'torch.optim.lr_scheduler'} has no {cls}; check the class name"
        if "num_warmup_steps" in str(error):
            return f"{where} takes no warm-up, and sd-scripts refuses one with it: set lr_warmup_steps = 0"
        return f"{where} cannot be built: {text}; give its arguments in extra_args.lr_scheduler_args (key=value)"
    name = args.lr_scheduler
    where = f"`lr_scheduler` {name!r}"
    if name.startswith("adafactor") and isinstance(error, AssertionError):
        return f'{where} works only with the Adafactor optimizer: set optimizer_type = "Adafactor", or another lr_scheduler'
    if "does not require `num_warmup_steps`" in str(error):
        return (
            f"{where} takes no warm-up, and sd-scripts refuses lr_warmup_steps {args.lr_warmup_steps} with it "
            f'(train_util.py l.5296): set lr_warmup_steps = 0, or lr_scheduler = "constant_with_warmup"'
        )
    if "is not a valid" in str(error):
        known = [t.value for t in train_util.SchedulerType]
        known += [train_util.DiffusersSchedulerType.PIECEWISE_CONSTANT.value, "adafactor"]
        return f"{where} is not a scheduler sd-scripts knows{_close(name, known) or '.'} It accepts {', '.join(known)}"
    return f"{where} cannot be built by sd-scripts' get_scheduler_fix: {text}; check extra_args.lr_scheduler_args"
