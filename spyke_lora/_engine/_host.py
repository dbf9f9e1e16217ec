"""Finding sd-scripts and hosting it in this process without leaving traces.

sd-scripts is a folder of scripts, not a package: its code imports generic top-level names (``library``,
``networks``, ``train_network``). :class:`EngineHost` makes exactly the names its code imports (found by reading its
import statements, not by listing its folder: ``tools``, ``tests``, ``docs``, ``setup`` or its dummy
``pytorch_lightning`` are never touched) importable from its folder while the engine is in use, and takes them out
of ``sys.modules`` again afterwards, restoring any module of the caller's that had the same name (with a warning,
since that module steps aside meanwhile). It also restores the root logger, which sd-scripts reconfigures on import
and at the start of every run.

Several threads may use the engine's modules at once (a ``plan()`` in an ``iter_events`` loop body while the run's
thread trains): the modules are installed by the first user and taken out by the last, and the lock is held only
for those two moments, never for a whole run.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import random
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .._errors import EngineError
from .._user_warnings import warn_caller
from ._compat import PINNED_COMMIT, PINNED_VERSION, commit_note, features_of, require

__all__ = [
    "ENV_VAR",
    "PINNED_COMMIT",
    "PINNED_VERSION",
    "EngineHost",
    "VENDORED",
    "RootLoggerSnapshot",
    "engine_commit",
    "engine_problems",
    "git_head",
    "host_for",
    "imported_names",
    "locate_engine",
    "quiet_git_revision",
    "random_untouched_by_logging",
]

ENV_VAR = "SPYKE_LORA_SD_SCRIPTS"
VENDORED = Path(__file__).resolve().parents[2] / "vendor" / "sd-scripts"
SUBMODULE_FIX = "git submodule update --init vendor/sd-scripts"


def locate_engine(configured: Path | None) -> Path:
    """The sd-scripts folder: ``configured`` (TrainConfig.sd_scripts_dir), else $SPYKE_LORA_SD_SCRIPTS, else the
    vendored submodule. Raises :class:`EngineError` with the fix when it is missing or empty."""
    if configured is not None:
        root, source = Path(configured), "`sd_scripts_dir`"
    elif os.environ.get(ENV_VAR):
        root, source = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        root, source = VENDORED, "the vendored submodule"
    if (root / "train_network.py").is_file() and (root / "library" / "train_util.py").is_file():
        return Path(os.path.abspath(root))
    if root == VENDORED:
        state = "is empty" if root.is_dir() else "is missing"
        raise EngineError(
            f"sd-scripts (the training engine) {state} at {root}. Fetch it with:\n"
            f"    {SUBMODULE_FIX}\n"
            f"(run it in the spyke-lora checkout), or point ${ENV_VAR} or `sd_scripts_dir` at an existing "
            f"sd-scripts checkout such as ~/tools/kohya_ss/sd-scripts"
        )
    raise EngineError(
        f"{source} is {str(root)!r}, which is not an sd-scripts checkout (no train_network.py and "
        f"library/train_util.py there); point it at the sd-scripts folder, or unset it to use the vendored copy "
        f"(fetch that with `{SUBMODULE_FIX}`)"
    )


_GIT_PLACE = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR")  # would point git elsewhere


def git_head(folder: Path, *args: str) -> list[str] | None:
    """The lines git prints for ``git rev-parse ARGS HEAD`` run in ``folder``, or None when git fails there (not a
    git work tree, no git installed, a timeout). git's own messages ("fatal: not a git repository") are captured,
    never shown: a run's console has only what spyke-lora and sd-scripts' logging write.

    Args:
        folder: Where git runs (its working directory).
        *args: More ``rev-parse`` options, before ``HEAD``.

    Returns:
        The output's lines, or None.
    """
    env = {k: v for k, v in os.environ.items() if k not in _GIT_PLACE}
    try:
        out = subprocess.run(
            ["git", "rev-parse", *args, "HEAD"],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return out.stdout.splitlines()


def engine_commit(root: Path) -> str | None:
    """The git commit of an sd-scripts checkout: None when it is not a git work tree of its own (no git there, or a
    folder inside another repository, whose commit is not sd-scripts')."""
    lines = git_head(root, "--show-toplevel")
    if lines is None or len(lines) != 2:
        return None
    top, commit = lines
    try:
        if not Path(top).samefile(root):
            return None
    except OSError:
        return None
    return commit.strip() or None


@contextlib.contextmanager
def quiet_git_revision(train_util: ModuleType) -> Iterator[None]:
    """For the block, sd-scripts' ``get_git_revision_hash`` (``library/train_util.py`` l.3302 at v0.10.1, l.3284 at
    3e6935a) without git's message on the console: it runs ``git rev-parse HEAD`` in its ``library`` folder with git's
    error output inherited, so a checkout that is not a git work tree printed "fatal: not a git repository" at every
    run, past any redirection of ``sys.stderr``. The same command gives the same answer (``"(unknown)"`` where it
    fails, as sd-scripts' ``except`` does), so the file's ``ss_sd_scripts_commit_hash`` is what sd-scripts' command
    line writes; only the message is captured."""
    original = getattr(train_util, "get_git_revision_hash", None)
    if original is None:
        yield
        return
    folder = Path(train_util.__file__).parent

    def get_git_revision_hash() -> str:
        lines = git_head(folder)
        return lines[0].strip() if lines else "(unknown)"

    train_util.get_git_revision_hash = get_git_revision_hash
    try:
        yield
    finally:
        train_util.get_git_revision_hash = original


class _LastResort(logging.Handler):
    """What Python does with a record when the root logger has no handler (``logging.lastResort``: WARNING and up,
    the message alone, to the current ``sys.stderr``), as a handler. While sd-scripts is active in a process whose
    root logger has none, this stands in: sd-scripts' modules, when imported, give the root logger a rich handler
    if it has none, and in Jupyter rich prints HTML outside any redirection."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - as logging does
            self.handleError(record)


class RootLoggerSnapshot:
    """The root logger's handlers and level, to put back after sd-scripts replaced them."""

    def __init__(self) -> None:
        root = logging.getLogger()
        self.handlers = list(root.handlers)
        self.level = root.level

    def restore(self) -> None:
        """Put the saved handlers and level back on the root logger."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in self.handlers:
                root.removeHandler(handler)
        for handler in self.handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(self.level)


@contextlib.contextmanager
def random_untouched_by_logging(logger_names: list[str]) -> Iterator[None]:
    """Handling a record of these loggers leaves Python's global ``random`` as it was.

    sd-scripts shuffles captions with the global ``random``; some log handlers draw from it (rich makes a random
    link id per styled path), so the caller's logging configuration would otherwise change what is trained. The
    loggers are created here before sd-scripts' modules ask for them, so lazily imported modules are covered too."""
    wrapped = []
    for name in logger_names:
        logger = logging.getLogger(name)
        if "handle" in vars(logger):
            continue
        original = logger.handle

        def handle(record: logging.LogRecord, _original=original) -> None:
            state = random.getstate()
            try:
                _original(record)
            finally:
                random.setstate(state)

        logger.handle = handle  # type: ignore[method-assign]  # this logger instance, for this run only
        wrapped.append(logger)
    try:
        yield
    finally:
        for logger in wrapped:
            del logger.handle


def imported_names(root: Path, entry_points: tuple[str, ...] = ("train_network", "networks")) -> frozenset[str]:
    """The top-level names of ``root`` that sd-scripts' code imports, starting from ``entry_points`` (the trainer,
    and the package of its network modules, which it imports by name at run time) and following every ``import``
    statement, module-level or inside functions, of every file reached."""
    tops = {
        p.stem if p.suffix == ".py" else p.name
        for p in root.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").is_file() or p.is_dir()) and not p.name.startswith(".")
    }
    found: set[str] = set()
    todo = [name for name in entry_points if name in tops]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        package = root / name
        for path in sorted(package.rglob("*.py")) if package.is_dir() else [root / f"{name}.py"]:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            except (OSError, SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                todo += [m.split(".", 1)[0] for m in modules if m.split(".", 1)[0] in tops]
    return frozenset(found)


class _EngineFinder(importlib.abc.MetaPathFinder):
    """Finds the engine's top-level names in its folder, ahead of ``sys.path``, and nothing else: the folder is not
    put on ``sys.path``, so none of its other names (``tools``, ``tests``, ``setup``...) shadows the caller's."""

    def __init__(self, root: Path, names: frozenset[str]) -> None:
        self.root, self.names = str(root), names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None or fullname not in self.names:
            return None  # submodules are found through their package's __path__, as usual
        return importlib.machinery.PathFinder.find_spec(fullname, [self.root])


class EngineHost:
    """One sd-scripts folder hosted in this process: imports it on first use and keeps its modules out of
    ``sys.modules`` between uses."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top_names = imported_names(root)  # what its code imports: the names swapped in and out
        self._finder = _EngineFinder(root, self.top_names)
        self._stash: dict[str, ModuleType] = {}
        self._callers: dict[str, ModuleType] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # held while modules go in or out, never for a whole run
        self._depth = 0  # how many blocks (of any thread) are inside active()
        self._paths_before = 0
        self._stand_in: logging.Handler | None = None
        self._logging = RootLoggerSnapshot()
        self._train_network: ModuleType | None = None
        commit = engine_commit(root)
        self.commit = commit
        note = commit_note(commit)
        if note is not None:
            warn_caller(f"sd-scripts at {root}: {note}")

    def logger_names(self) -> list[str]:
        """Every logger name sd-scripts' modules can create (``logging.getLogger(__name__)``)."""
        names = [p.stem for p in self.root.glob("*.py")]
        for package in ("library", "networks", "tools", "finetune"):
            names += [f"{package}.{p.stem}" for p in (self.root / package).glob("*.py") if p.stem != "__init__"]
            names.append(package)
        return names

    def engine_modules(self, *also: str) -> list[ModuleType]:
        """sd-scripts' modules imported so far, and the modules named in ``also`` (imported now: a network module
        such as ``networks.lora``, which sd-scripts imports only when a run starts). Call inside :meth:`active`."""
        for name in also:
            importlib.import_module(name)
        found = {id(m): m for n, m in list(sys.modules.items()) if self._is_engine_name(n) and self._owns(m)}
        found.update({id(sys.modules[name]): sys.modules[name] for name in also})
        return list(found.values())

    def _owns(self, module: ModuleType) -> bool:
        paths = [getattr(module, "__file__", None) or ""]
        paths += list(getattr(module, "__path__", []) or [])
        root = str(self.root) + os.sep
        return any(str(p).startswith(root) for p in paths if p)

    def _is_engine_name(self, name: str) -> bool:
        return name.split(".", 1)[0] in self.top_names

    @contextlib.contextmanager
    def active(self) -> Iterator[RootLoggerSnapshot]:
        """Make sd-scripts importable and its modules visible, for the duration of the block (blocks of several
        threads may overlap: the first installs, the last takes out). Yields the caller's root-logger configuration,
        which is restored when the last block ends (and can be restored earlier)."""
        with self._lock:
            if self._depth == 0:
                self._install()
            self._depth += 1
            snapshot = self._logging
        try:
            yield snapshot
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._uninstall()

    def _install(self) -> None:
        self._callers = {}
        for name in [n for n in sys.modules if self._is_engine_name(n)]:
            module = sys.modules[name]
            if not self._owns(module):
                self._callers[name] = sys.modules.pop(name)
        stepping_aside = sorted(n for n in self._callers if "." not in n and n not in self._warned)
        if stepping_aside:
            self._warned.update(stepping_aside)
            names = ", ".join(
                f"`{n}` ({getattr(self._callers[n], '__file__', None) or 'built in'})" for n in stepping_aside
            )
            warn_caller(
                f"your module {names} steps aside while sd-scripts runs: sd-scripts imports a top-level module of "
                f"that name from {self.root}; yours is put back in sys.modules when the run ends (rename yours to "
                f"avoid this)"
            )
        sys.modules.update(self._stash)
        self._stash.clear()
        self._paths_before = sys.path.count(str(self.root))
        sys.meta_path.insert(0, self._finder)
        root_logger = logging.getLogger()
        self._stand_in = _LastResort() if not root_logger.handlers else None
        if self._stand_in is not None:
            root_logger.addHandler(self._stand_in)
        self._logging = RootLoggerSnapshot()

    def _uninstall(self) -> None:
        self._logging.restore()
        if self._stand_in is not None:
            logging.getLogger().removeHandler(self._stand_in)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        root = str(self.root)  # train() appends its own folder to sys.path (train_network.py l.642)
        while sys.path.count(root) > self._paths_before:
            del sys.path[len(sys.path) - 1 - sys.path[::-1].index(root)]
        for name in [n for n in sys.modules if self._is_engine_name(n)]:
            if self._owns(sys.modules[name]):
                self._stash[name] = sys.modules.pop(name)
        sys.modules.update(self._callers)
        self._callers = {}

    def train_network(self) -> ModuleType:
        """sd-scripts' ``train_network`` module (imported once; about 6 s). Call inside :meth:`active`."""
        if self._train_network is None:
            import importlib

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # sd-scripts has `is not "no"` comparisons
                # tqdm.auto, imported by its dependencies, warns in Jupyter when ipywidgets is missing; spyke-lora
                # draws its own progress there (callbacks.Progress), so the warning is only noise
                warnings.filterwarnings("ignore", message="IProgress not found")
                self._train_network = importlib.import_module("train_network")
        return self._train_network


_HOSTS: dict[Path, EngineHost] = {}
_HOSTS_LOCK = threading.Lock()


def host_for(configured: Path | None) -> EngineHost:
    """The (cached) host of the engine that ``configured`` / $SPYKE_LORA_SD_SCRIPTS / the submodule names."""
    root = locate_engine(configured)
    with _HOSTS_LOCK:
        if root not in _HOSTS:
            _HOSTS[root] = EngineHost(root)
        return _HOSTS[root]


def engine_problems(cfg: Any, resumed: bool = False) -> list[str]:
    """What this config's run would need of its sd-scripts that that checkout lacks, as messages, for ``plan()``:
    found from the engine's code (hosted, no model loaded), not from its commit.

    Args:
        cfg: The run's :class:`~spyke_lora.TrainConfig` (``sd_scripts_dir`` says which sd-scripts).
        resumed: Whether the run continues a saved state.

    Returns:
        The problems ([] when that sd-scripts can do every feature the run uses).

    Raises:
        EngineError: No sd-scripts is found.
    """
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        try:
            require(host.train_network(), features_of(cfg, resumed))
        except EngineError as e:
            return [str(e)]
    return []
