#!/usr/bin/env bash
# The newest packages that setup.py allows still work: install them into the current (fresh) environment, import
# everything, collect every test and train a few steps. CI runs this before the tested environment's suite.
#
#   python -m venv /tmp/newest && source /tmp/newest/bin/activate && bash scripts/check_newest.sh /tmp/newest-check
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
ARC25_PACKAGES=newest bash scripts/install.sh
python -m pip freeze --exclude-editable > "$work/versions.txt"
python -c "import arc25_fast.cli, arc25_fast.kernels.attention, deepspeed, peft, transformers" \
  || { echo "check_newest: the package does not import with the newest versions" >&2; exit 1; }
python train_ds.py --help > /dev/null
python -m pytest -q --collect-only > "$work/collect.log" 2>&1 \
  || { tail -20 "$work/collect.log" >&2; echo "check_newest: the tests do not collect with the newest versions" >&2; exit 1; }
arc25-fast train --config configs/tiny_cpu.yaml --max-steps 3 --eval-every 0 --save-every 0 --num-workers 0 \
  --output-dir "$work/train" > "$work/train.log" 2>&1 \
  || { tail -20 "$work/train.log" >&2; echo "check_newest: a short training fails with the newest versions" >&2; exit 1; }
echo "check_newest: imports, $(grep -Eo '[0-9]+ tests? collected' "$work/collect.log" | head -1) and 3 training steps pass" \
  "with $(grep -iE '^(torch|transformers|deepspeed|peft)==' "$work/versions.txt" | tr '\n' ' ')"
