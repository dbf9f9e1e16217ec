"""The one part of spyke-lora that knows kohya-ss/sd-scripts: its location, option names, trainer and files.

Everything else in the package speaks in :class:`~spyke_lora.TrainConfig`, the device choice and
:mod:`spyke_lora.events`. Where things live:

* ``_context``: what a run is given (:class:`RunContext`) and gives back (:class:`Outcome`);
* ``_run``: one run top to bottom, and sampling or validating files on disk;
* ``_trainer``: the ``NetworkTrainer`` subclass, whose hook methods hand over to the run's parts;
* ``_probe``: the event stream and the stop points; the order of one step;
* ``_hooks``: the sd-scripts calls spyke-lora wraps (a guarded save, an atomic state, the epoch watch);
* ``_after_save``: the work after each saved file (validation, samples, their manifests);
* ``_worker``, ``_channel``, ``_ranks``: one worker process of a multi-process run, how it finds its caller, what
  the ranks agree on;
* ``_frames``: the two places that reach into sd-scripts' running ``train()`` frame;
* ``_argv``: config -> sd-scripts' arguments, dataset TOML and command line;
* ``_outputs``: what a run writes and finds next to its LoRA files;
* ``_state``: saved training states and resuming;
* ``_host``, ``_process``, ``_engine_log``: hosting sd-scripts in this process and leaving nothing behind;
* ``_held_out``: the held-out validation loss, during a run and of files on disk;
* ``_captions``: a folder's captions as sd-scripts reads and trains them (its own ``read_caption``);
* ``_dataset``: sd-scripts' own step math; ``_sample_files``, ``_lora_weights``: sampling files on disk;
  ``_diffusers``, ``_random_model``.
"""

from ._argv import (
    build_argv,
    command_line,
    dataset_toml_path,
    dataset_toml_text,
    device_choice,
    parse_argv,
    run_environment,
    sample_prompts_path,
    sample_prompts_text,
    sd_scripts_argv,
)
from ._captions import CaptionRead, CaptionReader, caption_reader
from ._channel import CHANNEL_ENV, KEY_ENV, SPEC_ENV, WORKER_MODULE
from ._compat import OLDEST_COMMIT, commit_note
from ._context import Outcome, RunContext
from ._dataset import Folder, StepCount, count_steps, dataset_folders, image_extensions
from ._diffusers import diffusers_pipeline
from ._engine_log import engine_output
from ._file_identity import FileCheck, check_recorded, checkpoint_identity
from ._held_out import append_validation, validation_manifest_path
from ._host import PINNED_COMMIT, PINNED_VERSION, engine_commit, engine_problems, host_for, locate_engine
from ._image_files import glob_images
from ._lookups import LYCORIS_WORKS, NameFindings, name_findings
from ._lora_weights import load_lora_weights, lora_alphas
from ._outputs import (
    existing_outputs,
    samples_manifest_path,
    write_dataset_toml,
    write_sample_prompts,
)
from ._process import free_memory, preserved_random_state
from ._random_model import write_random_sd15_checkpoint
from ._run import launched_run, run, sample_checkpoints, validate_checkpoints
from ._state import SavedState, find_states, resolve_resume

__all__ = [
    "CHANNEL_ENV",
    "KEY_ENV",
    "LYCORIS_WORKS",
    "SPEC_ENV",
    "WORKER_MODULE",
    "append_validation",
    "FileCheck",
    "check_recorded",
    "checkpoint_identity",
    "CaptionRead",
    "CaptionReader",
    "caption_reader",
    "OLDEST_COMMIT",
    "PINNED_COMMIT",
    "PINNED_VERSION",
    "Folder",
    "NameFindings",
    "Outcome",
    "RunContext",
    "SavedState",
    "StepCount",
    "build_argv",
    "command_line",
    "count_steps",
    "dataset_folders",
    "dataset_toml_path",
    "dataset_toml_text",
    "device_choice",
    "diffusers_pipeline",
    "commit_note",
    "engine_commit",
    "engine_problems",
    "engine_output",
    "existing_outputs",
    "find_states",
    "free_memory",
    "glob_images",
    "host_for",
    "image_extensions",
    "launched_run",
    "load_lora_weights",
    "locate_engine",
    "lora_alphas",
    "name_findings",
    "parse_argv",
    "preserved_random_state",
    "resolve_resume",
    "run",
    "run_environment",
    "sample_checkpoints",
    "sample_prompts_path",
    "sample_prompts_text",
    "samples_manifest_path",
    "sd_scripts_argv",
    "validate_checkpoints",
    "validation_manifest_path",
    "write_dataset_toml",
    "write_random_sd15_checkpoint",
    "write_sample_prompts",
]
