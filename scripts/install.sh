#!/usr/bin/env bash
# Install arc25-fast and its dependencies into the current Python environment.
# torch is installed first (the pinned version, unless one is already there) because DeepSpeed builds against it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation -e ".[test]"
