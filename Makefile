# spyke-lora: `make demo` and `make test` are all a new user needs; both run `make setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ENGINE := vendor/sd-scripts/train_network.py
PINNED := ae72efb92babe89ff8e70f057e42db68440e8d61
STAMP := $(VENV)/.spyke-lora-installed
# MKL (torch's BLAS on x86) gives bit-reproducible results only in its strict mode: the tests compare runs bit for bit
export MKL_CBWR ?= AUTO,STRICT

.PHONY: setup demo test test-unit test-integration test-mps test-gpu lint clean

setup: $(STAMP) $(ENGINE)  ## venv + sd-scripts submodule + dependencies; idempotent (seconds when done)
	@$(PY) -c "import spyke_lora, sys; print('spyke-lora', spyke_lora.__version__, 'ready on Python', sys.version.split()[0])"

$(VENV)/bin/python:
	@$(PYTHON) -c "import sys; assert sys.version_info >= (3, 10), 'spyke-lora needs Python >= 3.10, found ' + sys.version.split()[0]"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# A local sd-scripts mirror lacks three large files nobody uses (bitsandbytes_windows/*.dll,
# configs/qwen3_06b/tokenizer.json), so `git submodule update` may exit non-zero while every file spyke-lora
# needs is checked out at the pinned commit: success is judged by that, not by the exit code.
$(ENGINE):
	-git submodule update --init vendor/sd-scripts
	@test -f $(ENGINE) || { echo "sd-scripts is missing: run 'git submodule update --init vendor/sd-scripts' (needs access to github.com/kohya-ss/sd-scripts)"; exit 1; }
	@test "$$(git -C vendor/sd-scripts rev-parse HEAD)" = "$(PINNED)" || { echo "vendor/sd-scripts is not at the pinned v0.10.1 ($(PINNED))"; exit 1; }

demo: setup  ## train 5 steps on a tiny local model and print device, losses and checkpoints
	$(VENV)/bin/spyke-lora demo --dir demo-output

test: setup  ## every test: unit, then integration on the tiny local model
	$(PY) -m pytest tests/unit -q
	$(PY) -m pytest tests/integration -q --durations=5

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-integration: setup
	$(PY) -m pytest tests/integration -q --durations=5

# SPYKE_LORA_REQUIRE_DEVICE makes a missing device an error (tests/device/conftest.py), where a plain `pytest`
# skips these tests: on the wrong machine these two targets fail instead of passing with everything skipped.
test-mps: setup  ## on an Apple Silicon Mac only
	SPYKE_LORA_REQUIRE_DEVICE=mps $(PY) -m pytest tests/device -q -rs -m mps

test-gpu: setup  ## on a CUDA machine only
	SPYKE_LORA_REQUIRE_DEVICE=gpu $(PY) -m pytest tests/device -q -rs -m gpu

LINTED := spyke_lora tests benchmarks examples

lint: setup  ## ruff check and ruff format --check, then the import contracts ([tool.importlinter] in pyproject.toml)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports

clean:
	rm -rf demo-output .pytest_cache
