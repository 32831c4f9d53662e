"""What a training step costs beyond its arithmetic: the project's step (DeepSpeed or the local engine, full
fine-tuning or LoRA) against a plain eager PyTorch step of the same model on the same tokens, with operators and
host syncs counted per step (``arc25_fast.runtime.step_audit``) and, on a GPU, a profiler summary of one small step.

    python benchmarks/step_overhead.py --threads 1 --json docs/benchmarks/step_overhead_cpu.json   # CPU, tiny shape
    python benchmarks/step_overhead.py --model ../shared/fixtures/model-configs/qwen2.5-coder-0.5b-instruct.json \\
        --tokenizer ../shared/fixtures/qwen2-tokenizer --budgets 8192,16384,65536 --profile --json step_overhead.json

The plain eager step: the samples of the micro-batch right-padded into one batch, the model's own forward with an
attention mask and labels (full logits, its own loss), ``backward``, ``torch.optim.AdamW`` (its default
implementation), ``zero_grad``. Its tokens/s count real tokens only, as the project's do.
"""
import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

from arc25_fast.commands.configs import TrainConfig
from arc25_fast.data.options import DataOptions, PackingConfig
from arc25_fast.data.pipeline import build_encoder
from arc25_fast.data.sources import Mix
from arc25_fast.data.stream import PackedStream, to_torch
from arc25_fast.data.tokenizer import load_tokenizer
from arc25_fast.runtime.distributed import init_distributed
from arc25_fast.runtime.options import configure
from arc25_fast.runtime.step_audit import StepAudit
from arc25_fast.training.engine import build_engine
from arc25_fast.training.metrics import FlopModel, peak_flops
from arc25_fast.training.model import add_adapter, load_base_model, resolve_dtype
from arc25_fast.training.profiling import FixedShapeSource
from arc25_fast.training.trainer import StepTimer, build_model, optimizer_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_for(encoder, budget: int, n: int, seed: int) -> list[dict]:
    """``n`` packed micro-batches of ARC-shaped samples (side 10, 3 demo pairs) filling ``budget`` tokens."""
    side = 10 if budget >= 4096 else 3
    stream = iter(PackedStream(Mix([FixedShapeSource(side, 3)], [1.0]), encoder,
                               PackingConfig(max_tokens=budget, buffer_size=64), seed))
    return [to_torch(next(stream)) for _ in range(n)]


def padded(batch: dict, device: torch.device) -> dict:
    """The micro-batch as a plain padded batch with HF labels (the eager baseline's input)."""
    ids, bounds = batch["input_ids"][0], batch["bounds"]
    labels = torch.full_like(ids, -100)
    labels[batch["label_positions"] + 1] = batch["targets"]
    width = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    rows = len(bounds) - 1
    out = {"input_ids": torch.zeros(rows, width, dtype=ids.dtype), "labels": torch.full((rows, width), -100),
           "attention_mask": torch.zeros(rows, width, dtype=torch.long)}
    for r, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        out["input_ids"][r, :e - s] = ids[s:e]
        out["labels"][r, :e - s] = labels[s:e]
        out["attention_mask"][r, :e - s] = 1
    return {k: v.to(device) for k, v in out.items()}


class EagerStep:
    def __init__(self, cfg: TrainConfig, vocab: int, device: torch.device):
        dtype = resolve_dtype(cfg.model.dtype, device)
        base = load_base_model(cfg.model.name, vocab, dtype, "sdpa", cfg.data.seed).to(device)
        self.model = add_adapter(base, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)

    def __call__(self, batch: dict) -> None:
        loss = self.model(**batch["padded"]).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()


def measure(step, batches: list[dict], device: torch.device, warmup: int) -> float:
    """Seconds per step over ``batches`` after ``warmup`` steps (the device synchronised at both ends only)."""
    for b in batches[:warmup]:
        step(b)
    sync(device)
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


def measure_row(step, batches, device, args, flops, tokens, labels, sum_sq, split: bool, params) -> dict:
    """Tokens/s and step time, MFU, the step split (a separate pass: it synchronises at each phase), one step's
    operators and syncs, peak memory."""
    seconds = measure(step, batches, device, args.warmup)
    row = {"step_ms": 1000 * seconds, "tokens_per_s": tokens / seconds}
    if flops is not None and peak_flops(device):
        row["mfu"] = flops.step(tokens, labels, sum_sq) / seconds / peak_flops(device)
    if split:
        timer = StepTimer(device)
        for b in batches[args.warmup:]:
            step(b, timer)
        row["split_ms"] = {k: 1000 * v / args.steps for k, v in timer.seconds.items()}
    with StepAudit(params) as audit:
        step(batches[-1])
        sync(device)
    row.update(audit.summary())
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return row


def profile_summary(step, batch: dict, device: torch.device) -> dict:
    """One step under torch.profiler: the busiest kernels and how often the host waited or copied."""
    from torch.profiler import ProfilerActivity, profile

    step(batch)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
        sync(device)
    events = prof.key_averages()
    cuda_total = sum(getattr(e, "self_device_time_total", 0) for e in events)
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:15]
    host = {e.key: e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaMemcpyAsync", "cudaLaunchKernel", "cudaEventSynchronize")}
    return {"device_ms": cuda_total / 1000, "host_calls": host,
            "top_kernels": [{"name": e.key[:80], "ms": getattr(e, "self_device_time_total", 0) / 1000,
                             "calls": e.count} for e in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, or a config.json (random weights of that shape)")
    ap.add_argument("--tokenizer", default="tiny")
    ap.add_argument("--budgets", default="512", help="micro-batch token budgets")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--engines", default="eager,deepspeed,local")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--eager-max-tokens", type=int, default=16384, help="the eager baseline's largest budget (its "
                    "full logits grow with the batch)")
    ap.add_argument("--profile", action="store_true", help="GPU: a profiler summary of one step at the first budget")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    init_distributed(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = build_encoder(tokenizer, DataOptions(tokenizer=args.tokenizer, verify_samples=0))
    report = {"command": " ".join(sys.argv), "device": str(device), "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         + (torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"),
              "rows": [], "profile": None}
    budgets = [int(x) for x in args.budgets.split(",")]
    data = {}
    for budget in budgets:
        batches = batches_for(encoder, budget, args.warmup + args.steps, seed=0)
        for b in batches:
            b["padded"] = padded(b, device)
        timed = batches[args.warmup:]
        data[budget] = (batches, sum(int(b["cu_seqlens"][-1]) for b in timed) / args.steps,
                        sum(len(b["targets"]) for b in timed) / args.steps,
                        sum(int(((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).long() ** 2).sum()) for b in timed)
                        / args.steps)
    for mode in args.modes.split(","):
        for engine_name in args.engines.split(","):  # each model built once, measured at every budget
            cfg = configure(TrainConfig, model=args.model, lora=mode == "lora", dtype=args.dtype, lr=1e-5,
                            warmup_steps=0, engine="local" if engine_name == "local" else "deepspeed",
                            tokenizer=args.tokenizer)
            if engine_name == "eager":
                step = EagerStep(cfg, len(tokenizer), device)
                params, flops, backend = step.params, None, "sdpa (padded batch)"
            else:
                _, packed, backend = build_model(cfg, len(tokenizer), device)
                engine, _ = build_engine(cfg, packed, device, 1, 1)
                params, flops = list(packed.parameters()), FlopModel.of(packed)

                def step(b, timer=None):
                    optimizer_step(engine, [b], 1e-5, device, 1, timer=timer)
            for budget in budgets:
                if engine_name == "eager" and budget > args.eager_max_tokens:
                    continue
                batches, tokens, labels, sum_sq = data[budget]
                row = {"budget": budget, "mode": mode, "engine": engine_name, "attention": backend,
                       "tokens_per_step": tokens}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    row.update(measure_row(step, batches, device, args, flops, tokens, labels, sum_sq,
                                           split=engine_name != "eager", params=params))
                    if args.profile and device.type == "cuda" and budget == budgets[0] and mode == "full" \
                            and engine_name != "eager":
                        report.setdefault("profiles", {})[engine_name] = profile_summary(step, batches[-1], device)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "top_ops"}), flush=True)
                report["rows"].append(row)
            step = engine = packed = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
