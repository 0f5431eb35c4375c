#!/usr/bin/env bash
# Build the inferd wheel into dist/ (pure Python; the runtimes come from their own wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip wheel --no-deps --wheel-dir dist .
ls -1 dist/*.whl
