"""``deploy()``: check a trained LoRA file and install it into ComfyUI, with a backup and a provenance sidecar."""

from ._install import BACKUP_DIR, COMFYUI_MODEL_EXTENSIONS, DeployResult, deploy
from ._sidecar import SIDECAR_SUFFIX

__all__ = ["BACKUP_DIR", "COMFYUI_MODEL_EXTENSIONS", "SIDECAR_SUFFIX", "DeployResult", "deploy"]
