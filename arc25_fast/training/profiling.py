"""Training speed against input size (``arc25-fast profile-seq-len``): the real training step on ARC-shaped samples
of a given grid side and number of demo pairs, for several micro-batch token budgets.

Each point trains a few steps through the same engine, step and packed batches as ``train`` and reports real
tokens/s and samples/s, the step split into forward / backward / optimizer (device synchronised at each phase:
profiling only), data wait, peak memory (CUDA max allocated on GPU, RSS on CPU) and MFU on GPU. On GPU an OOM
search finds the largest token budget that fits for each input size. The report folder holds ``report.json``,
``points.csv``, ``table.md`` and two plots; the sample-length statistics of ``--task-source`` are kept in it.
"""
import csv
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import torch

from ..data.options import PackingConfig
from ..data.pipeline import build_encoder
from ..data.profiling import profile_seq_len
from ..data.prompts import OUTPUT, Sample, output_from_examples
from ..data.sources import Mix
from ..data.stream import PackedStream, to_torch
from ..data.tokenizer import load_tokenizer
from ..runtime.rng import Rng
from ..runtime.startup import Started
from .engine import build_engine
from .metrics import FlopModel, peak_flops
from .options import TrainingParts
from .trainer import StepTimer, build_model, optimizer_step

OOM_LIMIT = 1 << 18  # tokens: the OOM search stops doubling here


class FixedShapeSource:
    """Output-from-examples samples whose grids are all ``side x side``, with ``pairs`` demo pairs: the token count
    of a real ARC task of that size, without its variety."""

    kind = OUTPUT

    def __init__(self, side: int, pairs: int):
        self.name, self.side, self.pairs = f"side{side}-pairs{pairs}", side, pairs

    def sample(self, rng: Rng) -> Sample:
        def grid():
            return rng.np.integers(0, 10, size=(self.side, self.side), dtype=np.uint8)

        return output_from_examples(self.name, self.name, [(grid(), grid()) for _ in range(self.pairs)], grid(), grid())


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def measure_point(engine, packed, encoder, device: torch.device, side: int, pairs: int, budget: int, steps: int,
                  warmup: int, flops: FlopModel, seed: int) -> dict:
    """Train ``warmup + steps`` steps of one micro-batch each on samples of this shape within ``budget`` tokens."""
    stream = iter(PackedStream(Mix([FixedShapeSource(side, pairs)], [1.0]), encoder,
                               PackingConfig(max_tokens=budget, buffer_size=64), seed))
    point = {"grid_side": side, "demo_pairs": pairs, "max_tokens": budget}
    sample_tokens = len(encoder.encode(FixedShapeSource(side, pairs).sample(Rng.for_block(seed, 1, 0, 0))))
    point["sample_tokens"] = sample_tokens
    if sample_tokens > budget:
        return {**point, "skipped": f"one sample is {sample_tokens} tokens"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    tokens = samples = labels = sum_sq = 0
    data_wait = seconds = 0.0
    peak = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        micro = [to_torch(next(stream))]
        t_data = time.perf_counter() - t0
        if i == warmup:
            timer = StepTimer(device)
        stats = optimizer_step(engine, micro, 1e-5, device, world=1, timer=timer)
        if i >= warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            data_wait += t_data
            tokens, samples, labels = tokens + stats["tokens"], samples + stats["samples"], labels + stats["labels"]
            sum_sq += stats["sum_sq_lengths"]
        peak = max(peak, _peak_memory(device))
    point.update(tokens_per_s=tokens / seconds, samples_per_s=samples / seconds, step_s=seconds / steps,
                 forward_s=timer.seconds["forward"] / steps, backward_s=timer.seconds["backward"] / steps,
                 optimizer_s=timer.seconds["optimizer"] / steps, data_wait_s=data_wait / steps,
                 tokens_per_step=tokens / steps, samples_per_step=samples / steps, peak_mem_bytes=peak)
    peak_f = peak_flops(device)
    if peak_f:
        point["mfu"] = flops.step(tokens, labels, sum_sq) / seconds / peak_f
    return point


def oom_search(make_engine, packed, encoder, device: torch.device, side: int, pairs: int, start: int,
               flops: FlopModel, seed: int) -> int:
    """The largest token budget (a multiple of 256) whose step fits in GPU memory, by doubling then bisection."""
    def fits(budget: int) -> bool:
        engine = make_engine()
        try:
            point = measure_point(engine, packed, encoder, device, side, pairs, budget, 1, 0, flops, seed)
            return "skipped" not in point
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del engine
            gc.collect()
            torch.cuda.empty_cache()

    good, bad = 0, None
    budget = start
    while budget <= OOM_LIMIT and fits(budget):
        good, budget = budget, budget * 2
    bad = budget
    while good and bad - good > 256:
        middle = (good + bad) // 2 // 256 * 256
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def profile_training(cfg: TrainingParts, started: Started, sides: list[int], pairs: list[int], budgets: list[int],
                     steps: int, warmup: int, search_oom: bool, report_dir: Path, length_samples: int,
                     log=print) -> dict:
    device, threads = started.device, started.threads
    device_type = device.type
    encoder = build_encoder(load_tokenizer(cfg.data.tokenizer), cfg.data)
    model, packed, backend = build_model(cfg, len(encoder.tokenizer), device)
    flops = FlopModel.of(packed)

    def make_engine():
        return build_engine(cfg, packed, device, 1, 1)[0]

    engine = make_engine()
    report = {"model": cfg.model.name, "attention": backend, "dtype": cfg.model.dtype, "lora": cfg.lora.enabled,
              "threads": threads,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                         + (f", {torch.cuda.get_device_name(device)}" if device_type == "cuda" else ", no GPU"),
              "command": " ".join(sys.argv), "config": asdict(cfg), "points": [], "max_tokens_fit": {}}
    for side in sides:
        for p in pairs:
            for budget in budgets:
                try:
                    point = measure_point(engine, packed, encoder, device, side, p, budget, steps, warmup, flops,
                                          cfg.data.seed)
                except torch.cuda.OutOfMemoryError:
                    point = {"grid_side": side, "demo_pairs": p, "max_tokens": budget, "skipped": "out of memory"}
                    del engine
                    gc.collect()
                    torch.cuda.empty_cache()
                    engine = make_engine()
                report["points"].append(point)
                log(format_point(point))
            if search_oom and device_type == "cuda":
                fit = oom_search(make_engine, packed, encoder, device, side, p, min(budgets), flops, cfg.data.seed)
                report["max_tokens_fit"][f"side{side}-pairs{p}"] = fit
                log(f"grid side {side}, {p} demo pairs: largest token budget that fits: {fit}")
    report["lengths"] = profile_seq_len(cfg, length_samples, None, log=log)
    write_report(report, report_dir)
    log(f"wrote {report_dir}/report.json, points.csv, table.md, throughput.png, memory.png")
    return report


def format_point(p: dict) -> str:
    head = f"side {p['grid_side']:>2}, {p['demo_pairs']} pairs, max_tokens {p['max_tokens']:>6}: "
    if "skipped" in p:
        return head + f"skipped ({p['skipped']})"
    mfu = f", MFU {100 * p['mfu']:.1f}%" if "mfu" in p else ""
    return head + (f"{p['tokens_per_s']:,.0f} tokens/s, {p['samples_per_s']:.2f} samples/s, step {p['step_s']:.3f} s "
                   f"(fwd {p['forward_s']:.3f} / bwd {p['backward_s']:.3f} / opt {p['optimizer_s']:.3f}, data "
                   f"{p['data_wait_s']:.4f}), peak {p['peak_mem_bytes'] / 2**30:.2f} GiB{mfu}")


COLUMNS = ["grid_side", "demo_pairs", "max_tokens", "sample_tokens", "tokens_per_s", "samples_per_s", "step_s",
           "forward_s", "backward_s", "optimizer_s", "data_wait_s", "peak_mem_bytes", "mfu", "skipped"]


def write_report(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    with open(folder / "points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["points"])
    rows = ["| grid side | demo pairs | max_tokens | sample tokens | tokens/s | samples/s | step s (fwd / bwd / opt) | "
            "data wait s | peak memory GiB | MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        if "skipped" in p:
            rows.append(f"| {p['grid_side']} | {p['demo_pairs']} | {p['max_tokens']} | {p.get('sample_tokens', '')} | "
                        f"{p['skipped']} | | | | | |")
            continue
        mfu = f"{100 * p['mfu']:.1f}%" if "mfu" in p else "-"
        rows.append(f"| {p['grid_side']} | {p['demo_pairs']} | {p['max_tokens']} | {p['sample_tokens']} | "
                    f"{p['tokens_per_s']:,.0f} | {p['samples_per_s']:.2f} | {p['step_s']:.3f} ({p['forward_s']:.3f} / "
                    f"{p['backward_s']:.3f} / {p['optimizer_s']:.3f}) | {p['data_wait_s']:.4f} | "
                    f"{p['peak_mem_bytes'] / 2**30:.2f} | {mfu} |")
    fits = "".join(f"\n- {k}: {v} tokens" for k, v in report["max_tokens_fit"].items())
    (folder / "table.md").write_text("\n".join(rows) + "\n" + (f"\nLargest budget that fits:{fits}\n" if fits else ""))
    plot_points(report, folder)


def plot_points(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in report["points"] if "skipped" not in p]
    for key, label, name, scale in (("tokens_per_s", "real tokens/s", "throughput.png", 1.0),
                                    ("peak_mem_bytes", "peak memory (GiB)", "memory.png", 2.0**-30)):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for side, pairs in sorted({(p["grid_side"], p["demo_pairs"]) for p in points}):
            xs = [p for p in points if (p["grid_side"], p["demo_pairs"]) == (side, pairs)]
            ax.plot([p["max_tokens"] for p in xs], [p[key] * scale for p in xs], marker="o",
                    label=f"{side}x{side} grids, {pairs} demo pairs")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batch token budget (max_tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{report['model']} ({'LoRA' if report['lora'] else 'full'}, {report['attention']}), "
                     f"{report['machine']}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
