"""Runs one benchmarked training process: ``python _child.py OUT.json (SCRIPT.py | -m MODULE) ARGS...``.

The same prelude for the sd-scripts command line (``train_network.py``) and for spyke-lora (``-m spyke_lora``), so
neither side is measured differently: it records when the process started, polls the device memory on MPS (torch
has no peak counter there), and at exit writes the peak device memory (CUDA: torch's own peak counters) to OUT.json.
Wall time, time to the first step and peak resident memory are measured from outside by ``cli_vs_library.py``.
"""

import atexit
import json
import runpy
import sys
import threading
import time

out, target, *rest = sys.argv[1:]
peak = {"mps_driver_bytes": 0}
stop = threading.Event()


def _poll_mps() -> None:  # a thread only once torch is imported and MPS is in use
    while not stop.wait(0.05):
        torch = sys.modules.get("torch")
        if torch is not None and torch.backends.mps.is_available():
            peak["mps_driver_bytes"] = max(peak["mps_driver_bytes"], torch.mps.driver_allocated_memory())


def _report() -> None:
    stop.set()
    torch = sys.modules.get("torch")
    result = {"started": START, "ended": time.time()}
    if torch is not None and torch.cuda.is_available():
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if peak["mps_driver_bytes"]:
        result["mps_driver_bytes"] = peak["mps_driver_bytes"]
    with open(out, "w") as f:
        json.dump(result, f)


START = time.time()
atexit.register(_report)
if sys.platform == "darwin":
    threading.Thread(target=_poll_mps, daemon=True).start()
if target == "-m":
    module, *rest = rest
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, *rest]
    sys.path.insert(0, str(__import__("pathlib").Path(target).parent))
    runpy.run_path(target, run_name="__main__")
