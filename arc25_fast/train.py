"""The training loop: config -> data -> model -> DeepSpeed engine -> metrics and checkpoints.

One optimizer step takes ``grad_accum`` packed micro-batches on every rank. Its loss is the mean over all labelled
(answer) tokens of the global batch: each micro-batch contributes ``sum of token losses * world / N_global``,
where ``N_global`` (labelled tokens over all micro-batches and ranks) is all-reduced before the backward passes,
and DeepSpeed's data-parallel gradient average divides by ``world`` again. So the step does not depend on how
the samples were packed, split into micro-batches or spread over ranks.
"""
import hashlib
import json
import math
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_hf
from .config import TrainConfig, package_versions, save_run_config
from .data import DataPosition, PackedDataset, PackedStream, build_pipeline, loader, packing_config, validation_batches
from .kernels import attention
from .metrics import MetricsLogger, peak_flops, training_flops
from .model import PackedCausalLM, add_adapter, is_random_init, load_base_model, resolve_dtype

DS_CONFIGS = Path(__file__).parent / "ds_configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Join the process group the launcher set up, or make a one-process group (``arc25-fast train``)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine or linear decay to 0 at ``max_steps`` (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}: use cosine, linear or constant")


def resolve_grad_accum(cfg: TrainConfig, world: int, mix, encoder) -> int:
    """Micro-batches per rank and step, from --grad-accum or a global batch size in tokens or samples."""
    per_micro = cfg.data.max_tokens * world
    if cfg.global_batch_tokens:
        return max(1, round(cfg.global_batch_tokens / per_micro))
    if cfg.global_batch_samples:
        probe = PackedStream(mix, encoder, packing_config(cfg.data), cfg.data.seed, rank=0, stream=1 << 21)
        it = iter(probe)
        for _ in range(16):
            next(it)
        per_micro = probe.stats.samples / probe.stats.micro_batches * world
        return max(1, round(cfg.global_batch_samples / per_micro))
    return cfg.grad_accum


def deepspeed_config(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, grad_accum: int, world: int) -> dict:
    path = Path(cfg.ds_config) if cfg.ds_config else DS_CONFIGS / ("zero2.json" if device.type == "cuda" else "cpu.json")
    ds = json.loads(path.read_text())
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum,
              train_batch_size=grad_accum * world, gradient_clipping=cfg.grad_clip)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    return ds


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "labels", "cu_seqlens")}


def evaluate(engine, batches: list[dict], device: torch.device) -> dict:
    """Teacher-forced loss and answer-token accuracy on this rank's share of the validation set, reduced."""
    engine.eval()
    loss = tokens = correct = 0.0
    with torch.no_grad():
        for batch in batches:
            batch_loss, n, batch_correct = engine(**_to_device(batch, device), max_seqlen=batch["max_seqlen"])
            loss, tokens, correct = loss + batch_loss.item(), tokens + n, correct + batch_correct.item()
    engine.train()
    loss, tokens, correct = _all_reduce([loss, tokens, correct], device)
    return {"val_loss": loss / max(tokens, 1), "val_accuracy": correct / max(tokens, 1), "val_tokens": int(tokens)}


def optimizer_step(engine, micro: list[dict], lr: float, device: torch.device, world: int,
                   position: DataPosition | None = None) -> dict:
    """One optimizer step over this rank's micro-batches; the loss is the mean over the global batch's labels."""
    local = [float(sum(int((b["labels"] != -100).sum()) for b in micro)),
             float(sum(b["n_samples"] for b in micro)), float(sum(int(b["cu_seqlens"][-1]) for b in micro)),
             float(sum(b["input_ids"].numel() for b in micro)),
             float(sum(int((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).pow(2).sum()) for b in micro))]
    n_labels, n_samples, n_tokens, n_positions, sum_sq = _all_reduce(local, device)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = correct = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for batch in micro:
        loss, _, right = engine(**_to_device(batch, device), max_seqlen=batch["max_seqlen"])
        engine.backward(loss * world / n_labels, scale_wrt_gas=False)
        engine.step()
        loss_sum, correct = loss_sum + loss.item(), correct + right.item()
        if position is not None:
            position.advance(batch)
    loss_sum, correct = _all_reduce([loss_sum, correct], device)
    return {"loss": loss_sum / n_labels, "accuracy": correct / n_labels, "lr": lr, "tokens": int(n_tokens),
            "samples": int(n_samples), "padding_fraction": 1.0 - n_tokens / n_positions,
            "sum_sq_lengths": int(sum_sq)}


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, output_dir: Path | None = None,
                rank: int = 0) -> tuple[nn.Module, PackedCausalLM, str]:
    """The (adapter-wrapped) model, its packed-loss wrapper on ``device``, and the attention backend used."""
    dtype = resolve_dtype(cfg.dtype, device)
    backend = attention.choose_backend(cfg.attn, device)
    base = load_base_model(cfg.model, vocab_size, dtype, attention.register(backend), cfg.data.seed)
    if output_dir is not None and is_random_init(cfg.model):  # so the adapter's base model can be loaded again
        if rank == 0:
            base.save_pretrained(str(output_dir / "base_model"))
        base.name_or_path = base.config.name_or_path = str((output_dir / "base_model").resolve())
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = add_adapter(base, cfg)
    return model, PackedCausalLM(model, cfg.loss_chunk_tokens).to(device), backend


def build_engine(cfg: TrainConfig, packed: PackedCausalLM, device: torch.device, grad_accum: int, world: int):
    """A DeepSpeed engine; the optimizer is the config's (e.g. CPU Adam for offload) or torch's AdamW."""
    import deepspeed

    ds_config = deepspeed_config(cfg, device, resolve_dtype(cfg.dtype, device), grad_accum, world)
    params = [p for p in packed.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=packed, model_parameters=params, optimizer=optimizer,
                                           config=ds_config)
    return engine, ds_config


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step records (also written to ``metrics.jsonl`` on rank 0)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = init_distributed(device_type)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    output_dir = Path(cfg.output_dir)
    checkpoint = latest_checkpoint(output_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None and rank == 0:
        print(f"no checkpoint in {output_dir}/checkpoints: starting from scratch")

    mix, encoder = build_pipeline(cfg.data)
    tokenizer = encoder.tokenizer
    model, packed, backend = build_model(cfg, len(tokenizer), device, output_dir, rank)
    grad_accum = resolve_grad_accum(cfg, world, mix, encoder)
    engine, ds_config = build_engine(cfg, packed, device, grad_accum, world)
    payload = {"config": asdict(cfg), "resolved": {"grad_accum": grad_accum, "world_size": world,
                                                   "attention": backend,
                                                   "dtype": str(resolve_dtype(cfg.dtype, device)),
                                                   "encoder": type(encoder).__name__, "deepspeed": ds_config},
               "versions": package_versions()}
    if rank == 0:
        save_run_config(cfg, output_dir, {k: v for k, v in payload.items() if k != "config"})

    step, data_resume = 0, None
    if checkpoint is not None:
        trainer_state, data_resume = load_checkpoint(engine, checkpoint, rank)
        step = trainer_state["step"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {step}")

    dataset = PackedDataset(mix, encoder, packing_config(cfg.data), cfg.data.seed, rank, cfg.num_workers,
                            data_resume)
    position = DataPosition(dataset.num_streams, **({k: data_resume[k] for k in ("consumed", "streams")}
                                                    if data_resume else {}))
    val, val_dropped = ([], 0)
    if cfg.eval_every:
        val, val_dropped = validation_batches(cfg.data, cfg.val_source, cfg.val_samples, mix, encoder)
        val = val[rank::world]
    logger = MetricsLogger(output_dir, rank == 0, cfg.wandb, cfg.wandb_project, payload, checkpoint is not None)
    lm = packed.causal_lm.config
    n_params = sum(p.numel() for p in packed.parameters())
    peak = peak_flops(device)
    records = []
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
        if val_dropped:
            print(f"validation: {val_dropped} samples longer than max_tokens={cfg.data.max_tokens} left out")

    if cfg.eval_every and step == 0:  # the starting point of the validation curve
        logger.log({"step": 0, **evaluate(engine, val, device)})
    batches, seen = loader(dataset, cfg.num_workers), micro_batch_log(output_dir, rank, position.consumed)
    while step < cfg.max_steps:
        t_start = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]
        t_data = time.perf_counter() - t_start
        seen.writelines(hashlib.sha1(b["input_ids"].numpy().tobytes()).hexdigest()[:16] + "\n" for b in micro)
        seen.flush()
        stats = optimizer_step(engine, micro, learning_rate(cfg, step), device, world, position)
        step += 1
        seconds = time.perf_counter() - t_start
        n_tokens = stats["tokens"]
        record = {"step": step, "loss": stats["loss"], "accuracy": stats["accuracy"], "lr": stats["lr"],
                  "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens_per_s": n_tokens / seconds,
                  "samples_per_s": stats["samples"] / seconds, "padding_fraction": stats["padding_fraction"],
                  "step_time_s": seconds, "data_wait_s": t_data, "tokens": n_tokens, "samples": stats["samples"],
                  "peak_memory_gb": (torch.cuda.max_memory_allocated(device) if device_type == "cuda"
                                     else _rss_bytes()) / 2**30}
        if peak:
            flops = training_flops(n_params, lm.num_hidden_layers, lm.hidden_size, n_tokens, stats["sum_sq_lengths"])
            record["mfu"] = flops / seconds / (peak * world)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            record.update(evaluate(engine, val, device))
        records.append(record)
        if step % cfg.log_every == 0 or "val_loss" in record:
            logger.log(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in record})
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            save_checkpoint(engine, model, tokenizer, output_dir, step, rank, {"step": step},
                            position.state(), payload,
                            cfg.keep_checkpoints)
    del batches  # stops the DataLoader workers
    seen.close()
    write_rank_summary(output_dir, rank, packed, position.consumed)
    if rank == 0:
        save_hf(model, tokenizer, output_dir / ("adapter" if hasattr(model, "peft_config") else "model"))
        progress.close()
    logger.close()
    dist.barrier()
    return records


def micro_batch_log(output_dir: Path, rank: int, consumed: int):
    """Append-only ``rank{r}_micro_batches.txt``: a hash of each micro-batch this rank trained on, for audits.

    On resume the lines past the checkpoint (``consumed`` micro-batches) are dropped, as those steps are redone.
    """
    path = output_dir / f"rank{rank}_micro_batches.txt"
    kept = path.read_text().splitlines()[:consumed] if consumed and path.exists() else []
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def write_rank_summary(output_dir: Path, rank: int, packed: nn.Module, micro_batches: int) -> None:
    """How many micro-batches this rank trained on and a hash of its final trainable weights, for audits."""
    digest = hashlib.sha1()
    for name, p in packed.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    summary = {"rank": rank, "micro_batches": micro_batches, "trainable_weights_sha1": digest.hexdigest()}
    (output_dir / f"rank{rank}_summary.json").write_text(json.dumps(summary))


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
