"""Multi-process runs (``train(cfg, processes=N)``): the same run in N worker processes started by accelerate's own
launcher, with the caller's callbacks, stop, records and errors as in one process.

How a run goes (docs/scaling.md):

* the caller plans and checks the run once (``plan()``), takes the output's lock, writes the run's input files and
  records, and listens on a local socket (an authenticated ``multiprocessing.connection.Listener``);
* it starts ``python -m accelerate.commands.launch`` (``accelerate launch``; torchrun underneath) in its own session,
  so a terminal's Ctrl-C reaches the caller only; the launcher starts ``python -m spyke_lora._engine._worker`` on every
  rank, and each worker runs the in-process engine (``_engine.run``) with a :class:`~._engine._ranks.RankSync`;
* every worker says hello (rank, pid) and keeps its connection open until it ends: a connection that closes without
  a last word is a worker that died. This machine's first worker (rank 0 on the main machine) sends every event and
  waits for the answer: stop or go on. The answer is shared with every rank at the same step (a collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from ._config import TrainConfig
from ._engine import CHANNEL_ENV, KEY_ENV, SPEC_ENV, WORKER_MODULE, Outcome
from ._errors import (
    ConfigError,
    DeployError,
    DeviceError,
    EngineError,
    NonFiniteLoss,
    OutputInUse,
    SpykeLoraError,
    TrainingError,
    WorkerFailed,
)
from .events import Event

__all__ = [
    "AloneOnRankZero",
    "Launch",
    "alone_on_rank_zero",
    "end_processes",
    "launch_command",
    "run_processes",
    "worker_environment",
]

_ERRORS = {c.__name__: c for c in (DeployError, DeviceError, EngineError, OutputInUse, TrainingError, SpykeLoraError)}
_LAST_LINES = 20
_ENDING_GRACE_S = 60.0  # after the launcher ends or a worker dies, how long the rest may take to say their last word


# What rank 0 does alone after each saved file, bounded from above: a sampler step of SD1.5 at 512 px takes well under
# a second on any CUDA GPU sd-scripts supports (about 0.1 s on an H100, 0.4 s on a T4), a held-out image one forward
# pass. The bound is 1 s per sampler step at 512 px (scaled by the pixels) and 1 s per held-out image, times 3.
_SAMPLER_STEP_S_AT_512 = 1.0
_HELD_OUT_IMAGE_S = 1.0
_TIMEOUT_MARGIN = 3
_GLOO_TIMEOUT_MIN = 30  # torch's default process-group timeout (gloo; NCCL's is 10 min)
_NCCL_TIMEOUT_MIN = 10


@dataclasses.dataclass(frozen=True)
class AloneOnRankZero:
    """What rank 0 of a multi-process run does alone after each saved file while the other ranks wait for it at
    their next collective, and how long they are let wait (accelerate's process-group timeout, sd-scripts'
    ``--ddp_timeout``).

    Attributes:
        samples: Sample images per saved file.
        held_out_images: Held-out images per validation pass.
        bound_s: The conservative bound on that work, in seconds (CUDA).
        ddp_timeout: The minutes to pass as ``--ddp_timeout`` (CUDA; None on the CPU, where sd-scripts applies
            none, or when ``extra_args`` sets it).
        given: ``extra_args.ddp_timeout`` when the caller set it.
        device: The run's device.
    """

    samples: int
    held_out_images: int
    bound_s: float
    ddp_timeout: int | None
    given: int | None
    device: str

    def line(self) -> str:
        """The plan's line: what rank 0 does alone, and how long the others wait for it, and why."""
        work = " and ".join(
            part
            for part in (
                f"samples {self.samples} images" if self.samples else "",
                f"validates {self.held_out_images} held-out images" if self.held_out_images else "",
            )
            if part
        )
        head = f"  rank 0 {work} alone after each saved file"
        if self.device != "cuda":
            return (
                f"{head}; the other ranks wait for it up to gloo's {_GLOO_TIMEOUT_MIN} min (sd-scripts sets a "
                f"collective timeout, ddp_timeout, only with several CUDA GPUs): a prompt list rank 0 cannot sample "
                f"within that ends the run"
            )
        bound = (
            f"at most about {_minutes(self.bound_s)} at a conservative {_SAMPLER_STEP_S_AT_512:g} s per sampler "
            f"step at 512 px"
        )
        if self.given is not None:
            short = (
                ""
                if self.given * 60 >= self.bound_s * _TIMEOUT_MARGIN
                else (", under 3x that bound: raise it, or remove it to let spyke-lora set it")
            )
            return f"{head} ({bound}); the other ranks wait up to {self.given} min (extra_args.ddp_timeout){short}"
        return (
            f"{head} ({bound}); the other ranks wait up to {self.ddp_timeout} min for it (ddp_timeout, set from "
            f"this plan: NCCL's own {_NCCL_TIMEOUT_MIN} min could end the run on a long prompt list)"
        )


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def alone_on_rank_zero(
    device: str,
    samples: int,
    sample_steps: int,
    sample_px: int,
    held_out_images: int,
    given: Any = None,
) -> AloneOnRankZero | None:
    """How long a multi-process run's other ranks must be let wait for rank 0's sampling and validation.

    Args:
        device: The run's device ("cuda", "cpu").
        samples: Sample images per saved file (prompts x CFG scales).
        sample_steps: Sampler steps per image.
        sample_px: The samples' size (their longer side), in px.
        held_out_images: Held-out images per validation pass (0: none).
        given: ``extra_args.ddp_timeout``, when the caller set it (minutes).

    Returns:
        None when rank 0 does nothing alone; otherwise the bound and the timeout to set: the bound times 3, in whole
        minutes, never under NCCL's 10 min or gloo's 30 min defaults (30).
    """
    if not samples and not held_out_images:
        return None
    bound = (
        samples * sample_steps * _SAMPLER_STEP_S_AT_512 * (sample_px / 512) ** 2 + held_out_images * _HELD_OUT_IMAGE_S
    )
    minutes = max(_GLOO_TIMEOUT_MIN, -(-int(bound * _TIMEOUT_MARGIN) // 60))
    chosen = given if isinstance(given, int) and not isinstance(given, bool) else None
    timeout = minutes if device == "cuda" and chosen is None else None
    return AloneOnRankZero(samples, held_out_images, bound, timeout, chosen, device)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How many processes a run uses, and where: accelerate's launcher settings (``accelerate launch --help``).

    ``processes`` is the total over every machine (accelerate's ``--num_processes``): 2 machines of 4 GPUs are
    ``Launch(processes=8, num_machines=2, machine_rank=R, main_process_ip="10.0.0.1")``, and the same call runs on
    each machine with its own ``machine_rank``. ``config_file`` is an accelerate config file (``accelerate config``);
    the fields given here override its values, as accelerate's own flags do."""

    processes: int | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    config_file: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        values: dict[str, Any] = {}
        if self.config_file is not None:
            path = Path(self.config_file).expanduser().absolute()
            object.__setattr__(self, "config_file", path)
            values = _accelerate_config(path, problems)
        for name, default in (("processes", 1), ("num_machines", 1), ("machine_rank", 0)):
            value = getattr(self, name)
            if value is None:
                value = values.get({"processes": "num_processes"}.get(name, name), default)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"`{name}` must be a whole number, got {value!r}")
                value = default
            object.__setattr__(self, name, value)
        for name in ("main_process_ip", "main_process_port"):
            if getattr(self, name) is None and values.get(name) is not None:
                object.__setattr__(self, name, values[name])
        if self.processes < 1:
            problems.append(f"`processes` must be at least 1, got {self.processes}")
        if self.num_machines < 1:
            problems.append(f"`num_machines` must be at least 1, got {self.num_machines}")
        elif self.processes % self.num_machines:
            problems.append(
                f"`processes` is the total over every machine (accelerate's --num_processes): {self.processes} "
                f"processes cannot be split evenly over {self.num_machines} machines; use a multiple of "
                f"{self.num_machines}, e.g. {self.num_machines * -(-self.processes // self.num_machines)}"
            )
        if not 0 <= self.machine_rank < max(1, self.num_machines):
            problems.append(
                f"`machine_rank` must be 0 to {self.num_machines - 1} for {self.num_machines} machine(s), got "
                f"{self.machine_rank}; the main machine (rank 0's) is machine_rank 0"
            )
        if self.num_machines > 1 and not self.main_process_ip:
            problems.append(
                f"{self.num_machines} machines need `main_process_ip`: the address of machine_rank 0, which every "
                f"machine can reach (e.g. main_process_ip = '10.0.0.1')"
            )
        port = self.main_process_port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536):
            problems.append(f"`main_process_port` must be a port number (0-65535), got {port!r}")
        if problems:
            raise ConfigError(problems, source="launch")

    @property
    def world_size(self) -> int:
        """Processes over every machine: the number sd-scripts divides an epoch's batches by."""
        return int(self.processes)  # type: ignore[arg-type]

    @property
    def local_processes(self) -> int:
        """Processes on this machine."""
        return self.world_size // int(self.num_machines)  # type: ignore[arg-type]

    @property
    def main_machine(self) -> bool:
        """Whether this machine has rank 0: it writes the LoRA files and the run's records."""
        return self.machine_rank == 0

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1

    def flags(self, mixed_precision: str) -> list[str]:
        """``accelerate launch`` options for this launch, the device policy's mixed precision included."""
        flags = ["--config_file", str(self.config_file)] if self.config_file is not None else []
        flags += ["--num_processes", str(self.processes), "--num_machines", str(self.num_machines)]
        if self.num_machines > 1:  # type: ignore[operator]
            flags += ["--machine_rank", str(self.machine_rank), "--main_process_ip", str(self.main_process_ip)]
            flags += ["--main_process_port", str(self.main_process_port or 29500)]
        else:  # one machine: a free port, so two runs on one machine never collide
            flags += ["--main_process_port", str(self.main_process_port or free_port())]
        # DDP through torchrun: accelerate's --cpu would start one process (or mpirun); the CPU is forced by
        # ACCELERATE_USE_CPU in the environment instead (run_environment), which makes it gloo (MULTI_CPU)
        flags += ["--multi_gpu", "--mixed_precision", mixed_precision]
        if self.config_file is None:
            flags += ["--dynamo_backend", "no"]
        return flags


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of a one-machine run; accelerate's port 0 does not
    reach torchrun's store: the workers wait on port 0 for ever)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_launch(processes: int | None, launch: Launch | None) -> Launch:
    """``train()``'s ``processes`` and ``launch`` as one :class:`Launch` (``processes=N`` is ``Launch(N)``)."""
    if launch is None:
        return Launch(processes=1 if processes is None else processes)
    if processes is not None and processes != launch.processes:
        raise ConfigError(
            f"`processes` {processes} and `launch.processes` {launch.processes} disagree; give one of them",
            source="launch",
        )
    if not isinstance(launch, Launch):
        raise ConfigError(f"`launch` must be a spyke_lora.Launch, got {type(launch).__name__}", source="launch")
    return launch


def _accelerate_config(path: Path, problems: list[str]) -> dict[str, Any]:
    """The launcher settings of an accelerate config file (YAML or JSON), or {} with a problem noted."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        problems.append(f"`config_file` {str(path)!r} cannot be read as an accelerate config file: {e}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"`config_file` {str(path)!r} is not an accelerate config file (no settings in it)")
        return {}
    return data


def launch_command(launch: Launch, mixed_precision: str, script: list[str]) -> list[str]:
    """The launcher's command line: this Python running accelerate's launcher (``accelerate launch``) on ``script``
    (e.g. ``["-m", "spyke_lora._engine._worker"]``, or sd-scripts' ``train_network.py`` and its arguments)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launch.flags(mixed_precision), *script]


def worker_environment(address: tuple[str, int], key: bytes, spec: Path, run_env: dict[str, str]) -> dict[str, str]:
    """The workers' environment: the caller's, the device's variables, and where to reach the caller."""
    env = dict(os.environ)
    env.update(run_env)
    env[CHANNEL_ENV] = f"{address[0]}:{address[1]}"
    env[KEY_ENV] = key.hex()
    env[SPEC_ENV] = str(spec)
    env.setdefault("PYTHONUNBUFFERED", "1")  # a worker's last lines reach its log before it dies
    return env


def cpu_threads(run_env: dict[str, str], local_processes: int) -> dict[str, str]:
    """On the CPU, the machine's cores shared between its processes (torchrun sets OMP_NUM_THREADS=1 otherwise:
    1 thread per process); a value the caller set is kept."""
    if run_env.get("ACCELERATE_USE_CPU") != "true" or "OMP_NUM_THREADS" in os.environ:
        return run_env
    return dict(run_env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // local_processes)))


@dataclasses.dataclass
class _Worker:
    rank: int
    local_rank: int
    pid: int
    conn: Connection
    log: Path
    last: tuple[Any, ...] | None = None  # its last word: ("done", ...), ("error", ...)
    said_at: float | None = None  # when it said it
    closed_at: float | None = None


def run_processes(
    cfg: TrainConfig,
    launch: Launch,
    mixed_precision: str,
    run_env: dict[str, str],
    spec: dict[str, Any],
    emit: Callable[[Event], None],
    stop_requested: Callable[[], bool],
) -> Outcome:
    """Start the launcher for ``launch`` on this machine and drive its workers: every event of this machine's first
    worker goes to ``emit`` in order, and its answer (``stop_requested()`` afterwards) goes back, to be shared by
    every rank. Returns when every worker has ended; raises the workers' error, :class:`WorkerFailed` when one died,
    a callback's exception once the workers have stopped, and ``KeyboardInterrupt`` after a Ctrl-C (the first stops
    every rank after the current step, the second ends the workers at once)."""
    key = secrets.token_bytes(32)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spyke-lora-launch-")))
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(dict(spec, caller=os.getpid())), encoding="utf-8")
        listener = Listener(("127.0.0.1", 0), authkey=key)
        stack.callback(listener.close)
        env = worker_environment(listener.address, key, spec_path, cpu_threads(run_env, launch.local_processes))
        launch_log = cfg.output_dir / f"{cfg.output_name}.launch.log"
        command = launch_command(launch, mixed_precision, ["-m", WORKER_MODULE])
        with open(launch_log, "wb") as out:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=os.getcwd(),
            )
        driver = _Driver(process, listener, launch, launch_log, emit, stop_requested)
        stack.callback(driver.end_all)
        return driver.drive()


class _Driver:
    """The caller's side of a multi-process run: accepts the workers, relays events and answers, watches for ends."""

    def __init__(
        self,
        process: subprocess.Popen,
        listener: Listener,
        launch: Launch,
        launch_log: Path,
        emit: Callable[[Event], None],
        stop_requested: Callable[[], bool],
    ) -> None:
        self.process = process
        self.launch = launch
        self.launch_log = launch_log
        self.emit = emit
        self.stop_requested = stop_requested
        self.arrivals: queue.Queue[Connection] = queue.Queue()
        self.pending: list[Connection] = []  # accepted, not said hello yet
        self.workers: dict[int, _Worker] = {}  # by rank
        self.by_conn: dict[int, _Worker] = {}
        self.died: list[_Worker] = []  # in the order their connections closed without a last word
        self.interrupts = 0
        self.callback_error: BaseException | None = None
        self.ended_at: float | None = None
        self.last_step = 0
        threading.Thread(target=self._accept, args=(listener,), name="spyke-lora-accept", daemon=True).start()

    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                self.arrivals.put(listener.accept())
            except (OSError, EOFError):  # the listener was closed: the run is over
                return
            except Exception:  # noqa: BLE001 - a connection that failed authentication: not one of ours
                continue

    def drive(self) -> Outcome:
        while True:
            try:
                if self._turn():
                    break
            except KeyboardInterrupt:
                self._interrupted()
        return self._result()

    def end_all(self) -> None:
        """End the launcher and every worker now (:func:`end_processes`)."""
        end_processes(self.process, [w.pid for w in self.workers.values()])

    def _interrupted(self) -> None:
        """A Ctrl-C in the caller: the first stops every rank after the current step, the second ends them now."""
        self.interrupts += 1
        if self.interrupts > 1:
            self.end_all()
            raise KeyboardInterrupt
        print(
            "\nspyke-lora: stopping every rank after this step (Ctrl-C again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def _turn(self) -> bool:
        """One wait for messages; True when the run is over (every worker ended, or the launcher has ended)."""
        while not self.arrivals.empty():
            self.pending.append(self.arrivals.get())
        conns = self.pending + [w.conn for w in self.workers.values() if w.closed_at is None]
        if conns:
            for conn in wait(conns, timeout=0.2):
                self._read(conn)  # type: ignore[arg-type]
        else:  # no worker has connected yet: wait for one (never spin: the workers need the cores to start)
            with contextlib.suppress(queue.Empty):
                self.pending.append(self.arrivals.get(timeout=0.2))
        if self.process.poll() is not None and self.ended_at is None:
            self.ended_at = time.monotonic()
        open_workers = [w for w in self.workers.values() if w.closed_at is None]
        if self.ended_at is not None:
            # the launcher is gone: its workers are too, or will be in a moment
            return not open_workers or time.monotonic() - self.ended_at > _ENDING_GRACE_S
        if self.died and time.monotonic() - (self.died[0].closed_at or 0) > _ENDING_GRACE_S:
            self.end_all()  # a worker died and the launcher did not end the others: do it
        return False

    def _read(self, conn: Connection) -> None:
        worker = self.by_conn.get(id(conn))
        try:
            message = conn.recv()
        except (EOFError, OSError):
            if worker is None:
                self.pending.remove(conn)
                return
            worker.closed_at = time.monotonic()
            if worker.last is None:
                self.died.append(worker)
            return
        kind = message[0]
        if kind == "hello":
            _, rank, local_rank, pid, log = message
            worker = _Worker(rank, local_rank, pid, conn, Path(log))
            self.pending.remove(conn)
            self.workers[rank] = worker
            self.by_conn[id(conn)] = worker
        elif kind == "event":
            self._deliver(conn, message[1])
        elif worker is not None:
            worker.last, worker.said_at = message, time.monotonic()

    def _deliver(self, conn: Connection, event: Event) -> None:
        step = getattr(event, "step", None)
        if isinstance(step, int):
            self.last_step = step
        if self.callback_error is None:
            try:
                self.emit(event)
            except KeyboardInterrupt:
                self._interrupted()
            except BaseException as e:  # noqa: BLE001 - the caller's own: raised once every rank has stopped
                self.callback_error = e
        stop = self.interrupts > 0 or (self.callback_error is None and self.stop_requested())
        try:
            conn.send((stop, self.callback_error is not None))
        except (OSError, EOFError):
            pass  # the worker is gone; its end is read from its connection

    def _result(self) -> Outcome:
        if self.callback_error is not None:
            raise self.callback_error
        reporter = min((w for w in self.workers.values()), key=lambda w: w.rank, default=None)
        # what went wrong first: a worker's error (the others are then ended by the launcher, some without a word),
        # or a worker's death (the others' errors are then its consequence: a collective with a dead peer)
        troubles = sorted(
            [(w.said_at or 0.0, w.rank, w) for w in self.workers.values() if w.last and w.last[0] == "error"]
            + [(w.closed_at or 0.0, w.rank, None) for w in self.died],
            key=lambda t: (t[0], t[1]),
        )
        if troubles:
            first = troubles[0][2]
            raise _rebuild(first) if first is not None else self._failure()
        if reporter is None or reporter.last is None or self.process.returncode not in (0, None):
            raise self._failure()
        if self.interrupts:
            raise KeyboardInterrupt
        _, steps, final, stopped, peak = reporter.last
        return Outcome(int(steps), Path(final) if final else None, bool(stopped), peak)

    def _failure(self) -> WorkerFailed:
        """The error for a run whose worker died (or that never started): the rank that failed first, how, and its
        last lines of output."""
        cause = _root_cause(_tail(self.launch_log, 200))
        rank = cause.get("rank")
        if self.died and (rank is None or rank not in {w.rank for w in self.died}):
            rank, cause = self.died[0].rank, {}
        worker = self.workers.get(rank) if rank is not None else None
        how = cause.get("how") or ("ended without a word" if worker is not None else "")
        if worker is not None and worker.log.is_file():
            log, lines = worker.log, _tail(worker.log, _LAST_LINES)
        else:
            log, lines = self.launch_log, _tail(self.launch_log, _LAST_LINES)
        who = (
            f"worker rank {rank}" + (f" (pid {worker.pid})" if worker is not None else "")
            if rank is not None
            else ("the launcher")
        )
        started = f"after step {self.last_step}" if self.last_step else "before the first step"
        never = "" if self.workers else f"; no worker reached the caller (exit code {self.process.returncode})"
        message = (
            f"{who} {how or 'failed'} {started}{never}; every rank was stopped. Files written before are intact. "
            f"Its last lines ({log}):\n" + "\n".join(f"  {line}" for line in lines)
        )
        return WorkerFailed(message, rank=rank, lines=tuple(lines), log=str(log))


def _rebuild(worker: _Worker) -> SpykeLoraError:
    """A worker's error, as the class it raised (its message says which rank)."""
    _, name, message, extra = worker.last  # type: ignore[misc]
    where = f" (on rank {worker.rank})" if worker.rank else ""
    if name == "NonFiniteLoss":
        return NonFiniteLoss(message + where, step=extra["step"], loss=extra["loss"])
    if name == "ConfigError":
        return ConfigError([p + where for p in extra.get("problems", [message])], source=extra.get("source"))
    return _ERRORS.get(name, TrainingError)(message + where)


_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)(?:.*?traceback\s*:\s*([^\n]*))?", re.S
)


def _root_cause(lines: list[str]) -> dict[str, Any]:
    """torchrun's summary of a failed launch ("Root Cause (first observed failure): ... rank: 1 ... exitcode: -9"):
    the rank and how it ended, or {}."""
    match = _ROOT_CAUSE.search("\n".join(lines))
    if match is None:
        return {}
    code = int(match.group(2))
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return {"rank": int(match.group(1)), "how": how}


def _tail(path: Path, count: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-count:]


def end_processes(process: subprocess.Popen, worker_pids: Sequence[int] = (), grace: float = 10.0) -> None:
    """End the launcher and every worker, however the run ended: none may be left.

    The launcher runs in a session of its own, so its process group is signalled (SIGTERM, then SIGKILL after
    ``grace`` seconds). That does not reach torchrun's workers: its elastic agent starts each in a session of its
    own (``start_new_session=True`` in torch's ``SubprocessHandler``). So every worker is also ended by its own pid,
    those that said hello (``worker_pids``) and every process below the launcher found before it is signalled (a
    worker still starting): SIGTERM, and SIGKILL for any still alive ``grace`` seconds later (one that ignores
    SIGTERM).

    Args:
        process: The launcher.
        worker_pids: The workers' pids, as they said hello.
        grace: Seconds to wait after SIGTERM before SIGKILL.
    """
    import psutil

    workers = _alive([*worker_pids, *_descendants(process.pid)])
    if process.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=grace if sig == signal.SIGTERM else 5.0)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything left in the launcher's group
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.terminate()
    _, alive = psutil.wait_procs(workers, timeout=grace)
    for worker in alive:
        with contextlib.suppress(psutil.Error):
            worker.kill()
    psutil.wait_procs(alive, timeout=5.0)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (none when it is gone)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _alive(pids: Sequence[int]) -> list[Any]:
    """``psutil.Process`` handles of the pids still running (a handle checks the process's start time, so a pid
    reused by another process later is never signalled)."""
    import psutil

    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found[pid] = psutil.Process(pid)
    return list(found.values())
