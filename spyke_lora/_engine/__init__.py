"""The one part of spyke-lora that knows kohya-ss/sd-scripts: its location, option names, trainer and files.

Everything else in the package speaks in :class:`~spyke_lora.TrainConfig`, :class:`~spyke_lora._device.DevicePlan`
and :mod:`spyke_lora.events`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .._config import TrainConfig
from .._device import (
    DevicePlan,
    SpykeLoraWarning,
    available_devices,
    device_name,
    memory_reader,
    plan_device,
    resolve_device,
)
from .._errors import ConfigError, DeviceError, NonFiniteLoss, SpykeLoraError, TrainingError
from .._lock import output_lock
from ..events import Event
from ._argv import (
    build_argv,
    dataset_toml_path,
    dataset_toml_text,
    parse_argv,
    sample_prompts_path,
    sample_prompts_text,
)
from ._dataset import Folder, StepCount, count_steps, dataset_folders, image_extensions
from ._host import (
    PINNED_COMMIT,
    PINNED_VERSION,
    EngineHost,
    RootLoggerSnapshot,
    engine_commit,
    host_for,
    locate_engine,
    random_untouched_by_logging,
)
from ._output import caller_output, engine_output
from ._process import (
    DeviceGenerator,
    class_attributes_restored,
    cuda_rng_calls_reach,
    device_generator,
    free_memory,
    isolated_run,
    module_values_restored,
    preserved_random_state,
)
from ._state import SavedState, find_states, remove_partial_states, resolve_resume, state_record
from ._trainer import NonFiniteStop, Probe, SamplePlan, StopRun, finish_after_stop, trainer_class

__all__ = [
    "PINNED_COMMIT",
    "PINNED_VERSION",
    "Folder",
    "Outcome",
    "SavedState",
    "StepCount",
    "build_argv",
    "command_line",
    "count_steps",
    "dataset_folders",
    "dataset_toml_path",
    "device_plan",
    "engine_output",
    "engine_commit",
    "existing_outputs",
    "find_states",
    "image_extensions",
    "locate_engine",
    "preserved_random_state",
    "resolve_resume",
    "run",
    "run_environment",
    "sample",
    "samples_manifest_path",
    "sd_scripts_argv",
    "write_dataset_toml",
    "write_sample_prompts",
    "write_random_sd15_checkpoint",
]


def device_plan(cfg: TrainConfig, device: str | None = None) -> DevicePlan:
    """The device policy for ``cfg``: on ``device`` when given (no hardware check), else on what ``cfg.device``
    resolves to on this machine."""
    if device is None:
        cuda, mps = available_devices()
        device = resolve_device(cfg.device, cuda_available=cuda, mps_available=mps)
    elif device not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device must be 'cpu', 'cuda' or 'mps', got {device!r}")
    xformers = bool(cfg.extra_args.get("xformers", False))
    return plan_device(
        device, mixed_precision=cfg.mixed_precision, optimizer_type=cfg.optimizer_type, xformers=xformers
    )


def sd_scripts_argv(cfg: TrainConfig, device: str | None = None) -> list[str]:
    """Exactly the ``train_network.py`` arguments :func:`spyke_lora.train` runs for ``cfg``, checked by sd-scripts'
    own parser. ``device`` ("cpu", "cuda", "mps") applies that device's policy without needing the hardware; by
    default the device ``cfg.device`` resolves to here. Corrections (e.g. fp16 on MPS) are issued as
    :class:`SpykeLoraWarning`."""
    plan = device_plan(cfg, device)
    for note in plan.corrections:
        warnings.warn(note, SpykeLoraWarning, stacklevel=2)
    argv = build_argv(cfg, plan)
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        parse_argv(host.train_network().setup_parser(), argv)
    return argv


def command_line(cfg: TrainConfig, plan: DevicePlan, resume_from: Path | None = None) -> str:
    """The shell command that runs ``cfg`` with the sd-scripts command line: environment, this Python, the engine's
    ``train_network.py`` and :func:`build_argv`'s arguments (the files they read are written by the run)."""
    import shlex

    env = [f"{k}={v}" for k, v in run_environment(plan).items()]
    script = locate_engine(cfg.sd_scripts_dir) / "train_network.py"
    return " ".join(env + [shlex.join([sys.executable, str(script), *build_argv(cfg, plan, resume_from)])])


def run_environment(plan: DevicePlan) -> dict[str, str]:
    """Environment variables a run on ``plan.device`` needs (set for the run in-process; print them with the
    command line): MPS's CPU fallback for missing operations; CPU forced even where a GPU exists."""
    if plan.device == "mps":
        return {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}
    if plan.device == "cpu":
        return {"ACCELERATE_USE_CPU": "true"}
    return {}


def existing_outputs(cfg: TrainConfig, after_step: int | None = None) -> list[Path]:
    """LoRA files of ``cfg.output_name`` already in ``cfg.output_dir`` (final, per-step and per-epoch names).

    With ``after_step`` (a resume from that step): only what the resumed run would replace although it holds later
    work: files saved after that step (their ``ss_steps`` metadata says so) and state folders beyond it. The
    stopped run's own final file, saved at that step, is meant to be replaced."""
    if not cfg.output_dir.is_dir():
        return []
    name = cfg.output_name
    found = []
    for path in sorted(cfg.output_dir.iterdir()):
        stem, suffix = path.stem, path.suffix
        if suffix != ".safetensors" or not path.is_file():
            continue
        if not stem.startswith(name):
            continue
        # sd-scripts' names: NAME, NAME-step00000200 (STEP_FILE_NAME), NAME-000001 (EPOCH_FILE_NAME)
        rest = stem[len(name) :]
        is_step = rest.startswith("-step") and rest[5:].isdigit()
        is_epoch = rest.startswith("-") and rest[1:].isdigit()
        if rest == "" or is_step or is_epoch:
            if after_step is None or _saved_at_step(path) > after_step:
                found.append(path)
    if after_step is not None:
        found += [s.path for s in find_states(cfg) if s.step > after_step]
    return found


def _saved_at_step(path: Path) -> float:
    """The step a LoRA file was saved at (sd-scripts' ``ss_steps``); infinity when unknown, so it is kept."""
    from .._model import inspect_model

    try:
        return int(inspect_model(path).metadata.get("ss_steps", ""))
    except (SpykeLoraError, ValueError):
        return float("inf")


@dataclasses.dataclass(frozen=True)
class Outcome:
    steps: int
    final_path: Path | None
    stopped: bool


class _RunSlot:
    """One run (or sampling) at a time per process: sd-scripts and accelerate keep process-wide singletons.

    A second run is refused at once, from any thread, with a clear error; it never waits behind a run that goes on.
    It waits only for a run that is already ending (a stop was asked for, e.g. its ``iter_events`` stream was let
    go), so the next ``train()`` after an abandoned stream works."""

    WAIT_FOR_ENDING_S = 600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._ending: Callable[[], bool] = lambda: False

    @contextlib.contextmanager
    def taken(self, ending: Callable[[], bool]) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            owner, owner_ending = self._owner, self._ending
            waits = owner is not None and owner != threading.get_ident() and owner_ending()
            if not self._lock.acquire(timeout=self.WAIT_FOR_ENDING_S if waits else 0.0):
                raise SpykeLoraError(
                    "another spyke-lora run is active in this process; sd-scripts keeps process-wide state, so runs "
                    "in one process go one at a time: wait for it to end (or stop it) first"
                )
        self._owner, self._ending = threading.get_ident(), ending
        try:
            yield
        finally:
            self._owner, self._ending = None, lambda: False
            self._lock.release()


_SLOT = _RunSlot()


@contextlib.contextmanager
def _engine_session(
    cfg: TrainConfig,
    plan: DevicePlan,
    generator: DeviceGenerator | None,
    ending: Callable[[], bool],
    log: Path | None,
    append_log: bool,
) -> Iterator[tuple[EngineHost, Any, RootLoggerSnapshot]]:
    """What a training run and a sampling call share: this process's run slot, then the output's lock, then the
    engine log (opened only now: a refused run must not empty a live run's log), then sd-scripts hosted in a
    process state that is put back afterwards. Yields the host, ``train_network`` and the caller's logging."""
    host = host_for(cfg.sd_scripts_dir)
    try:
        with _SLOT.taken(ending), output_lock(cfg), engine_output(log, append=append_log), host.active() as logging:
            train_network = host.train_network()
            modules = host.engine_modules(cfg.network_module)
            with isolated_run(train_network, run_environment(plan)), random_untouched_by_logging(
                host.logger_names()
            ), class_attributes_restored(modules), module_values_restored(modules), cuda_rng_calls_reach(generator):
                yield host, train_network, logging
    finally:
        free_memory()


def _to_caller(emit: Callable[[Event], None]) -> Callable[[Event], None]:
    """``emit`` with the callbacks' own prints going to the caller's streams, not to the engine log (flushed first,
    so a callback reading the log sees everything sd-scripts wrote up to the event)."""

    def deliver(event: Event) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        with caller_output():
            emit(event)

    return deliver


def run(
    cfg: TrainConfig,
    plan: DevicePlan,
    emit: Callable[[Event], None],
    stop_requested: Callable[[], bool],
    started_at: float,
    resume: SavedState | None = None,
    log: Path | None = None,
) -> Outcome:
    """Train ``cfg`` in this process with sd-scripts (continuing the state ``resume`` when given). Events go to
    ``emit``; ``stop_requested`` is polled at safe points (and before anything is loaded); sd-scripts' output goes
    to the file ``log`` when given. sd-scripts' own exceptions come out as :class:`TrainingError`; others (a
    callback's, Ctrl-C) unchanged."""
    argv = build_argv(cfg, plan, resume.path if resume else None)
    generator = device_generator(plan.device)
    with _engine_session(cfg, plan, generator, stop_requested, log, resume is not None) as (host, train_network, logs):
        if stop_requested():  # let go of before it started (an iter_events stream closed at once): load nothing
            return Outcome(resume.step if resume else 0, None, stopped=True)
        _remove_partial_files(cfg)
        remove_partial_states(cfg)
        write_dataset_toml(cfg)
        probe = Probe(
            _to_caller(emit), stop_requested, started_at, logs.restore, cfg.max_nonfinite_steps,
            resume=resume, state_record=state_record(cfg) if cfg.save_state else None,
            samples=_prepare_samples(cfg, fresh=resume is None), generator=generator,
            memory=memory_reader(plan.device), device_name=device_name(plan.device),
        )  # fmt: skip
        with _ctrl_c_stops_after_the_step(probe):
            return _train(train_network, host, argv, probe)


def sample(
    cfg: TrainConfig,
    plan: DevicePlan,
    files: list[tuple[int, Path]],
    emit: Callable[[Event], None],
    started_at: float,
    log: Path | None = None,
) -> None:
    """Sample LoRA files on disk (``(step, path)`` pairs) with ``cfg``'s prompts, CFG scales and seed, into
    ``cfg.output_dir``, with sd-scripts' own sampler; events (:class:`SampleSaved`) go to ``emit``."""
    from ._sample import sample_files

    argv = build_argv(cfg, plan)
    generator = device_generator(plan.device)
    with _engine_session(cfg, plan, generator, lambda: False, log, True) as (host, train_network, logs):
        probe = Probe(_to_caller(emit), lambda: False, started_at, logs.restore,
                      samples=_prepare_samples(cfg, fresh=False), generator=generator)  # fmt: skip
        args = parse_argv(train_network.setup_parser(), argv)
        try:
            sample_files(train_network, args, files, probe, base_first=cfg.sample_at_first)
        except BaseException as e:
            _clear_engine_frames(e.__traceback__, host.root)
            if isinstance(e, Exception) and not isinstance(e, SpykeLoraError) and e is not probe.callback_error:
                raise TrainingError(f"sd-scripts failed while sampling: {type(e).__name__}: {e}") from e
            raise


def _train(train_network, host: EngineHost, argv: list[str], probe: Probe) -> Outcome:
    parser = train_network.setup_parser()
    args = parse_argv(parser, argv)
    trainer = trainer_class(train_network)(probe)
    try:
        try:
            trainer.train(args)
        except StopRun as stop:
            final = finish_after_stop(stop, train_network, probe)
            _clear_engine_frames(stop.__traceback__, host.root)
            return Outcome(probe.steps_done, final, stopped=True)
        except KeyboardInterrupt as interrupt:
            if probe.interrupted_at_boundary:  # between steps: keep the last completed step's LoRA
                finish_after_stop(interrupt, train_network, probe)
            raise
        # the final file, when this run wrote it: a save during a NaN/Inf streak is skipped
        name = train_network.train_util.get_last_ckpt_name(args, "." + args.save_model_as)
        return Outcome(probe.steps_done, probe.written(Path(args.output_dir) / name), stopped=False)
    except NonFiniteStop as e:
        _clear_engine_frames(e.__traceback__, host.root)
        raise _nonfinite_error(probe) from None
    except SystemExit as e:
        _clear_engine_frames(e.__traceback__, host.root)
        if e is probe.callback_error:  # the caller's own exit: theirs to have
            raise
        # sd-scripts calls exit() on some bad input; a library must not
        raise TrainingError(f"sd-scripts tried to exit the process (exit code {e.code}); see its log above") from None
    except BaseException as e:
        _clear_engine_frames(e.__traceback__, host.root)
        if isinstance(e, Exception) and e is not probe.callback_error and not isinstance(e, SpykeLoraError):
            raise TrainingError(f"sd-scripts failed: {type(e).__name__}: {e}") from e
        raise


@contextlib.contextmanager
def _ctrl_c_stops_after_the_step(probe: Probe) -> Iterator[None]:
    """While steps run, a first Ctrl-C ends the run after the current step (its LoRA saved under the final name,
    then KeyboardInterrupt); a second one, or one before training starts, interrupts at once. Main thread only
    (Python delivers signals there); the caller's handler is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if not probe.started or probe.interrupt_requested:
            raise KeyboardInterrupt
        probe.interrupt_requested = True
        print("\nspyke-lora: stopping after this step (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _nonfinite_error(probe: Probe) -> NonFiniteLoss:
    kept = ", ".join(p.name for p in probe.saved) or "none were written before it"
    return NonFiniteLoss(
        f"the loss became {probe.last_loss} at step {probe.steps_done} (epoch {probe.epoch}); the run was stopped "
        f"and no file was written from the broken weights. Checkpoints kept: {kept}. Likely causes: a learning rate "
        f"too high (the recipe: unet_lr 1e-4, text_encoder_lr 5e-5), a half-precision VAE (keep it in fp32: the "
        f"default on MPS), or fp16 overflow on CUDA (try mixed_precision = 'bf16')",
        step=probe.steps_done,
        loss=probe.last_loss,
    )


def _remove_partial_files(cfg: TrainConfig) -> None:
    """Files a killed run left half-written under a temporary name (never under a final name)."""
    if not cfg.output_dir.is_dir():
        return
    # the names partial_name() gives NAME, NAME-step00000200 and NAME-000001, and no other output_name's
    pattern = re.compile(rf"\.{re.escape(cfg.output_name)}(-step\d+|-\d+)?\.\d+\.partial\.safetensors")
    for leftover in cfg.output_dir.iterdir():
        if pattern.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def _clear_engine_frames(tb: TracebackType | None, root: Path) -> None:
    """Drop the locals of sd-scripts' frames held by a traceback: they hold the models (gigabytes), and a notebook
    keeps the last exception alive. The traceback's lines stay readable."""
    prefix = str(root) + os.sep
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.startswith(prefix):
            try:
                frame.clear()
            except RuntimeError:  # still executing; cannot happen for an unwound frame
                pass
        tb = tb.tb_next


def samples_manifest_path(cfg: TrainConfig) -> Path:
    """The run's sample manifest: one JSON line per sample image (step, prompt, cfg_scale, seed, path, checkpoint)."""
    return cfg.output_dir / f"{cfg.output_name}.samples.jsonl"


def _prepare_samples(cfg: TrainConfig, *, fresh: bool) -> SamplePlan | None:
    """Write sd-scripts' prompt file; start a new manifest for a fresh run (a resumed one appends to its own)."""
    if write_sample_prompts(cfg) is None:
        return None
    manifest = samples_manifest_path(cfg)
    if fresh:
        manifest.unlink(missing_ok=True)
    return SamplePlan(
        lines=tuple((prompt, float(scale)) for prompt in cfg.sample_prompts for scale in cfg.sample_cfg_scales),
        seed=cfg.sample_seed,
        output_name=cfg.output_name,
        folder=cfg.output_dir / "sample",
        manifest=manifest,
    )


def write_sample_prompts(cfg: TrainConfig) -> Path | None:
    """Write the prompt file that ``sd_scripts_argv(cfg)`` points at (atomically); None when sampling is off."""
    text = sample_prompts_text(cfg)
    if text is None:
        return None
    path = sample_prompts_path(cfg)
    _write_atomically(path, text)
    return path


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_dataset_toml(cfg: TrainConfig) -> Path | None:
    """Write the dataset TOML that ``sd_scripts_argv(cfg)`` points at (atomically); None for ``dataset_config``."""
    text = dataset_toml_text(cfg)
    if text is None:
        return None
    path = dataset_toml_path(cfg)
    _write_atomically(path, text)
    return path


def diffusers_pipeline(cfg: TrainConfig) -> Any:
    """A diffusers ``StableDiffusionPipeline`` of ``cfg.base_model`` (SD1.x), converted offline by sd-scripts'
    ``model_util``, with ``cfg.tokenizer_cache_dir``'s tokenizer when set. See :mod:`._diffusers`."""
    from .._model import check_base_model
    from ._diffusers import build_pipeline

    if check_base_model(cfg.base_model).family != "sd1":
        raise ConfigError(f"`base_model` {str(cfg.base_model)!r} is SD2.x; diffusers_pipeline() converts SD1.x only")
    return build_pipeline(host_for(cfg.sd_scripts_dir), cfg.base_model, cfg.tokenizer_cache_dir)


def write_random_sd15_checkpoint(path: Path, *, seed: int = 0, sd_scripts_dir: Path | None = None) -> Path:
    """A randomly initialised, full-size SD1.5 checkpoint (fp16 .safetensors, about 2.1 GB), built with sd-scripts'
    own ``model_util`` so its keys are exactly what the trainer loads. Written atomically to ``path``."""
    host = host_for(sd_scripts_dir)
    with host.active():
        host.train_network()  # imports library.* with the right sys.path
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        model_util = sys.modules["library.model_util"]
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            unet = UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
            vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
            text_encoder = CLIPTextModel._from_config(
                CLIPTextConfig(  # the v1 config of model_util.load_models_from_stable_diffusion_checkpoint
                    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-05,
                    dropout=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, model_type="clip_text_model",
                    projection_dim=768, torch_dtype="float32",
                )  # fmt: skip
            )
        finally:
            torch.set_rng_state(state)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
        try:
            model_util.save_stable_diffusion_checkpoint(
                False, str(tmp), text_encoder, unet, None, 0, 0, None, save_dtype=torch.float16, vae=vae
            )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        del unet, vae, text_encoder
    free_memory()
    return path
