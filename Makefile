# Two commands on a fresh machine with python3 and the package registry:
#   make demo   -> .venv + the embedded end-to-end demo
#   make test   -> .venv + dev extras + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# torch first, chosen for the machine. Where `nvidia-smi -L` lists a GPU: torch 2.11.0 from the
# CUDA 12.8 index, the newest release built for CUDA 12.8 -- kernels for sm_75 through the RTX
# 5090's sm_120, drivers >= 570. (2.12 and later ship CUDA 12.6 builds, without sm_120, and CUDA 13
# builds, which need driver >= 580: on a 550/570 driver torch would see no GPU. The registry's
# default wheel is such a CUDA 13 build.) Without a GPU: 2.13.0 (on this project's CI machines a
# local CPU build; elsewhere the registry's wheel, which also runs on CPU). CI runs the suite on
# 2.13.0 only. Override with `make TORCH_SPEC='torch==X.Y' PIP_TORCH_ARGS='--index-url URL'`.
HAS_GPU        := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)
TORCH_SPEC     ?= $(if $(HAS_GPU),torch==2.11.0,torch==2.13.0)
PIP_TORCH_ARGS ?= $(if $(HAS_GPU),--index-url https://download.pytorch.org/whl/cu128)

.PHONY: demo test test-fast bench clean-venv

$(VENV)/.base: pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "error: $(PYTHON) cannot create virtual environments; install python3-venv (Debian/Ubuntu: apt install python3-venv) or run make PYTHON=/path/to/python3"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/trainrig demo --output_dir outputs/demo

test: $(VENV)/.dev
	$(PY) -m pytest tests -q -rs

# everything but the multi-process runs, for a quick loop while editing
test-fast: $(VENV)/.dev
	$(PY) -m pytest tests -q -rs -m "not slow"

bench: $(VENV)/.dev
	$(PY) bench/run.py --output bench/RESULTS.md

clean-venv:
	rm -rf $(VENV)
