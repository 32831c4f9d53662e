#!/usr/bin/env bash
# The README's main job (docs/SEARCH.md): on 2 CPU cores, a tiny model learns from random weights to write drawing
# programs, first on black canvases of sides 3-6 (part 1), then on canvases of every colour whose sizes differ
# between the examples of a task, up to 12 (part 2), then on both at a low rate (part 3). It is scored on fresh
# tasks of the training generator and on an independent set made apart from it (benchmarks/varied_tasks.py); then
# search-and-learn on that set at 32 programs per task, in 1, 2 or 4 rounds. Outputs under runs/learn-cpu/;
# figures and timings in docs/SEARCH.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/learn-cpu
SAMPLE=(--verify-samples 0 --temperature 1.0 --max-new-tokens 128)
BLACK=(--synthetic-max-calls 1 --synthetic-min-side 3 --synthetic-max-side 6 --synthetic-noise 0
       --synthetic-background 0)
# learning between rounds at part 3's rate: at 0.002 it cost rounds 1-2 tasks (docs/SEARCH.md)
SEARCH=(--lr 0.0002 --warmup-steps 1 --max-steps 4 --max-tokens 4096 --hindsight-per-task 16 --stop-when-solved)
# of 8 programs, 4 go on from the best partial one, in 2 steps; the first 4 are written for each colour's changes apart
# where a task's outputs change cells to several colours (solving/refine.py)
REST=(--rest-samples 4 --rest-steps 2 --split-colors)
SETS=$OUT/varied-tasks

echo "== 1. train on black canvases, sides 3-6: $(date -u +%T)"
arc25-fast train --config configs/learn_cpu.yaml --output-dir "$OUT/train"
echo "== 2. go on to canvases of every colour, each example its own size up to 12: $(date -u +%T)"
arc25-fast train --config configs/learn_cpu_varied.yaml --model "$OUT/train/model" --output-dir "$OUT/varied"
echo "== 3. both kinds of canvas at a low rate: $(date -u +%T)"
arc25-fast train --config configs/learn_cpu_both.yaml --model "$OUT/varied/model" --output-dir "$OUT/both"
python benchmarks/varied_tasks.py --out "$SETS/one_call_challenges.json" --calls 1 --count 60
python benchmarks/varied_tasks.py --out "$SETS/two_calls_challenges.json" --calls 2 --count 60
echo "== 4. pass@8 after training alone: $(date -u +%T)"
arc25-fast evaluate --model "$OUT/both/model" --prompt-kind code --tasks synthetic:50:1000 "${BLACK[@]}" \
  "${SAMPLE[@]}" --samples 8 "${REST[@]}" --output-dir "$OUT/evaluate-black" --overwrite
for set in one_call two_calls; do
  arc25-fast evaluate --model "$OUT/both/model" --prompt-kind code --tasks "kaggle:$SETS/${set}_challenges.json" \
    "${SAMPLE[@]}" --samples 8 "${REST[@]}" --output-dir "$OUT/evaluate-$set" --overwrite
done
echo "== 5. search-and-learn at 32 programs per task: 1 round of 32, 2 of 16, 4 of 8: $(date -u +%T)"
python benchmarks/search_and_learn.py --model "$OUT/both/model" --tasks "kaggle:$SETS/one_call_challenges.json" \
  --samples 32 --rounds 1,2,4 --rest-share 0.5 --json "$OUT/search_varied.json" -- "${SAMPLE[@]}" "${SEARCH[@]}" \
  --rest-steps 2 --split-colors
echo "== done: $(date -u +%T)"
python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def passk(name):
    return json.load(open(f"{out}/{name}/evaluate_summary.json"))["pass@all"]
def search(name):
    r = {x["rounds"]: x for x in json.load(open(f"{out}/{name}.json"))["results"]}
    return (f"pass@2 1x32 {r[1]['pass@2']:.2f}, 2x16 {r[2]['pass@2']:.2f}, 4x8 {r[4]['pass@2']:.2f} "
            f"(task seconds {r[1]['task_seconds']:.0f} / {r[2]['task_seconds']:.0f} / {r[4]['task_seconds']:.0f})")
print(f"pass@8 after training, 50 fresh tasks of the training generator (black, sides 3-6): {passk('evaluate-black'):.2f}")
print(f"pass@8 after training, 60 independent tasks, each example its own size (3-12) and background: "
      f"one call {passk('evaluate-one_call'):.2f}, two calls {passk('evaluate-two_calls'):.2f}")
print(f"search-and-learn at 32 programs, independent varied one-call tasks: {search('search_varied')}")
EOF
