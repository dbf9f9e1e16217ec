"""One run per output: the lock names a live owner and is taken over from a dead one."""

import json
import socket
import subprocess
import sys

import pytest

from spyke_lora import OutputInUse, TrainConfig
from spyke_lora._lock import lock_path, output_lock


@pytest.fixture
def cfg(tmp_path):
    return TrainConfig(base_model=tmp_path / "m.safetensors", train_dir=tmp_path / "1_x", output_dir=tmp_path / "out",
                       output_name="spyke")  # fmt: skip


def hold(cfg, pid, host=None):
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    lock_path(cfg).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))


def test_the_lock_is_held_for_the_block_and_released(cfg):
    with output_lock(cfg) as path:
        assert path == cfg.output_dir / ".spyke.lock" and path.is_file()
        with pytest.raises(OutputInUse, match="another run is writing `spyke`"):
            with output_lock(cfg):  # the same output again, from this (live) process
                pass
    assert not path.exists()


def test_a_live_owner_is_named(cfg):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        hold(cfg, sleeper.pid)
        with pytest.raises(OutputInUse) as info:
            with output_lock(cfg):
                pass
        assert f"process {sleeper.pid} on {socket.gethostname()}, started earlier" in str(info.value)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_owners_lock_is_taken_over(cfg):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    hold(cfg, int(finished.stdout))  # that process has exited: a crash or a kill left its lock
    with output_lock(cfg) as path:
        assert json.loads(path.read_text())["pid"] != int(finished.stdout)


def test_another_hosts_lock_is_respected(cfg):
    hold(cfg, 1, host="some-other-machine")
    with pytest.raises(OutputInUse, match="on some-other-machine"):
        with output_lock(cfg):
            pass
