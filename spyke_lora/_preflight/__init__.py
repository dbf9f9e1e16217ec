"""The preflight: every check that refuses a bad run before 2 GB are loaded, each a rule of its group.

``plan()`` builds one :class:`CheckContext` and runs :data:`INPUT_RULES` (the config, the device, the base model,
the dataset, the held-out set, a resume, earlier outputs), then, if none found a problem, :data:`RUN_RULES` (what
needs sd-scripts' step count: memory, the steps left to a resume, the settings' warnings, the disk). Every problem
found is reported together in one :class:`~spyke_lora.ConfigError`; the warnings go in ``Plan.warnings``. The
checks of one dataset folder (its images and captions) are :data:`FOLDER_RULES`, run for every folder.

A rule is a function ``check_x(ctx, found) -> None`` in its group's module:

- ``_device``: the device policy's corrections, what the device cannot run (processes per GPU);
- ``_base_model``: the base model's header (inpainting, no VAE);
- ``_settings``: config values that need this machine (a package, a folder) or deserve a warning, the step count;
- ``_names``: names and files sd-scripts resolves only after loading (modules, optimizers, schedulers, option files);
- ``_compat``: what this sd-scripts checkout cannot do (an older commit);
- ``_folders``: the dataset's folders (and :data:`FOLDER_RULES`); ``_images`` (the files sd-scripts lists and
  opens), ``_image_content`` (orientation, bit depth, transparency, size), ``_captions``: a folder's files;
- ``_held_out``: ``validation_dir`` and ``validation_split``;
- ``_resume``, ``_outputs`` (the output folder, earlier files, disk space), ``_memory``.

Every rule runs inside ``_rules.run_rule``: a rule that raises becomes a problem naming the check.

A new check: write the function in its group's module, add it to the list here (or to ``FOLDER_RULES``), and add a
unit test in ``tests/unit/test_preflight.py``. The order of a list is the order of the messages.
"""

from __future__ import annotations

from . import _base_model, _compat, _device, _folders, _held_out, _memory, _names, _outputs, _resume, _settings
from ._captions import caption_example, count_captions
from ._context import CheckContext, Derived, Findings, FolderContext, FolderRule, Rule, list_images, names
from ._folders import FOLDER_RULES, check_folder, folder_findings
from ._images import STRUCTURE_CHECKS
from ._outputs import BYTES_PER_DIM_FP32, STATE_BYTES_PER_DIM, bytes_per_file
from ._rules import run_rule

__all__ = [
    "BYTES_PER_DIM_FP32",
    "FOLDER_RULES",
    "INPUT_RULES",
    "RUN_RULES",
    "STATE_BYTES_PER_DIM",
    "STRUCTURE_CHECKS",
    "CheckContext",
    "Derived",
    "Findings",
    "FolderContext",
    "FolderRule",
    "Rule",
    "bytes_per_file",
    "caption_example",
    "check_folder",
    "count_captions",
    "folder_findings",
    "list_images",
    "names",
    "run_rule",
    "run_rules",
]

# The checks of a run's inputs, in the order their messages are listed. They read files and headers only.
INPUT_RULES: list[Rule] = [
    _device.check_processes_on_mps,
    _device.check_processes_per_gpu,
    _device.check_corrections,
    _base_model.check_base_model,
    _base_model.check_unet_and_vae,
    _base_model.check_sd2,
    _settings.check_tensorboard,
    _settings.check_tokenizer_cache_dir,
    _settings.check_gradient_accumulation,
    _names.check_names,
    _names.check_option_files,
    _folders.check_dataset,
    _folders.check_repeats,
    _folders.check_same_folders,
    _folders.check_dataset_folders,
    _held_out.check_held_out,
    _held_out.check_split,
    _resume.check_resume,
    _outputs.check_output_dir,
    _outputs.check_existing_outputs,
]

# The checks of the run itself, once the inputs passed: they read sd-scripts' step count and the memory plan.
RUN_RULES: list[Rule] = [
    _settings.check_steps,
    _memory.check_memory_limit,
    _memory.check_memory_budget,
    _resume.check_steps_left,
    _settings.check_alpha,
    _settings.check_flip_aug,
    _settings.check_save_interval,
    _settings.check_warmup,
    _settings.check_learning_rates,
    _settings.check_output_name,
    _settings.check_sample_prompts,
    _compat.check_engine,
    _outputs.check_disk,
]


def run_rules(rules: list[Rule], ctx: CheckContext, found: Findings | None = None) -> Findings:
    """Run ``rules`` in order on ``ctx``, adding to ``found`` (a new :class:`Findings` by default).

    Args:
        rules: the checks, e.g. :data:`INPUT_RULES`.
        ctx: what they read.
        found: the findings so far, added to in place.

    Returns:
        ``found``, with every problem and warning of ``rules`` added in order.
    """
    found = Findings() if found is None else found
    for rule in rules:
        run_rule(rule, ctx, found)
    return found
