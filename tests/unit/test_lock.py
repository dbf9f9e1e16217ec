"""One run per output: an operating-system lock that names its live owner and dies with its process."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spyke_lora import ConfigError, OutputInUse, TrainConfig
from spyke_lora._lock import lock_path, output_in_use, output_lock

# Takes the output's lock with spyke-lora in another process, says so, and holds it until killed.
HOLDER = """
import socket, sys, time
from pathlib import Path
from spyke_lora import TrainConfig
from spyke_lora._lock import output_lock
out, name = Path(sys.argv[1]), sys.argv[2]
if len(sys.argv) > 3:
    socket.gethostname = lambda: sys.argv[3]  # the name the machine had then
cfg = TrainConfig(base_model=out / "m.safetensors", train_dir=out / "1_x", output_dir=out, output_name=name)
with output_lock(cfg):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(output_dir: Path, name: str, host: str | None = None):
    """A live process holding the lock of ``output_dir``/``name``; killed with SIGKILL at the end of the block."""
    argv = [sys.executable, "-c", HOLDER, str(output_dir), name] + ([host] if host else [])
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def killed_holder(output_dir: Path, name: str, host: str | None = None) -> int:
    """Take the lock in another process, then SIGKILL it (nothing of its own clean-up runs); its pid."""
    with held_by_another_process(output_dir, name, host) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert holder.returncode == -signal.SIGKILL
        return holder.pid


@pytest.fixture
def cfg(tmp_path):
    return TrainConfig(
        base_model=tmp_path / "m.safetensors",
        train_dir=tmp_path / "1_x",
        output_dir=tmp_path / "out",
        output_name="spyke",
    )


def test_the_lock_is_held_for_the_block_and_released(cfg):
    with output_lock(cfg) as path:
        assert path == cfg.output_dir / ".spyke.lock" and path.is_file()
        assert output_in_use(cfg) and output_in_use(cfg.output_dir, "spyke")
        with pytest.raises(OutputInUse, match="another run is writing `spyke`"), output_lock(cfg):
            pass  # the same output again, from this process
    assert not output_in_use(cfg)
    with output_lock(cfg):  # free again at once
        pass


def test_another_thread_of_this_process_is_refused(cfg):
    refused = []

    def second() -> None:
        try:
            with output_lock(cfg):
                pass
        except OutputInUse as e:
            refused.append(str(e))

    with output_lock(cfg):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(10)
    assert len(refused) == 1 and f"process {os.getpid()} on {socket.gethostname()}, started " in refused[0]


def test_a_live_owner_is_named(cfg):
    cfg.output_dir.mkdir()
    with (
        held_by_another_process(cfg.output_dir, "spyke") as holder,
        pytest.raises(OutputInUse) as info,
        output_lock(cfg),
    ):
        pass
    message = str(info.value)
    assert message.startswith(
        f"another run is writing `spyke` in {cfg.output_dir}: process {holder.pid} on {socket.gethostname()}, started "
    )
    assert message.endswith(
        f"(lock {lock_path(cfg)}); wait for it to end, stop it, or choose another output_name or output_dir"
    )


def test_a_sigkilled_owners_lock_is_free_at_once(cfg):
    cfg.output_dir.mkdir()
    dead = killed_holder(cfg.output_dir, "spyke")
    assert lock_path(cfg).exists() and not output_in_use(cfg)
    with output_lock(cfg) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid() != dead


def test_a_lock_being_set_up_is_not_taken_for_a_dead_one(cfg):
    """Bug 1: a lock file another process has just created, before it wrote its owner into it, is held all the same:
    it is not deleted nor taken, and the message says the owner is not known yet instead of inventing one."""
    cfg.output_dir.mkdir()
    path = lock_path(cfg)
    # what any holder looks like between taking the lock and writing its owner: an empty file under its lock
    script = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        inode = path.stat().st_ino
        with pytest.raises(OutputInUse) as info, output_lock(cfg):
            pass
        assert path.stat().st_ino == inode and path.read_text() == ""  # left as it was
        message = str(info.value)
        assert "process None" not in message and "not written" in message and f"(lock {path})" in message
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_two_takeovers_of_a_stale_lock_never_both_win(cfg, monkeypatch):
    """Bug 2: two runs find the lock a killed run left at the same moment; exactly one of them gets the output.
    The second run is let in at the worst time for a PID-file lock: while the first reads the stale lock file."""
    cfg.output_dir.mkdir()
    killed_holder(cfg.output_dir, "spyke")
    held = contextlib.ExitStack()
    winners: list[str] = []
    tried: list[str] = []

    def attempt(who: str) -> None:
        tried.append(who)
        try:
            held.enter_context(output_lock(cfg))
            winners.append(who)
        except OutputInUse:
            pass

    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        text = real_read_text(self, *args, **kwargs)
        if self == lock_path(cfg) and "second" not in tried:
            attempt("second")  # the other run takes over between this run's look at the lock and its next step
        return text

    monkeypatch.setattr(Path, "read_text", read_text)
    with held:
        attempt("first")
        if "second" not in tried:
            attempt("second")
        assert len(winners) == 1


def test_a_lock_from_before_a_hostname_change_is_free(cfg):
    """Bug 3: a run killed while the machine had another name (a Mac renamed by its network) does not hold the
    output forever."""
    cfg.output_dir.mkdir()
    killed_holder(cfg.output_dir, "spyke", host="old-name-of-this-mac.local")
    assert json.loads(lock_path(cfg).read_text())["host"] == "old-name-of-this-mac.local"
    with output_lock(cfg) as path:
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_the_released_lock_file_stays_empty_and_means_nothing(cfg, tmp_path):
    from spyke_lora._engine import existing_outputs

    with output_lock(cfg) as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
    assert path.read_text() == ""  # kept (see the module's docstring), its owner cleared
    assert existing_outputs(cfg) == [] and not output_in_use(cfg)
    assert not output_in_use(tmp_path / "nowhere", "spyke") and not (tmp_path / "nowhere").exists()


def test_a_filesystem_without_file_locks_is_refused_clearly(cfg, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):  # what flock(2) says on such a filesystem (some FUSE and network mounts)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(ConfigError, match=r"`output_dir` .* is on a filesystem without file locks"), output_lock(cfg):
        pass
