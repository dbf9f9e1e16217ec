"""Which sd-scripts spyke-lora can drive: the supported range, and what each feature needs of sd-scripts, with the
commit that brought it in.

The supported range runs from ``3e6935a`` (2025-06-15: the sd-scripts that kohya_ss's own submodule checks out, 268
commits before v0.10.1) to ``ae72efb`` (v0.10.1, 2026-02-13: the vendored one); both ends are tested
(``tests/integration/test_older_sd_scripts.py`` runs every feature on the older one). Between them, the one API
difference spyke-lora meets is ``NetworkTrainer.cast_vae`` (``209c02d``, 2025-09-12, HunyuanImage: v0.10.1
``train_network.py`` l.599); before it, ``train()`` always casts the VAE (3e6935a ``train_network.py`` l.586), which
:func:`vae_is_cast` answers for it.

An older sd-scripts is checked by what its code has, not by its commit (a checkout need not be a git work tree):
:func:`missing_needs` lists each :class:`Need` a feature has that the hosted ``train_network`` module lacks, and
:func:`require` refuses the call before any model is loaded, naming what is missing and the commit that brought it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from .._errors import EngineError

__all__ = [
    "FEATURES",
    "NEEDS",
    "OLDEST_COMMIT",
    "PINNED_COMMIT",
    "PINNED_VERSION",
    "TESTED_COMMITS",
    "Need",
    "commit_note",
    "features_of",
    "missing_needs",
    "require",
    "vae_is_cast",
]

PINNED_COMMIT = "ae72efb92babe89ff8e70f057e42db68440e8d61"
PINNED_VERSION = "v0.10.1"
OLDEST_COMMIT = "3e6935a07edcb944407840ef74fcaf6fcad352f7"
TESTED_COMMITS = {
    PINNED_COMMIT: f"{PINNED_VERSION}, 2026-02-13, the vendored submodule",
    OLDEST_COMMIT: "2025-06-15, the one kohya_ss's submodule checks out",
}
FEATURES = ("train", "validation", "sampling", "resume")


def _has_method(name: str) -> Callable[[ModuleType], bool]:
    return lambda train_network: callable(getattr(train_network.NetworkTrainer, name, None))


def _has_parameter(method: str, parameter: str) -> Callable[[ModuleType], bool]:
    def present(train_network: ModuleType) -> bool:
        function = getattr(train_network.NetworkTrainer, method, None)
        try:
            return function is not None and parameter in inspect.signature(function).parameters
        except (TypeError, ValueError):
            return False

    return present


def _has_train_util(name: str) -> Callable[[ModuleType], bool]:
    return lambda train_network: hasattr(getattr(train_network, "train_util", None), name)


@dataclasses.dataclass(frozen=True)
class Need:
    """One thing of sd-scripts' that spyke-lora calls or overrides.

    Attributes:
        name: What it is, as sd-scripts names it (``NetworkTrainer.process_batch(is_train=...)``).
        since: The commit that brought it in, and its date.
        features: The features that need it (of :data:`FEATURES`).
        present: Whether a hosted ``train_network`` module has it.
    """

    name: str
    since: str
    features: tuple[str, ...]
    present: Callable[[ModuleType], bool]


_ALL = FEATURES
NEEDS: tuple[Need, ...] = (
    Need("NetworkTrainer.train", "the first trainer", _ALL, _has_method("train")),
    # the strategies' refactor: the hook spyke-lora gets the caller's logging back in, and the strategies that
    # validation and sampling of files on disk set up
    Need("NetworkTrainer.get_tokenize_strategy", "41dee60 (2024-07-27)", _ALL, _has_method("get_tokenize_strategy")),
    Need("NetworkTrainer.post_process_network", "b65ae9b (2024-09-04)", _ALL, _has_method("post_process_network")),
    Need("NetworkTrainer.process_batch", "bbf6bbd (2025-01-06)", _ALL, _has_method("process_batch")),
    Need("NetworkTrainer.sample_images", "the first trainer", _ALL, _has_method("sample_images")),
    # a held-out pass is sd-scripts' own validation step: process_batch(is_train=False), after on_step_start
    Need(
        "NetworkTrainer.process_batch(is_train=...)",
        "bbf6bbd (2025-01-06)",
        ("validation",),
        _has_parameter("process_batch", "is_train"),
    ),
    Need("NetworkTrainer.on_step_start", "db2b4d4 (2024-10-27)", ("validation",), _has_method("on_step_start")),
    Need(
        "train_util.save_and_remove_state_stepwise",
        "74008ce (2023-04-24)",
        ("train", "resume"),
        _has_train_util("save_and_remove_state_stepwise"),
    ),
    Need("train_util.get_last_ckpt_name", "the first trainer", _ALL, _has_train_util("get_last_ckpt_name")),
)


def features_of(cfg: Any, resumed: bool = False) -> tuple[str, ...]:
    """The features a run of ``cfg`` uses (of :data:`FEATURES`).

    Args:
        cfg: The run's :class:`~spyke_lora.TrainConfig`.
        resumed: Whether the run continues a saved state.

    Returns:
        ``"train"``, then ``"validation"``, ``"sampling"`` and ``"resume"`` where the run does them.
    """
    used = ["train"]
    if cfg.validation_dir is not None or cfg.validation_split:
        used.append("validation")
    if cfg.sample_prompts:
        used.append("sampling")
    if resumed or cfg.save_state:
        used.append("resume")
    return tuple(used)


def missing_needs(train_network: ModuleType, features: Iterable[str]) -> list[Need]:
    """What the features need that this sd-scripts lacks, in :data:`NEEDS`' order.

    Args:
        train_network: The hosted engine's ``train_network`` module.
        features: Names of :data:`FEATURES`.

    Returns:
        The needs missing ([] when the engine can do them all).
    """
    wanted = set(features)
    return [need for need in NEEDS if wanted & set(need.features) and not need.present(train_network)]


def require(train_network: ModuleType, features: Iterable[str]) -> None:
    """Refuse, before any model is loaded, features this sd-scripts cannot do.

    Args:
        train_network: The hosted engine's ``train_network`` module.
        features: Names of :data:`FEATURES`.

    Raises:
        EngineError: Something a feature needs is missing; the message names it, the commit that brought it in,
            and the supported range.
    """
    features = list(features)
    missing = missing_needs(train_network, features)
    if not missing:
        return
    trainer = [n.name for n in missing if n.name.startswith("NetworkTrainer.") and "(" not in n.name]
    others = [n.name for n in missing if n.name not in trainer]
    shown = [f"NetworkTrainer.{', '.join(n.split('.', 1)[1] for n in trainer)}"] if trainer else []
    what = ", ".join(shown + others)
    since = "; ".join(f"{n.name} came with {n.since}" for n in missing)
    file = getattr(train_network, "__file__", "train_network.py")
    raise EngineError(
        f"this sd-scripts ({file}) has no {what}, which {_needing(missing, features)}: it is not a version "
        f"spyke-lora can drive ({since}). spyke-lora supports sd-scripts from {OLDEST_COMMIT[:7]} (2025-06-15) to "
        f"{PINNED_VERSION} ({PINNED_COMMIT[:7]}); update that checkout (`git checkout {PINNED_VERSION}` there), or "
        f"use the vendored {PINNED_VERSION} (unset $SPYKE_LORA_SD_SCRIPTS / sd_scripts_dir)"
    )


def _needing(missing: list[Need], features: list[str]) -> str:
    """The run's features that the missing needs block, in words: "validation needs", "train and sampling need"."""
    blocked = [f for f in features if any(f in need.features for need in missing)]
    return f"{' and '.join(blocked)} {'needs' if len(blocked) == 1 else 'need'}"


def vae_is_cast(trainer: Any, args: Any) -> bool:
    """Whether ``train()`` casts the VAE to the run's dtype: ``trainer.cast_vae(args)`` where sd-scripts has it
    (``209c02d``, v0.10.1 ``train_network.py`` l.599); before it, ``train()`` always does (3e6935a l.586)."""
    cast_vae = getattr(trainer, "cast_vae", None)
    return True if cast_vae is None else bool(cast_vae(args))


def commit_note(commit: str | None) -> str | None:
    """What to tell the user about an sd-scripts checkout's commit, or None when it is the vendored one.

    Args:
        commit: The checkout's commit (None: unknown, e.g. not a git work tree).

    Returns:
        The warning's text, or None.
    """
    supported = (
        f"spyke-lora is tested with sd-scripts {PINNED_VERSION} ({PINNED_COMMIT[:10]}) and {OLDEST_COMMIT[:10]} "
        f"(kohya_ss's submodule)"
    )
    if commit == PINNED_COMMIT:
        return None
    if commit is None:
        return (
            f"its commit is unknown (it is not a git work tree of its own); {supported}, and refuses before "
            f"loading a model what an older one cannot do"
        )
    if commit in TESTED_COMMITS:
        return None
    return (
        f"it is at commit {commit[:10]}, not one spyke-lora is tested with; {supported}: training may still "
        f"work, but results are not guaranteed"
    )
