"""Throughput and length reports for the data path (``profile-sampling-speed``, ``profile-seq-len``)."""
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..runtime.rng import Rng
from .encoding import FastEncoder, TextEncoder
from .options import DataParts
from .pipeline import build_pipeline
from .sources import Mix
from .stream import Loader, PackedDataset, PackedStream


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _run_stream(mix: Mix, encoder, cfg: DataParts, n_samples: int) -> dict:
    stream = PackedStream(mix, encoder, cfg.packing, cfg.data.seed)
    start = time.perf_counter()
    for _ in stream:
        if stream.stats.samples >= n_samples:
            break
    seconds = time.perf_counter() - start
    s = stream.stats
    return {"samples": s.samples, "seconds": seconds, "samples_per_s": s.samples / seconds,
            "tokens_per_s": s.tokens / seconds, "packing_efficiency": s.packing_efficiency,
            "dropped_samples": s.dropped, "micro_batches": s.micro_batches}


def _run_workers(mix: Mix, encoder, cfg: DataParts, workers: int, n_samples: int) -> dict:
    dataset = PackedDataset(mix, encoder, cfg.packing, cfg.data.seed, rank=0, num_workers=workers)
    samples = tokens = 0
    it = Loader(dataset, workers)
    next(it)  # start-up (worker processes, numba compilation) is not throughput
    start = time.perf_counter()
    while samples < n_samples:
        batch = next(it)
        samples += batch["n_samples"]
        tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - start
    it.close()
    return {"workers": workers, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


def sample_lengths(mix: Mix, encoder, specs: list[str], seed: int, n_samples: int) -> dict[str, np.ndarray]:
    """Token lengths of ``n_samples`` samples of each source (and of the mix), those past any budget included."""
    out = {}
    for i, spec in enumerate(specs):
        rng = Rng.for_block(seed, 0, 0, i)
        out[spec] = np.array([len(encoder.encode(mix.sources[i].sample(rng))) for _ in range(n_samples)])
    if len(specs) > 1:
        rng = Rng.for_block(seed, 0, 1, 0)
        out["mix"] = np.array([len(encoder.encode(mix.sample(rng))) for _ in range(n_samples)])
    return out


def shared_bins(lengths: dict[str, np.ndarray], max_tokens: int, n_bins: int = 60) -> np.ndarray:
    """One set of bin edges for every source, wide enough to show the samples past ``max_tokens``."""
    top = max(int(max(x.max() for x in lengths.values())), max_tokens) + 1
    return np.linspace(0, top, n_bins + 1)


def histogram(lengths: np.ndarray, edges: np.ndarray, max_tokens: int) -> dict:
    counts, _ = np.histogram(lengths, bins=edges)
    return {"counts": counts.tolist(), "edges": edges.round(1).tolist(), "dropped": int((lengths > max_tokens).sum())}


def plot_lengths(lengths: dict[str, np.ndarray], max_tokens: int, path: Path) -> None:
    """Small multiples, one panel per source (and the mix), on shared bins; samples past ``max_tokens`` (dropped,
    never truncated) are shaded and counted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = shared_bins(lengths, max_tokens)
    fig, axes = plt.subplots(len(lengths), 1, figsize=(8, 1.9 * len(lengths) + 0.8), sharex=True, squeeze=False)
    for ax, (name, lens), color in zip(axes[:, 0], lengths.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        counts, _, patches = ax.hist(lens, bins=edges, color=color, alpha=0.85)
        for patch, left in zip(patches, edges[:-1]):
            if left >= max_tokens:
                patch.set_alpha(0.35)
        dropped = int((lens > max_tokens).sum())
        ax.axvspan(max_tokens, edges[-1], color="grey", alpha=0.12)
        ax.axvline(max_tokens, color="k", linestyle="--", linewidth=1)
        ax.set_title(f"{name}: n={len(lens)}, median {int(np.median(lens))} tokens, longer than max_tokens "
                     f"(dropped): {dropped} ({100 * dropped / len(lens):.1f}%)", fontsize=8, loc="left")
        ax.set_ylabel("samples", fontsize=8)
    axes[-1, 0].set_xlabel(f"sample length (tokens); dashed: max_tokens={max_tokens}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profile_sampling_speed(cfg: DataParts, n_samples: int, n_text_samples: int, workers: list[int],
                           plot: Path | None, log=print) -> dict:
    """Fast path vs the reference text path on the same samples, for each source and for the mix."""
    torch.set_num_threads(1)
    mix, encoder = build_pipeline(cfg)
    if not isinstance(encoder, FastEncoder):
        raise ValueError("profile-sampling-speed compares the fast encoder with the text path; "
                         f"tokenizer {cfg.data.tokenizer} rules the fast encoder out")
    text_encoder = TextEncoder(encoder.tokenizer, encoder.fmt)
    groups = {spec: replace(cfg, sources=replace(cfg.sources, task_sources=[spec]))
              for spec in cfg.sources.task_sources}
    if len(cfg.sources.task_sources) > 1:
        groups["mix"] = cfg
    report = {"tokenizer": cfg.data.tokenizer, "max_tokens": cfg.packing.max_tokens,
              "grid_format": cfg.data.grid_format,
              "task_sources": cfg.sources.task_sources, "machine": machine(), "sources": {}}
    lengths = {}
    for name, group_cfg in groups.items():
        group_mix = mix if name == "mix" else Mix([mix.sources[cfg.sources.task_sources.index(name)]], [1.0])
        _run_stream(group_mix, encoder, group_cfg, 64)  # warm-up: numba compilation, chunk cache
        fast = _run_stream(group_mix, encoder, group_cfg, n_samples)
        text = _run_stream(group_mix, text_encoder, group_cfg, n_text_samples)
        entry = {**fast, "text_path_samples_per_s": text["samples_per_s"],
                 "text_path_tokens_per_s": text["tokens_per_s"],
                 "speedup_vs_text_path": fast["samples_per_s"] / text["samples_per_s"],
                 "workers": [_run_workers(group_mix, encoder, group_cfg, w, n_samples) for w in workers]}
        report["sources"][name] = entry
        log(f"{name}: {entry['samples_per_s']:,.0f} samples/s, {entry['tokens_per_s']:,.0f} tokens/s (1 core); "
            f"text path {entry['text_path_samples_per_s']:,.0f} samples/s; speedup {entry['speedup_vs_text_path']:.1f}x; "
            f"packing efficiency {entry['packing_efficiency']:.4f}; dropped {entry['dropped_samples']}; "
            + "; ".join(f"{w['workers']} workers: {w['samples_per_s']:,.0f} samples/s" for w in entry["workers"]))
    lengths = sample_lengths(mix, encoder, cfg.sources.task_sources, cfg.data.seed, min(n_samples, 2000))
    edges = shared_bins(lengths, cfg.packing.max_tokens)
    for name, lens in lengths.items():
        report["sources"][name]["length_histogram"] = histogram(lens, edges, cfg.packing.max_tokens)
    headline = report["sources"]["mix" if "mix" in report["sources"] else cfg.sources.task_sources[0]]
    for key in ("samples_per_s", "tokens_per_s", "packing_efficiency", "text_path_samples_per_s",
                "speedup_vs_text_path", "dropped_samples"):
        report[key] = headline[key]
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_lengths(lengths, cfg.packing.max_tokens, plot)
        report["plot"] = str(plot)
    return report


def profile_seq_len(cfg: DataParts, n_samples: int, plot: Path | None, log=print) -> dict:
    """Length percentiles per source, and what share each candidate ``max_tokens`` would drop."""
    mix, encoder = build_pipeline(cfg)
    report = {"tokenizer": cfg.data.tokenizer, "grid_format": cfg.data.grid_format, "max_tokens": cfg.packing.max_tokens,
              "sources": {}}
    lengths = sample_lengths(mix, encoder, cfg.sources.task_sources, cfg.data.seed, n_samples)
    for spec, lens in lengths.items():
        entry = {"samples": n_samples, "mean": float(lens.mean()), "max": int(lens.max()),
                 "percentiles": {str(p): float(np.percentile(lens, p)) for p in (50, 90, 95, 99)},
                 "dropped_share": {str(m): float((lens > m).mean()) for m in (2048, 4096, 8192, 16384, 32768)}}
        report["sources"][spec] = entry
        log(f"{spec}: mean {entry['mean']:.0f}, p50 {entry['percentiles']['50']:.0f}, "
            f"p95 {entry['percentiles']['95']:.0f}, p99 {entry['percentiles']['99']:.0f}, max {entry['max']}; dropped at "
            + ", ".join(f"{m}: {100 * s:.1f}%" for m, s in entry["dropped_share"].items()))
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_lengths(lengths, cfg.packing.max_tokens, plot)
        report["plot"] = str(plot)
    return report
