#!/usr/bin/env bash
# Everything that needs a GPU, as one command with a time box per section, on a bare GPU machine without network
# (the torch it has, nothing installed): one report, runs/gpu_check/report.md, and at most six files beside it.
#
#   bash scripts/prepare_gpu_check.sh       # once, on a machine with network: wheels and .debs into .whl/
#   bash scripts/gpu_check.sh               # on the GPU machine, from the checkout (with .whl/ beside it)
#   bash scripts/gpu_check.sh --dry-run     # the same sections at tiny sizes on the CPU (CI runs this)
#   GPU_CHECK_OUT=DIR bash scripts/gpu_check.sh   # the report somewhere else
#
# Only what is missing is installed: each wheel of .whl/ whose distribution Python cannot find goes into a private
# folder on PYTHONPATH; bubblewrap is unpacked from its .deb when there is no bwrap. The sections: the GPU tests; the
# training step at the Qwen2.5-Coder-0.5B shape (full and LoRA, DeepSpeed and the local engine, 8k/16k/64k-token
# micro-batches: tokens/s, MFU, peak memory, step split, syncs, a profiler summary); TRL side by side; sampling
# (shared prefix against generate, K = 1, 8, 32; sampling without replacement against plain); the search-and-learn
# time split; sandbox programs/s on all cores.
# A section that runs past its box is cut and the report says so; the others go on.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
SHARED=${SHARED:-../shared/fixtures}
PY=${PYTHON:-python3}
mkdir -p "$OUT" && rm -rf "$OUT"/report.md "$OUT"/sections.log "$OUT"/*.json "$OUT/trl" "$OUT/search"
REPORT=$OUT/report.md
LOG=$OUT/sections.log
START=$SECONDS

# ---- what is missing, from files brought along ------------------------------------------------------------------
SITE=${ARC25_SITE:-/tmp/arc25-site}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  missing=$("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md, re, sys
for path in sys.argv[1:]:
    name = re.split(r"-\d", path.rsplit("/", 1)[-1], maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
EOF
)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $missing >> "$LOG" 2>&1
  fi
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v bwrap >/dev/null 2>&1 && ls .whl/bubblewrap*.deb >/dev/null 2>&1; then
  for deb in .whl/*.deb; do dpkg -x "$deb" /tmp/arc25-sys; done
  export PATH=/tmp/arc25-sys/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/arc25-sys/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

SCALE=1  # the time boxes, multiplied: a dry run on a small busy CPU is slower than the real one on a GPU machine
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  SCALE=4 GPU_TESTS=(tests/test_gpu.py)  # the CPU tests among them run in the suite anyway
  MODEL=tiny TOK=tiny BUDGETS=512,1024 STEPS=2 KS=1,8 NEW=4 TASKS=1 PROGRAMS=200 LEARN=1 SAMPLES=4 TRL=(--hidden 64 --intermediate 128
    --layers 2 --heads 4 --kv-heads 2 --samples 8 --max-sample-tokens 1024 --max-tokens 1024)
else
  GPU_TESTS=(tests/test_gpu.py tests/test_reference_kernels.py tests/test_step_audit.py)
  MODEL=$SHARED/model-configs/qwen2.5-coder-0.5b-instruct.json TOK=$SHARED/qwen2-tokenizer
  BUDGETS=8192,16384,65536 STEPS=5 KS=1,8,32 NEW=32 TASKS=2 PROGRAMS=4000 LEARN=4 SAMPLES=16 TRL=(--hidden 896 --intermediate 4864
    --layers 24 --heads 14 --kv-heads 2 --samples 96 --max-sample-tokens 8192 --max-tokens 16384)
fi

{
  echo "# GPU check$([ $DRY = 1 ] && echo ' (dry run: tiny sizes, CPU)')"
  echo
  echo "- date: $(date -u +%FT%TZ); machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'); $(nproc) CPU cores"
  echo "- versions: $("$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tail -1); deepspeed $("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1 || echo missing); trl $("$PY" -c 'import trl; print(trl.__version__)' 2>/dev/null || echo missing); bwrap $(command -v bwrap >/dev/null && echo yes || echo missing)"
  echo "- installed from .whl/ into $SITE: $(echo ${missing:-nothing} | tr ' ' '\n' | sed 's#.*/##; s/-[0-9].*//' | tr '\n' ' ')"
  echo
  echo "| section | box (s) | status | seconds |"
  echo "|---|---|---|---|"
} > "$REPORT"
SUMMARY=""

section() {  # section NAME BOX_SECONDS COMMAND...: run within its box, keep its output, record how it ended
  local name=$1 box=$(($2 * SCALE)); shift 2
  echo "== $name (box ${box} s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$box" "$@" >> "$LOG" 2>&1
  local status=$?
  local verdict="ok"
  [ $status = 124 ] || [ $status = 137 ] && verdict="cut at its box"
  [ $status != 0 ] && [ "$verdict" = ok ] && verdict="failed (exit $status)"
  echo "| $name | $box | $verdict | $((SECONDS - start)) |" >> "$REPORT"
  SUMMARY+="$name: $verdict"$'\n'
}

section "gpu tests" 75 "$PY" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" -rs
section "training step" 140 "$PY" benchmarks/step_overhead.py --model "$MODEL" --tokenizer "$TOK" --budgets "$BUDGETS" \
  --modes full,lora --engines eager,deepspeed,local --steps "$STEPS" --warmup 2 --profile --json "$OUT/step_overhead.json"
if "$PY" -c "import trl, datasets" 2>/dev/null; then
  section "trl side by side" 90 "$PY" benchmarks/trl_side_by_side.py --out "$OUT/trl" "${TRL[@]}" --tokenizer "$TOK" --batch-sizes "" \
    --rounds 1 --engine local --no-validation --threads 4
else
  echo "| trl side by side | $((90 * SCALE)) | skipped: trl and datasets are not installed (.whl/ has none) | 0 |" >> "$REPORT"
fi
[ -f "$OUT/trl/report.json" ] && cp "$OUT/trl/report.json" "$OUT/trl.json"
section "sampling" 90 "$PY" benchmarks/decoding_speed.py --model "$MODEL" --tokenizer "$TOK" --sections sampling,fresh \
  --ks "$KS" --batch-sizes 1 --max-new-tokens "$NEW" --max-tasks "$TASKS" --json "$OUT/sampling.json"
section "search-and-learn" 75 "$PY" -m arc25_fast.cli search-and-learn --tasks "synthetic:$TASKS:7" --model "$MODEL" \
  --tokenizer "$TOK" --rounds 2 --samples "$SAMPLES" --ttt-steps "$LEARN" --max-steps "$LEARN" --max-new-tokens "$NEW" \
  --lr 1e-4 \
  --output-dir "$OUT/search" --overwrite
[ -f "$OUT/search/search_summary.json" ] && cp "$OUT/search/search_summary.json" "$OUT/search.json"
section "sandbox" 25 "$PY" benchmarks/sandbox_throughput.py --programs "$PROGRAMS" --workers "$(nproc)" \
  --json "$OUT/sandbox.json"

"$PY" scripts/gpu_report.py "$OUT" >> "$REPORT" 2>> "$LOG"
echo >> "$REPORT"
echo "Total: $((SECONDS - START)) s. Section outputs: sections.log." >> "$REPORT"
rm -rf "$OUT/trl" "$OUT/search"
printf '%s' "$SUMMARY"
echo "report: $REPORT"
