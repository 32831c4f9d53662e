#!/usr/bin/env bash
# The README's main job (docs/SEARCH.md): on 2 CPU cores, a tiny model learns from random weights to write drawing
# programs; then search-and-learn solves more tasks than sampling alone at the same number of programs, on grids of
# the sizes it trained on and on larger ones. About 20 minutes; outputs under runs/learn-cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/learn-cpu
RECIPE=(--synthetic-max-calls 1 --synthetic-min-side 3 --synthetic-noise 0 --synthetic-background 0
        --verify-samples 0 --temperature 1.0 --max-new-tokens 96)
SEARCH=(--lr 0.002 --warmup-steps 1 --max-steps 4 --max-tokens 2048 --hindsight-per-task 16)

echo "== 1. train: $(date -u +%T)"
arc25-fast train --config configs/learn_cpu.yaml --output-dir "$OUT/train"
echo "== 2. pass@8 after training alone, 50 fresh tasks (sides 3-6): $(date -u +%T)"
arc25-fast evaluate --model "$OUT/train/model" --prompt-kind code --tasks synthetic:50:1000 "${RECIPE[@]}" \
  --synthetic-max-side 6 --samples 8 --output-dir "$OUT/evaluate" --overwrite
for side in 6 10; do
  echo "== 3. search-and-learn at 32 programs per task: 1 round of 32, 2 of 16, 4 of 8 (sides 3-$side): $(date -u +%T)"
  python benchmarks/search_and_learn.py --model "$OUT/train/model" --tasks synthetic:50:1000 --samples 32 \
    --rounds 1,2,4 --json "$OUT/search_side$side.json" -- "${RECIPE[@]}" --synthetic-max-side "$side" "${SEARCH[@]}"
done
echo "== done: $(date -u +%T); numbers in $OUT/evaluate/evaluate_summary.json and $OUT/search_side*.json"
