#!/usr/bin/env bash
# Build the inferd wheel (pure Python; the runtimes come from their own wheels) into DIR (default dist/).
# Usage: packaging/build-wheel.sh [DIR]        PYTHON=... picks the interpreter whose pip builds it (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
mkdir -p "$out"
"${PYTHON:-python3}" -m pip wheel --quiet --no-deps --wheel-dir "$out" .
ls -1 "$out"/inferd-*.whl
