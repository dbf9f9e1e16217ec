"""``deploy()``: check a trained LoRA file and install it into ComfyUI, with a backup and a provenance sidecar.

Where things live, imports going down this list: ``_install`` (:func:`deploy` itself: the atomic copy into
``models/loras``, the backup of a replaced file) uses ``_sidecar`` (the ``NAME.spyke-lora.json`` provenance record),
which uses ``_preconditions`` (what is checked before anything is written: the LoRA file, its name, the ComfyUI
folder, the config to record).
"""

from ._install import BACKUP_DIR, COMFYUI_MODEL_EXTENSIONS, DeployResult, deploy
from ._preconditions import (
    CHUNK,
    CheckedLora,
    check_comfyui,
    check_lora,
    read_metadata,
    resolve_config,
    resolve_name,
)
from ._sidecar import SIDECAR_SUFFIX, metadata_int, sidecar_record, write_sidecar

__all__ = [
    "BACKUP_DIR",
    "CHUNK",
    "COMFYUI_MODEL_EXTENSIONS",
    "SIDECAR_SUFFIX",
    "CheckedLora",
    "DeployResult",
    "check_comfyui",
    "check_lora",
    "deploy",
    "metadata_int",
    "read_metadata",
    "resolve_config",
    "resolve_name",
    "sidecar_record",
    "write_sidecar",
]
