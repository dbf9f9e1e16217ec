"""Multi-process runs without the engine: Launch's checks and flags, plan()'s step math for a world size, MPS
refused, and the caller's side of the protocol driven by fake workers (real processes, real sockets)."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from multiprocessing.connection import Listener
from pathlib import Path

import pytest

from spyke_lora import ConfigError, Launch, MemoryBudget, NonFiniteLoss, TrainingError, WorkerFailed, plan
from spyke_lora._device import visible_gpus
from spyke_lora._launch import (
    _Driver,
    _root_cause,
    alone_on_rank_zero,
    launch_command,
    resolve_launch,
    worker_environment,
)
from spyke_lora.events import StepEnded

from .conftest import CUDA_BOX, MPS_MAC


def test_a_launch_is_one_process_unless_asked():
    one = Launch()
    assert (one.world_size, one.local_processes, one.main_machine, one.multi_process) == (1, 1, True, False)
    assert resolve_launch(None, None) == one
    assert resolve_launch(4, None).world_size == 4
    with pytest.raises(ConfigError, match="disagree"):
        resolve_launch(2, Launch(processes=4))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"processes": 0}, "`processes` must be at least 1, got 0"),
        ({"processes": "2"}, "`processes` must be a whole number, got '2'"),
        ({"processes": 3, "num_machines": 2, "main_process_ip": "10.0.0.1"}, "cannot be split evenly over 2 machines"),
        ({"processes": 4, "num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "must be 0 to 1"),
        ({"processes": 4, "num_machines": 2}, "2 machines need `main_process_ip`"),
        ({"processes": 2, "main_process_port": 70000}, "must be a port number"),
    ],
)
def test_a_wrong_launch_is_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        Launch(**fields)


def test_an_accelerate_config_file_fills_what_is_not_given(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 8\n"
        "num_machines: 2\nmachine_rank: 1\nmain_process_ip: 10.0.0.1\nmain_process_port: 29600\n"
    )
    launch = Launch(config_file=config)
    assert (launch.world_size, launch.num_machines, launch.machine_rank, launch.local_processes) == (8, 2, 1, 4)
    assert not launch.main_machine
    assert Launch(config_file=config, machine_rank=0).main_machine  # a field given wins, as accelerate's flags do
    flags = launch.flags("bf16")
    assert flags[:2] == ["--config_file", str(config)]
    assert flags[flags.index("--main_process_ip") + 1] == "10.0.0.1"
    assert flags[flags.index("--main_process_port") + 1] == "29600"
    assert "--dynamo_backend" not in flags  # the file's own setting is kept
    (tmp_path / "broken.yaml").write_text("num_processes: [\n")
    with pytest.raises(ConfigError, match="cannot be read as an accelerate config file"):
        Launch(config_file=tmp_path / "broken.yaml")


def test_the_launcher_command_is_accelerate_launch_with_ddp_through_torchrun():
    command = launch_command(Launch(processes=2), "no", ["-m", "spyke_lora._engine._worker"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[-2:] == ["-m", "spyke_lora._engine._worker"]
    # --multi_gpu (torchrun), never --cpu (one process, or mpirun): the CPU comes from ACCELERATE_USE_CPU
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--mixed_precision") + 1] == "no"
    port = int(command[command.index("--main_process_port") + 1])
    assert 0 < port < 65536  # a free port of this machine: accelerate's 0 leaves torchrun's store waiting for ever


def test_plan_counts_steps_for_the_world_size(good):
    cfg = good.replace(max_train_steps=None, max_train_epochs=2, save_every_n_steps=None)
    one, two = plan(cfg), plan(cfg, processes=2)
    assert one.batches_per_epoch == two.batches_per_epoch == 60  # 3 images x 10 repeats, paired with 30 reg
    assert (one.steps_per_epoch, one.total_steps, one.effective_batch) == (60, 120, 1)
    assert (two.steps_per_epoch, two.total_steps, two.effective_batch) == (30, 60, 2)  # ceil(60 / 2) per process
    three = plan(cfg, processes=7)
    assert three.steps_per_epoch == 9  # ceil(60 / 7): accelerate evens the shards out
    assert "processes       2 on 1 machine (2 here, machine_rank 0), started by accelerate launch" in str(two)
    assert "batch 1 per process x 2 processes = 2 images per step; each process takes ceil(60 / 2) = 30" in str(two)
    assert "processes " not in str(one)
    steps = plan(good, processes=2)  # max_train_steps: the same steps, each of 2 images
    assert (steps.total_steps, steps.steps_per_epoch, steps.epochs) == (5, 30, 1)


def test_cpu_processes_share_the_memory_budget(good):
    budget = MemoryBudget(20 * 10**9, "injected")
    one, two = plan(good, memory_budget=budget), plan(good, processes=2, memory_budget=budget)
    assert one.memory.budget_bytes == 20 * 10**9
    assert two.memory.budget_bytes == 10 * 10**9 and "shared by 2 processes" in two.memory.budget_source


def test_several_processes_on_mps_are_refused(good, machine):
    machine(MPS_MAC)
    cfg = good.replace(device="auto")
    assert plan(cfg, memory_budget=MemoryBudget(10**12, "injected")).device == "mps"
    with pytest.raises(ConfigError, match="`processes` 2 on MPS: a Mac has one GPU, and torch.distributed has no"):
        plan(cfg, processes=2)


def test_a_torchrun_failure_summary_names_the_rank():
    summary = textwrap.dedent("""\
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
        ============================================================
        spyke_lora._engine._worker FAILED
        ------------------------------------------------------------
        Root Cause (first observed failure):
        [0]:
          time      : 2026-11-26_04:10:02
          host      : box
          rank      : 1 (local_rank: 1)
          exitcode  : -9 (pid: 4242)
          error_file: <N/A>
          traceback : Signal 9 (SIGKILL) received by PID 4242
        """).splitlines()
    assert _root_cause(summary) == {"rank": 1, "how": "was killed by SIGKILL"}
    assert _root_cause(["rank      : 0", "exitcode  : 1"]) == {}  # not the summary


# A fake launcher: it starts one fake worker per rank, each speaking the workers' protocol to the caller.
_FAKE_WORKER = """
import json, os, sys, time
from multiprocessing.connection import Client
from pathlib import Path
from spyke_lora.events import StepEnded, TrainStarted
rank, plan = int(sys.argv[1]), sys.argv[2]
host, port = os.environ["SPYKE_LORA_CHANNEL"].rsplit(":", 1)
conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["SPYKE_LORA_CHANNEL_KEY"]))
log = Path(os.environ["FAKE_LOGS"]) / f"rank{rank}.log"
log.write_text("".join(f"rank {rank} line {i}\\n" for i in range(30)))
conn.send(("hello", rank, rank, os.getpid(), str(log)))
if plan == "die" and rank == 1:
    time.sleep(0.5)
    os._exit(9)
answers = []
if rank == 0:
    for event in [TrainStarted(3, "cpu", "no", Path("/o"), processes=2)] + [
        StepEnded(s, 3, 1, 0.5, 0.5, 1e-4, None, 0.1) for s in (1, 2, 3)
    ]:
        conn.send(("event", event))
        answers.append(list(conn.recv()))
        if any(answers[-1]):
            break
    (Path(os.environ["FAKE_LOGS"]) / "answers.json").write_text(json.dumps(answers))
if plan == "nan" and rank == 1:
    conn.send(("error", "NonFiniteLoss", "the loss became nan at step 2", {"step": 2, "loss": float("nan")}))
    sys.exit(1)
steps = len(answers) - 1 if rank == 0 else 0
conn.send(("done", steps, None, any(a[0] for a in answers), 1234 if rank == 0 else None))
"""

_FAKE_LAUNCHER = """
import subprocess, sys
worker, plan = sys.argv[1], sys.argv[2]
procs = [subprocess.Popen([sys.executable, worker, str(r), plan]) for r in (0, 1)]
codes = [p.wait() for p in procs]
sys.exit(0 if not any(codes) else 1)
"""


def _drive(tmp_path, plan_name, emit, stop=lambda: False):
    (tmp_path / "worker.py").write_text(_FAKE_WORKER)
    (tmp_path / "launcher.py").write_text(_FAKE_LAUNCHER)
    listener = Listener(("127.0.0.1", 0), authkey=b"k" * 32)
    env = worker_environment(listener.address, b"k" * 32, tmp_path / "spec.json", {"FAKE_LOGS": str(tmp_path)})
    launch_log = tmp_path / "launch.log"
    with open(launch_log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "worker.py"), plan_name],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        return _Driver(process, listener, Launch(processes=2), launch_log, emit, stop).drive()
    finally:
        listener.close()
        process.wait(timeout=30)


def test_rank_0s_events_reach_the_caller_in_order_and_its_stop_goes_back(tmp_path):
    seen = []
    finished = _drive(tmp_path, "ok", seen.append, stop=lambda: len(seen) >= 3)  # after StepEnded(2)
    assert [type(e).__name__ for e in seen] == ["TrainStarted", "StepEnded", "StepEnded"]
    assert [e.step for e in seen[1:]] == [1, 2]
    assert (finished.steps, finished.stopped, finished.peak_memory_bytes) == (2, True, 1234)


def test_a_dead_worker_ends_the_run_with_an_error_naming_it_and_its_last_lines(tmp_path):
    with pytest.raises(WorkerFailed) as failed:
        _drive(tmp_path, "die", lambda event: None)
    error = failed.value
    assert error.rank == 1 and isinstance(error, TrainingError)
    assert error.lines[-1] == "rank 1 line 29" and len(error.lines) == 20
    assert str(error).startswith("worker rank 1 (pid ")
    assert "every rank was stopped" in str(error) and "rank 1 line 29" in str(error)


def test_a_workers_error_is_raised_in_the_caller_as_its_class(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"the loss became nan at step 2 \(on rank 1\)") as failed:
        _drive(tmp_path, "nan", lambda event: None)
    assert failed.value.step == 2


def test_a_callbacks_exception_aborts_every_rank_then_is_raised(tmp_path):
    class Boom(Exception):
        pass

    def explode(event):
        if isinstance(event, StepEnded):
            raise Boom("my callback")

    with pytest.raises(Boom, match="my callback"):
        _drive(tmp_path, "ok", explode)
    # go on after TrainStarted; (stop, abort) = (False, True) after the StepEnded the callback raised on
    assert json.loads((tmp_path / "answers.json").read_text()) == [[False, False], [False, True]]


def test_worker_environment_carries_the_channel_and_the_device(tmp_path):
    env = worker_environment(("127.0.0.1", 4000), b"\x01\x02", Path("/s.json"), {"ACCELERATE_USE_CPU": "true"})
    assert env["SPYKE_LORA_CHANNEL"] == "127.0.0.1:4000" and env["SPYKE_LORA_CHANNEL_KEY"] == "0102"
    assert env["ACCELERATE_USE_CPU"] == "true" and env["SPYKE_LORA_WORKER_SPEC"] == "/s.json"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_a_first_ctrl_c_in_the_caller_stops_every_rank_after_the_step_then_is_raised(tmp_path, capsys):
    def press_ctrl_c(event):
        if isinstance(event, StepEnded):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _drive(tmp_path, "ok", press_ctrl_c)
    # go on after TrainStarted; stop (not abort) after the StepEnded the Ctrl-C came in
    assert json.loads((tmp_path / "answers.json").read_text()) == [[False, False], [True, False]]
    assert "stopping every rank after this step (Ctrl-C again to abort at once)" in capsys.readouterr().err


def test_more_processes_than_visible_gpus_are_refused(good, machine, monkeypatch):
    one_gpu = machine(dataclasses.replace(CUDA_BOX, cuda_devices=1))
    cfg = good.replace(device="cuda", mixed_precision="bf16")
    budget = MemoryBudget(10**12, "injected")
    assert plan(cfg, memory_budget=budget).device == "cuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ConfigError, match=r"puts 2 processes on this machine but torch sees 1 CUDA GPU\(s\) "
                       r"\(CUDA_VISIBLE_DEVICES='0'\).*set processes = 1"):  # fmt: skip
        plan(cfg, processes=2, memory_budget=budget)
    assert one_gpu.cuda_devices == 1
    machine(dataclasses.replace(CUDA_BOX, cuda_devices=2))
    assert plan(cfg, processes=2, memory_budget=budget).total_steps > 0  # one GPU each: fine
    with pytest.raises(ConfigError, match="puts 4 processes on this machine but torch sees 2 CUDA GPU"):
        plan(cfg, processes=4, memory_budget=budget)
    # two machines of 2 processes each: only this machine's share counts
    two_machines = Launch(
        processes=4, num_machines=2, machine_rank=0, main_process_ip="10.0.0.1", main_process_port=29500
    )
    assert plan(cfg, launch=two_machines, memory_budget=budget).total_steps > 0


def test_visible_gpus_counts_what_torch_sees():
    assert visible_gpus(CUDA_BOX) == 1  # not counted: the one device_facts names
    assert visible_gpus(dataclasses.replace(CUDA_BOX, cuda_devices=3)) == 3
    assert visible_gpus(MPS_MAC) == 0


def test_rank_zero_alone_sets_the_collective_timeout_on_cuda_and_says_it_on_the_cpu():
    spyke = alone_on_rank_zero("cuda", samples=9, sample_steps=30, sample_px=512, held_out_images=4)
    assert spyke.bound_s == 9 * 30 * 1.0 + 4 * 1.0 and spyke.ddp_timeout == 30  # 3 x 274 s: under the 30 min floor
    assert "rank 0 samples 9 images and validates 4 held-out images alone after each saved file" in spyke.line()
    assert "the other ranks wait up to 30 min for it (ddp_timeout, set from this plan" in spyke.line()
    long = alone_on_rank_zero("cuda", samples=150, sample_steps=30, sample_px=768, held_out_images=0)
    assert long.bound_s == 150 * 30 * 2.25 and long.ddp_timeout == -(-int(long.bound_s * 3) // 60) == 507
    assert "validates" not in long.line()
    cpu = alone_on_rank_zero("cpu", samples=9, sample_steps=30, sample_px=512, held_out_images=4)
    assert cpu.ddp_timeout is None and "gloo's 30 min" in cpu.line() and "only with several CUDA GPUs" in cpu.line()
    given = alone_on_rank_zero("cuda", samples=150, sample_steps=30, sample_px=768, held_out_images=0, given=60)
    assert given.ddp_timeout is None and "wait up to 60 min (extra_args.ddp_timeout), under 3x" in given.line()
    assert alone_on_rank_zero("cuda", samples=0, sample_steps=30, sample_px=512, held_out_images=0) is None


def test_a_cuda_plan_of_several_processes_passes_the_timeout_to_sd_scripts(good, machine):
    machine(dataclasses.replace(CUDA_BOX, cuda_devices=2))
    cfg = good.replace(
        device="cuda", mixed_precision="bf16", sample_prompts=("a",) * 20, sample_steps=30, sample_size=512
    )
    budget = MemoryBudget(10**12, "injected")
    two = plan(cfg, processes=2, memory_budget=budget)
    minutes = two.alone.ddp_timeout
    assert minutes == max(30, -(-int((20 * len(cfg.sample_cfg_scales) * 30) * 3) // 60))
    assert two.argv[two.argv.index("--ddp_timeout") + 1] == str(minutes)
    assert f"the other ranks wait up to {minutes} min for it (ddp_timeout, set from this plan" in str(two)
    one = plan(cfg, memory_budget=budget)
    assert one.alone is None and "--ddp_timeout" not in one.argv  # one process: the command line is as before
