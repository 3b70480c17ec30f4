# Two commands set everything up on a fresh machine and run:
#   make demo   # builds the synthetic dataset, shards and prompt bank; trains; evaluates
#   make test   # the test suite (CPU), with the local LLM server and SLURM cluster it needs
# Everything is installed by these rules: system packages (apt, when root and missing),
# the Python environment in .venv (exact versions from requirements.lock).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SYS_PKGS := ffmpeg g++ make
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo demo-pretrain test test-fast sysdeps venv test-deps llm slurm-up slurm-down bench gpu-check clean

demo: sysdeps venv
	OMP_NUM_THREADS=1 $(PY) -m tools.demo

# Video-text pretraining on captioned synthetic clips: KMT vs frame mean at retrieval R@1.
demo-pretrain: sysdeps venv
	OMP_NUM_THREADS=1 $(PY) -m tools.demo_pretrain

test: sysdeps venv test-deps
	$(PY) -m pytest -q tests --durations=25

# Quick loop while developing: no LLM server, no SLURM cluster, no multi-process runs.
test-fast: venv
	$(PY) -m pytest -q tests -m "not slow and not llm and not slurm"

sysdeps:
	@missing=""; for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (run as root or install them)"; exit 1; fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c requirements.lock -e '.[dev]'
	touch $@

# Services the tests talk to for real: a llama.cpp OpenAI-compatible server (own venv,
# built from source once) and, as root, a two-node SLURM cluster with accounting.
test-deps: llm slurm-up

llm: .cache/llm/.installed

.cache/llm/.installed: scripts/install_llm.sh
	bash scripts/install_llm.sh .cache/llm
	touch $@

# Throughput tables (docs/benchmarks.md): data loading and training steps.
bench: sysdeps venv
	$(PY) tools/bench_data.py
	$(PY) tools/bench_train.py

# The first lent GPU (docs/benchmarks.md, "GPU check"): the gpu-marked tests, the preflight
# and bench_train --time all, one table in $(GPU_CHECK_OUT)/report.md (also printed). No venv
# rule: it runs where the repository arrives as a bare working tree. Python: PY=... (default
# .venv's, else python3); WHEELS=DIR installs missing packages from a wheel folder first;
# GPU_CHECK_ARGS="--skip-bench" etc. (python tools/gpu_check.py --help).
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# A real two-node SLURM cluster with accounting on this machine (needs root; the slurm
# tests skip, printing why, where it cannot start).
slurm-up:
	@if [ "$$(id -u)" = 0 ]; then bash scripts/slurm_cluster.sh up || echo "SLURM test cluster did not start: tests marked slurm will skip"; \
	else echo "not root: no local SLURM cluster; tests marked slurm will skip"; fi

slurm-down:
	bash scripts/slurm_cluster.sh down

clean:
	rm -rf runs/demo_kmt runs/demo_mean shards/demo .cache/demo
