#!/usr/bin/env bash
# Install arc25-fast and its dependencies into the current Python environment (a venv, conda, user site, any path).
#
#   bash scripts/install.sh                         # the tested versions of constraints.txt
#   ARC25_PACKAGES=newest bash scripts/install.sh   # the newest versions setup.py allows (what a new release brings)
#
# torch is installed first (2.13.0, unless one is already there: a cluster's CUDA build is kept) because DeepSpeed
# builds against it. The sandbox for model-written programs needs bubblewrap and libseccomp (docs/SECURITY.md):
# installed here with apt-get where this runs as root on Debian/Ubuntu; elsewhere a message says what to install.
# Running it again is safe: it installs what changed.
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
python -c "import setuptools, wheel" 2>/dev/null || python -m pip install -q setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
keep_torch=$(mktemp)
trap 'rm -f "$keep_torch"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > "$keep_torch"  # never replace the torch in place
case "${ARC25_PACKAGES:-tested}" in
  tested) pins=(-c constraints.txt -c "$keep_torch") ;;
  newest) pins=(--upgrade --upgrade-strategy eager -c "$keep_torch") ;;
  *) echo "install.sh: ARC25_PACKAGES must be 'tested' or 'newest', not '$ARC25_PACKAGES'" >&2; exit 2 ;;
esac
DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "${pins[@]}" -e ".[test]"
