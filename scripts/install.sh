#!/usr/bin/env bash
# Install arc25-fast and its dependencies into the current Python environment.
# torch is installed first (the pinned version, unless one is already there) because DeepSpeed builds against it.
# The sandbox for model-written programs needs bubblewrap and libseccomp (docs/SECURITY.md): installed here with
# apt-get where this runs as root on Debian/Ubuntu; elsewhere a message says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q libseccomp.so.2; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2 >/dev/null
  else
    echo "install.sh: the sandbox needs bubblewrap and libseccomp2 (e.g. sudo apt-get install bubblewrap" \
         "libseccomp2); without them evaluate refuses to run model-written programs" >&2
  fi
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation -e ".[test]"
