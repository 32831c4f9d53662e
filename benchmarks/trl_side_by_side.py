"""arc25-fast side by side with TRL's SFTTrainer: same model, same initial weights, same rendered samples.

    pip install -e ".[bench]"
    python benchmarks/trl_side_by_side.py --out docs/benchmarks/trl_cpu            # CPU: one thread per run
    python benchmarks/trl_side_by_side.py --out runs/trl_gpu --hidden 896 --layers 24 --heads 14 --kv-heads 2 \\
        --intermediate 4864 --samples 512 --rounds 3                                # GPU: the 0.5B shape

Runs, alternating over ``--rounds``: (a) TRL padded, completion-only loss, per-device batch 1/4/8; (b) TRL with its
own packing (``packing=True``: best-fit-decreasing, padding-free), as a user would set it; (c) arc25-fast. Each run
is a separate process (``--threads`` torch threads) training a LoRA adapter (attention, r=16) on the same samples
(drawn by arc25-fast's stream from the default mix, longer ones left out for everyone), once each. Reported per run:
real tokens/s and samples/s (after the first step), padding share, peak memory (the process's max RSS on CPU, CUDA
max allocated on GPU); once: the loss of both trainers on the same first batch from the same weights (should agree),
and the validation loss after training, computed for every adapter by the same code on the same held-out samples.
TRL is a benchmark-only dependency (the ``bench`` extra), never one of arc25-fast's.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "qwen2-tokenizer"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- preparation: model, samples -----------------------------------------------------------------------------

def prepare(args) -> None:
    """The initial weights, the training samples (text and arc25-fast's encoding) and the validation samples."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from arc25_fast.commands.configs import DataConfig
    from arc25_fast.data.encoding import TextEncoder
    from arc25_fast.data.pipeline import build_pipeline
    from arc25_fast.data.prompts import Sample
    from arc25_fast.data.stream import PackedStream
    from arc25_fast.data.tokenizer import render_prompt
    from arc25_fast.runtime.options import configure
    from arc25_fast.runtime.rng import Rng

    out = Path(args.out)
    data = configure(DataConfig, tokenizer=str(args.tokenizer), max_tokens=args.max_sample_tokens, verify_samples=50,
                     seed=args.seed)
    mix, encoder = build_pipeline(data)
    tok = encoder.tokenizer
    config = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(args.seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    text = TextEncoder(tok, encoder.fmt)

    def record(sample: Sample) -> dict:
        user = "".join(s if isinstance(s, str) else encoder.fmt.to_text(s) for s in sample.user)
        answer = "".join(s if isinstance(s, str) else encoder.fmt.to_text(s) for s in sample.answer)
        prompt = render_prompt(tok, user)
        full = text.render(sample)
        completion = full[len(prompt):]
        end = completion.index("<|im_end|>") + len("<|im_end|>")  # answer and end of turn: what arc25-fast trains
        enc = encoder.encode(sample)
        return {"prompt": prompt, "completion": completion[:end], "answer": answer, "tokens": len(enc)}

    stream = PackedStream(mix, encoder, data.packing, args.seed)
    train, uid = [], 0
    while len(train) < args.samples:
        sample = stream.draw(uid)
        uid += 1
        if len(encoder.encode(sample)) <= args.max_sample_tokens:
            train.append(record(sample))
    rng = Rng.for_block(args.seed, 99, 0, 0)
    val = []
    while len(val) < args.val_samples:
        sample = mix.sample(rng)
        if len(encoder.encode(sample)) <= args.max_sample_tokens:
            val.append(record(sample))
    (out / "samples.json").write_text(json.dumps({"train": train, "val": val, "uids_drawn": uid}))


# ---- one run per process ---------------------------------------------------------------------------------------

def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    out = Path(args.out)
    samples = json.loads((out / "samples.json").read_text())["train"]
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.bfloat16 if torch.cuda.is_available()
                                                 else torch.float32, attn_implementation="sdpa")
    dataset = Dataset.from_list([{"prompt": s["prompt"], "completion": s["completion"]} for s in samples])
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    name = "trl-packed" if args.packing else f"trl-padded-b{args.batch}"
    config = SFTConfig(output_dir=str(out / "runs" / name), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr,
                       lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000000, save_strategy="no",
                       report_to="none", max_length=args.max_tokens if args.packing else args.max_sample_tokens,
                       packing=args.packing, completion_only_loss=True, dataloader_num_workers=0, seed=args.seed,
                       use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), optim="adamw_torch",
                       gradient_checkpointing=False, shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"), callbacks=[Clock()])
    real = padded = n = 0
    for batch in trainer.get_train_dataloader():  # what TRL feeds the model: real and padded positions, samples
        padded += batch["input_ids"].numel()
        if "attention_mask" in batch:  # padded rows
            real += int(batch["attention_mask"].sum())
            n += batch["input_ids"].shape[0]
        else:  # padding-free: one row of samples laid end to end
            real += batch["input_ids"].numel()
            n += int((batch["position_ids"] == 0).sum())
    t0 = time.perf_counter()
    trainer.train()
    steps = len(stamps)
    seconds = stamps[-1] - stamps[0] if steps > 1 else stamps[-1] - t0
    timed = (steps - 1) / steps if steps > 1 else 1.0  # throughput from the second step on
    trainer.model.save_pretrained(out / "runs" / name / "adapter")
    return {"name": name, "steps": steps, "samples": n, "real_tokens": real, "positions": padded,
            "seconds": seconds, "samples_per_s": n * timed / seconds, "tokens_per_s": real * timed / seconds,
            "padding_share": 1 - real / padded, "peak_memory_bytes": peak_memory(),
            "adapter": str(out / "runs" / name / "adapter")}


def run_ours(args) -> dict:
    from arc25_fast.commands.configs import TrainConfig
    from arc25_fast.commands.train import run as train
    from arc25_fast.runtime.options import configure

    out = Path(args.out)
    info = json.loads((out / "samples.json").read_text())
    n, uids = len(info["train"]), info["uids_drawn"]
    # the same stream that drew the samples; enough steps to train at least as many samples (measured as it goes)
    cfg = configure(TrainConfig, tokenizer=str(args.tokenizer), max_tokens=args.max_tokens, verify_samples=0,
                    seed=args.seed, pack_buffer=64,
                    model=str(out / "base"), output_dir=str(out / "runs" / "arc25-fast"), overwrite=True,
                    lora_rank=LORA["r"], lora_alpha=float(LORA["lora_alpha"]), lr=args.lr, warmup_steps=0,
                    lr_schedule="constant", grad_accum=1, num_workers=0, threads=args.threads, eval_every=0,
                    engine=args.engine,
                    save_every=0, max_steps=max(2, math.ceil(sum(s["tokens"] for s in info["train"]) /
                                                              args.max_tokens)))
    records = train(cfg)
    samples = sum(r["samples"] for r in records)
    timed = records[1:] if len(records) > 1 else records
    seconds = sum(r["step_time_s"] for r in timed)
    return {"name": "arc25-fast", "steps": len(records), "samples": samples, "samples_wanted": n, "uids": uids,
            "real_tokens": sum(r["tokens"] for r in records), "positions": sum(r["tokens"] for r in records),
            "seconds": sum(r["step_time_s"] for r in records), "samples_per_s": sum(r["samples"] for r in timed) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "padding_share": max(r["padding_fraction"] for r in records), "peak_memory_bytes": peak_memory(),
            "adapter": str(out / "runs" / "arc25-fast" / "adapter")}


# ---- one evaluator for every adapter, and the first-batch loss of both trainers --------------------------------

def first_batch_losses(args) -> dict:
    """Mean token loss of the first 4 samples from the initial weights, as each trainer computes it: TRL's own dataset
    preparation, collator and ``compute_loss``; arc25-fast's encoder, packed batch and chunked loss."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from arc25_fast.commands.configs import TrainConfig
    from arc25_fast.data.encoding import EncodedSample
    from arc25_fast.data.stream import micro_batch, to_torch
    from arc25_fast.kernels import attention
    from arc25_fast.runtime.options import configure
    from arc25_fast.training.model import PackedCausalLM, add_adapter, model_inputs

    out = Path(args.out)
    samples = json.loads((out / "samples.json").read_text())["train"][:4]
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, processing_class=tok, peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"),
                         train_dataset=Dataset.from_list([{"prompt": s["prompt"], "completion": s["completion"]}
                                                          for s in samples]),
                         args=SFTConfig(output_dir=str(out / "runs" / "first-batch"), report_to="none",
                                        use_cpu=True, max_length=args.max_sample_tokens, completion_only_loss=True))
    rows = [trainer.train_dataset[i] for i in range(len(samples))]
    batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    ours_model = add_adapter(AutoModelForCausalLM.from_pretrained(out / "base",
                                                                  attn_implementation=attention.register("sdpa")),
                             configure(TrainConfig, lora_rank=LORA["r"],
                                       lora_alpha=float(LORA["lora_alpha"]))).eval()
    encoded = []
    for s in samples:
        p = tok(s["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(s["completion"], add_special_tokens=False)["input_ids"]
        encoded.append(EncodedSample(np.array(p + c, dtype=np.int32), np.array([[len(p), len(p) + len(c)]],
                                                                               dtype=np.int32)))
    with torch.no_grad():
        loss, stats = PackedCausalLM(ours_model)(**model_inputs(to_torch(micro_batch(encoded)), torch.device("cpu")))
    return {"trl": trl_loss, "arc25_fast": float(loss) / float(stats[0]),
            "same_tokens": all(list(r["input_ids"]) == e.ids.tolist() for r, e in zip(rows, encoded))}


def validation_loss(args, adapter: str) -> float:
    """Answer-token loss of an adapter on the held-out samples: the same code for every trainer's adapter."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arc25_fast.data.encoding import EncodedSample
    from arc25_fast.data.stream import micro_batch, to_torch
    from arc25_fast.kernels import attention
    from arc25_fast.training.model import PackedCausalLM, model_inputs

    out = Path(args.out)
    val = json.loads((out / "samples.json").read_text())["val"]
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        out / "base", attn_implementation=attention.register("sdpa")), adapter).eval()
    packed = PackedCausalLM(model)
    total = n = 0.0
    for s in val:
        p = tok(s["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(s["completion"], add_special_tokens=False)["input_ids"]
        mb = to_torch(micro_batch([EncodedSample(np.array(p + c, dtype=np.int32),
                                                 np.array([[len(p), len(p) + len(c)]], dtype=np.int32))]))
        with torch.no_grad():
            loss, stats = packed(**model_inputs(mb, torch.device("cpu")))
        total, n = total + float(loss), n + float(stats[0])
    return total / n


# ---- orchestration -----------------------------------------------------------------------------------------------

def child(args, mode: str, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {extra} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="all", choices=["all", "prepare", "ours", "trl"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--batch-sizes", default="1,4,8", help="TRL padded runs ('' for none: packed TRL only)")
    ap.add_argument("--engine", default="deepspeed", choices=["deepspeed", "local"], help="arc25-fast's engine")
    ap.add_argument("--no-validation", action="store_true", help="skip the adapters' validation loss (CPU time)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--val-samples", type=int, default=24)
    ap.add_argument("--max-sample-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=2048, help="arc25-fast micro-batch and TRL packed row length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(QWEN2_TOKENIZER))
    args, _ = ap.parse_known_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.mode == "prepare":
        prepare(args)
        print(json.dumps({"ok": True}))
        return
    if args.mode == "ours":
        print(json.dumps(run_ours(args)))
        return
    if args.mode == "trl":
        print(json.dumps(run_trl(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    child(args, "prepare", [])
    configs = [("ours", [])] + [("trl", ["--batch", b]) for b in args.batch_sizes.split(",") if b] + \
        [("trl", ["--packing", "--batch", "1"])]
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for mode, extra in configs:
            result = child(args, mode, extra)
            runs.setdefault(result["name"], []).append(result)
            print(f"round {r + 1}: {result['name']}: {result['samples_per_s']:.3f} samples/s, "
                  f"{result['tokens_per_s']:,.0f} tokens/s, padding {result['padding_share']:.1%}, "
                  f"peak {result['peak_memory_bytes'] / 2**20:,.0f} MiB", flush=True)
    summary = {}
    for name, results in runs.items():
        summary[name] = {k: statistics.median(x[k] for x in results)
                         for k in ("samples_per_s", "tokens_per_s", "padding_share", "peak_memory_bytes", "samples")}
        summary[name]["val_loss"] = None if args.no_validation else validation_loss(args, results[-1]["adapter"])
        summary[name]["runs"] = results
    ours = summary["arc25-fast"]
    for name, s in summary.items():
        s["ours_samples_per_s_ratio"] = ours["samples_per_s"] / s["samples_per_s"]
        s["ours_tokens_per_s_ratio"] = ours["tokens_per_s"] / s["tokens_per_s"]
        s["ours_peak_memory_ratio"] = ours["peak_memory_bytes"] / s["peak_memory_bytes"]
    report = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
              "threads_per_run": args.threads, "versions": versions(), "first_batch_loss": first_batch_losses(args),
              "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads")},
              "samples": args.samples, "rounds": args.rounds, "wall_seconds": time.time() - started,
              "summary": summary}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(table(report))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "from the checkout"

    return {p: installed(p) for p in ("torch", "transformers", "trl", "peft", "arc25-fast")}


def table(report: dict) -> str:
    rows = ["| trainer | samples/s | real tokens/s | padding | peak memory | val loss | arc25-fast is (samples/s) |",
            "|---|---|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        rows.append(f"| {name} | {s['samples_per_s']:.3f} | {s['tokens_per_s']:,.0f} | {s['padding_share']:.1%} | "
                    f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB | "
                    f"{'-' if s['val_loss'] is None else format(s['val_loss'], '.4f')} | "
                    f"{s['ours_samples_per_s_ratio']:.2f}x |")
    loss = report["first_batch_loss"]
    return "\n".join(rows) + f"\n\nfirst-batch loss from the same weights: TRL {loss['trl']:.5f}, " \
                             f"arc25-fast {loss['arc25_fast']:.5f} (same token ids: {loss['same_tokens']})"


if __name__ == "__main__":
    main()
