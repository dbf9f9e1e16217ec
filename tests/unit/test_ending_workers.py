"""After any end of a multi-process run no worker is left: torchrun starts its workers in sessions of their own, so
the launcher's process group does not hold them, and a worker that ignores SIGTERM still ends."""

import subprocess
import sys
import time

import psutil
import pytest

from spyke_lora._launch import end_processes

# A stand-in for torchrun: it starts a "worker" in a session of its own (as torch's SubprocessHandler does) that
# ignores SIGTERM, prints the worker's pid, then waits (or, with "exit", leaves the worker behind at once).
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True,
)
print(worker.pid, flush=True)
if sys.argv[1] == "wait":
    time.sleep(600)
"""


def _launch(mode: str) -> tuple[subprocess.Popen, int]:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, mode], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    worker = int(launcher.stdout.readline())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the worker has installed its SIGTERM handler
        if any("signal" in part for part in psutil.Process(worker).cmdline()):
            time.sleep(0.5)
            break
    return launcher, worker


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("said_hello", [True, False], ids=["worker known by its hello", "worker still starting"])
def test_a_worker_in_its_own_session_that_ignores_sigterm_is_ended(said_hello):
    launcher, worker = _launch("wait")
    try:
        end_processes(launcher, [worker] if said_hello else [], grace=1.0)
        assert launcher.poll() is not None
        assert _gone(worker)
    finally:
        if not _gone(worker):
            psutil.Process(worker).kill()


def test_a_worker_left_behind_by_a_launcher_that_already_ended_is_ended():
    launcher, worker = _launch("exit")
    launcher.wait(timeout=30)
    try:
        assert not _gone(worker)  # the group signal alone would have missed it: it is in its own session
        end_processes(launcher, [worker], grace=1.0)
        assert _gone(worker)
    finally:
        if not _gone(worker):
            psutil.Process(worker).kill()
