"""spyke-lora: train Stable Diffusion 1.5 LoRAs with kohya-ss/sd-scripts inside your Python process.

Usage::

    from spyke_lora import TrainConfig, train
    result = train(TrainConfig.from_toml("spyke.toml"), callbacks=[print])
"""

# first: PYTORCH_ENABLE_MPS_FALLBACK must be set before anything imports torch (see _mps_fallback)
from . import _mps_fallback  # noqa: F401, I001

import logging as _logging  # noqa: E402

from . import callbacks, events  # noqa: E402
from ._compare import (  # noqa: E402
    Cell,
    ColourHistogramScorer,
    Review,
    SampleWarning,
    Scorer,
    StepLoss,
    StepSummary,
    contact_sheet,
    rank_checkpoints,
    review,
)
from ._config import TrainConfig  # noqa: E402
from ._deploy import DeployResult, deploy  # noqa: E402
from ._doctor import DeviceReport, doctor  # noqa: E402
from ._engine import sd_scripts_argv  # noqa: E402
from ._errors import (  # noqa: E402
    ConfigError,
    DeployError,
    DeviceError,
    EngineError,
    NonFiniteLoss,
    OutputInUse,
    SpykeLoraError,
    SpykeLoraWarning,
    TrainingError,
    WorkerFailed,
)
from ._iter_events import EventStream, iter_events  # noqa: E402
from ._launch import Launch  # noqa: E402
from ._likeness import Likeness, LikenessCell, LikenessCopy, LikenessEncoders, LikenessRow, likeness  # noqa: E402
from ._likeness import likeness_chart  # noqa: E402
from ._memory import MemoryBudget, MemoryPlan  # noqa: E402
from ._pipeline import diffusers_pipeline  # noqa: E402
from ._plan import Plan, SubsetPlan, ValidationPlan, plan  # noqa: E402
from ._records import RunRecord, config_diff, loss_chart, runs  # noqa: E402
from ._sample import sample  # noqa: E402
from ._train import Callback, TrainResult, train  # noqa: E402
from ._validation_loss import HeldOutLoss, validation_loss  # noqa: E402
from ._version import __version__ as __version__  # noqa: E402
from .events import (  # noqa: E402
    CheckpointSaved,
    Event,
    SampleSaved,
    StepEnded,
    Stop,
    TrainEnded,
    TrainStarted,
    ValidationEnded,
)

__all__ = [
    "Callback",
    "Cell",
    "CheckpointSaved",
    "ColourHistogramScorer",
    "ConfigError",
    "DeployError",
    "DeployResult",
    "DeviceError",
    "DeviceReport",
    "EngineError",
    "Event",
    "EventStream",
    "HeldOutLoss",
    "Launch",
    "Likeness",
    "LikenessCell",
    "LikenessCopy",
    "LikenessEncoders",
    "LikenessRow",
    "MemoryBudget",
    "MemoryPlan",
    "NonFiniteLoss",
    "OutputInUse",
    "Plan",
    "Review",
    "RunRecord",
    "SampleSaved",
    "SampleWarning",
    "Scorer",
    "SpykeLoraError",
    "SpykeLoraWarning",
    "StepEnded",
    "StepLoss",
    "StepSummary",
    "Stop",
    "SubsetPlan",
    "TrainConfig",
    "TrainEnded",
    "TrainResult",
    "TrainStarted",
    "TrainingError",
    "ValidationEnded",
    "ValidationPlan",
    "WorkerFailed",
    "callbacks",
    "config_diff",
    "contact_sheet",
    "deploy",
    "diffusers_pipeline",
    "doctor",
    "events",
    "iter_events",
    "likeness",
    "likeness_chart",
    "loss_chart",
    "plan",
    "rank_checkpoints",
    "review",
    "runs",
    "sample",
    "sd_scripts_argv",
    "train",
    "validation_loss",
]

# Public classes show their public path in reprs, tracebacks and docs (spyke_lora.TrainConfig, not
# spyke_lora._config.TrainConfig), as httpx does; pickle finds them there too.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("spyke_lora._"):
        _obj.__module__ = "spyke_lora"
del _name, _obj

_logging.getLogger("spyke_lora").addHandler(_logging.NullHandler())
