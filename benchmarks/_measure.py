"""Measures one child process from outside: ``python _measure.py LOG -- CMD...`` prints one JSON object.

It is a fresh process per run, so ``getrusage(RUSAGE_CHILDREN)`` is the peak resident memory of that one child.
The child's stdout and stderr are read as they come and time-stamped; sd-scripts' own progress bar
(``steps:  30%|###  | 3/10 [...]``, the same tqdm bar for the command line and for spyke-lora) gives the moment each
step ended, so time to the first step and seconds per step are read the same way for both sides.
"""

import json
import os
import re
import resource
import subprocess
import sys
import time

STEP = re.compile(rb"steps:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")

log_path, dash, *cmd = sys.argv[1:]
assert dash == "--"
started = time.perf_counter()
child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
seen: dict[int, float] = {}
buffer = b""
with open(log_path, "wb") as log:
    while True:
        chunk = os.read(child.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter() - started
        log.write(chunk)
        buffer = (buffer + chunk)[-4096:]
        for match in STEP.finditer(buffer):
            seen.setdefault(int(match.group(1)), now)
code = child.wait()
wall = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"code": code, "wall_s": wall, "peak_rss_bytes": rss, "step_times": sorted(seen.items())}))
