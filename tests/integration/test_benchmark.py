"""The benchmark (issue 7) in its short mode, so that it cannot rot: every figure is read. Two kinds run (the command
line and the library: the ratio the benchmark is about); the third, `accelerate launch` of one process, is the
command line's own code path, and leaving it out keeps the suite under its time budget."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_in_its_short_mode(tmp_path):
    report = tmp_path / "benchmarks.md"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cli_vs_library.py"),
            "--quick",
            "--work",
            str(tmp_path / "work"),
            "--write",
            str(report),
            "--kinds",
            "command line,library",
        ],
        check=True,
        capture_output=True,
    )
    text = report.read_text()
    assert "### 64 px, batch 1, 3 steps, 1 repetition(s)" in text
    for title in ("seconds per step (progress bar)", "time to first step, s", "wall time, s", "peak RSS, MB"):
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {title} |")]
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 5 and all(re.fullmatch(r"\d+\.\d+", c) for c in cells), row  # 2 kinds + 3 ratios
        # library / command line: the same engine doing the same work. Loose bounds: this checks that the figures
        # are read, not performance (one 3-step run; docs/benchmarks.md has the real numbers)
        assert 0.25 < float(cells[3]) < 4.0, row
