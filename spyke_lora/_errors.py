"""The exception tree. Every error the library raises derives from :class:`SpykeLoraError`.

::

    SpykeLoraError
     ├── ConfigError          a TrainConfig value, TOML key or extra argument is wrong (lists every problem)
     ├── DeployError          a LoRA file or ComfyUI folder failed deploy()'s checks, or installing it failed
     ├── DeviceError          the config cannot run on the chosen device (e.g. an 8-bit optimizer on MPS)
     ├── EngineError          sd-scripts is missing, or is not the pinned version, or refused the arguments
     ├── OutputInUse          another live run is writing the same output_dir/output_name
     └── TrainingError        sd-scripts failed while training (the original exception is chained)
          ├── NonFiniteLoss   the loss became NaN or infinite; the run was stopped, earlier checkpoints kept
          └── WorkerFailed    a worker of a multi-process run died or failed (names the rank, its last lines)

    SpykeLoraWarning (a UserWarning)  a setting was corrected, or something is worth knowing; the run goes on
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeployError",
    "DeviceError",
    "EngineError",
    "NonFiniteLoss",
    "OutputInUse",
    "SpykeLoraError",
    "SpykeLoraWarning",
    "TrainingError",
    "WorkerFailed",
]


class SpykeLoraWarning(UserWarning):
    """A setting was corrected to one that works (for example fp16 on MPS became no mixed precision), or something
    is worth knowing before it matters (a module of yours that steps aside for sd-scripts, a final file not written)."""


class SpykeLoraError(Exception):
    """Root of every error spyke-lora raises."""


class ConfigError(SpykeLoraError, ValueError):
    """One or more configuration problems; ``problems`` holds each message, all reported at once."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"invalid configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} configuration problems{where}:\n{lines}"
        super().__init__(message)


class DeployError(SpykeLoraError):
    """``deploy()`` refused a LoRA file or a ComfyUI folder, or could not install the file; nothing half-written is
    left in ComfyUI's folders, and a file already installed is never lost."""


class DeviceError(SpykeLoraError):
    """The configuration asks for something the device cannot do."""


class EngineError(SpykeLoraError):
    """sd-scripts (the engine) is missing, unusable, or rejected the arguments."""


class OutputInUse(SpykeLoraError):
    """Another run that is still alive holds the lock of this output_dir/output_name."""


class TrainingError(SpykeLoraError):
    """sd-scripts raised while training; the original exception is the ``__cause__``."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite. The run was stopped at ``step``; no file was written from the broken
    weights, and every checkpoint written before is intact."""

    def __init__(self, message: str, *, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


class WorkerFailed(TrainingError):
    """A worker process of a multi-process run (``processes`` > 1) died or failed; the run was ended on every rank.
    ``rank`` is the first rank seen to fail (None when no rank could be named), ``lines`` its last lines of
    output, ``log`` the file they come from."""

    def __init__(self, message: str, *, rank: int | None, lines: tuple[str, ...] = (), log: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.lines = lines
        self.log = log
