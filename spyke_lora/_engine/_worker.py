"""One worker of a multi-process run: ``python -m spyke_lora._engine._worker``, started on every rank by accelerate's
launcher (``spyke_lora._launch``), which sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.

It runs the same in-process engine as ``train()`` (:func:`._run.run`) with a :class:`~._ranks.RankSync`. It sends
its output to its rank's log file, says hello to the caller (rank, pid, log) and keeps that connection open until
its last word: ``("done", steps, final_path, stopped, peak_bytes)``, ``("aborted",)`` or ``("error", class name,
message, details)``. The machine's first worker (``LOCAL_RANK`` 0) also sends every event and waits for the caller's
answer (stop, abort).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from ._channel import CHANNEL_ENV, KEY_ENV, SPEC_ENV


def main() -> int:
    spec: dict[str, Any] = json.loads(Path(os.environ[SPEC_ENV]).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    log = Path(spec["logs"][rank])
    _output_to(log, append=spec["resume"] is not None)
    host, port = os.environ[CHANNEL_ENV].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[KEY_ENV]))
    conn.send(("hello", rank, local_rank, os.getpid(), str(log)))
    threading.Thread(target=_end_with, args=(int(spec["caller"]),), name="spyke-lora-caller", daemon=True).start()

    from .._config import TrainConfig
    from .._errors import ConfigError, NonFiniteLoss, SpykeLoraError
    from .._memory import PeakMeter
    from ._argv import device_choice
    from ._context import RunContext
    from ._ranks import AbortRun, RankSync
    from ._run import run
    from ._state import read_state

    # this process is the library's own, not the caller's: sd-scripts' log lines go to the rank's log
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    ranks = RankSync(world_size, rank)
    reports = local_rank == 0

    def emit(event: Any) -> None:
        if reports:
            conn.send(("event", event))
            stop, abort = conn.recv()
            ranks.answer(stop, abort)

    try:
        cfg = TrainConfig.from_dict(spec["config"])
        choice = device_choice(cfg)
        if choice.device != spec["device"]:
            raise SpykeLoraError(
                f"rank {rank} would train on {choice.device}, but its caller planned the run for {spec['device']}: "
                f"check that the workers see the same devices as the caller (CUDA_VISIBLE_DEVICES)"
            )
        state = read_state(Path(spec["resume"])) if spec["resume"] else None
        started_at = time.perf_counter() - (time.time() - float(spec["started"]))
        meter = PeakMeter(choice.device)
        meter.start()
        try:
            outcome = run(RunContext(cfg, choice, emit, ranks.stop_requested, started_at, state, None, ranks))
        finally:
            meter.close()
        final = str(outcome.final_path) if outcome.final_path is not None else None
        conn.send(("done", outcome.steps, final, outcome.stopped, meter.peak()))
        return 0
    except AbortRun:
        conn.send(("aborted",))
        return 0
    except NonFiniteLoss as e:
        conn.send(("error", "NonFiniteLoss", str(e), {"step": e.step, "loss": e.loss}))
    except ConfigError as e:
        traceback.print_exc()
        conn.send(("error", "ConfigError", str(e), {"problems": list(e.problems), "source": e.source}))
    except SpykeLoraError as e:
        traceback.print_exc()
        conn.send(("error", type(e).__name__, str(e), {}))
    except BaseException as e:  # noqa: BLE001 - reported to the caller, whatever it is
        traceback.print_exc()
        conn.send(("error", "TrainingError", f"{type(e).__name__}: {e}", {}))
    return 1


def _end_with(caller: int) -> None:
    """End this worker when the caller's process is gone (killed: it could not end its workers itself); the
    launcher then ends the other ranks."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(caller, 0)
        except ProcessLookupError:
            print(f"spyke-lora: the caller (pid {caller}) is gone; ending this worker", flush=True)
            os._exit(3)
        except PermissionError:  # alive, another user's: cannot be ours, but it exists
            pass


def _output_to(log: Path, *, append: bool) -> None:
    """Everything this process writes (Python, C, sd-scripts' progress bars) goes to ``log`` from now on."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
