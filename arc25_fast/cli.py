"""The ``arc25-fast`` command line. Options are generated from the config dataclasses (help text and checks live
beside each field); ``--config FILE`` (YAML/JSON) sets them too, and command-line options override it."""
import json
import os
import sys
import types
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from .config import (
    EVAL_DATA_OPTIONS,
    SEARCH_EXCLUDED,
    TTT_EXCLUDED,
    DataConfig,
    EvalConfig,
    SearchConfig,
    TrainConfig,
    TTTConfig,
    field_default,
    flag_name,
    resolve,
)
from .encoding import TokenMismatchError
from .engine import CollectiveTimeout
from .faults import EXIT_BAD_INPUT, RunStopped
from .isolation import SandboxUnavailable


def _click_type(tp: Any):
    if isinstance(tp, types.UnionType):
        tp = next(t for t in tp.__args__ if t is not type(None))
    return {int: int, float: float, str: str}[tp]


def config_options(*classes, exclude: tuple[str, ...] = ()):
    """Click options for every field of the given config dataclasses (but ``exclude``), all defaulting to None
    (= not given)."""
    def decorator(f):
        for cls in reversed(classes):
            for fld in reversed([x for x in fields(cls) if x.name != "data" and x.name not in exclude]):
                text = f"{fld.metadata['help']} [default: {field_default(fld)}]"
                name = flag_name(fld)
                if fld.type is bool:
                    f = click.option(f"{name}/--no-{name[2:]}", fld.name, default=None, help=text)(f)
                elif fld.name == "task_sources":
                    f = click.option(name, fld.name, multiple=True, help=text)(f)
                else:
                    f = click.option(name, fld.name, type=_click_type(fld.type), default=None, help=text)(f)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML/JSON file of options; command-line options override it.")(f)
    return decorator


def given(values: dict) -> dict:
    """The options set on the command line (click passes None or () for the others)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None and v != ()}


def one_line(error: BaseException) -> str:
    """The error's message on one line; for an error re-raised from a DataLoader worker, the worker's own message."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(error).__name__


class Cli(click.Group):
    """Bad input becomes a one-line error and exit status 1 (ARC25_DEBUG=1 shows the traceback); a run stopped
    on purpose exits with its own status (see ``faults``)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RunStopped as e:
            click.echo(str(e), err=True)
            ctx.exit(e.exit_code)
        except (ValueError, TokenMismatchError, CollectiveTimeout, NotImplementedError, OSError,
                SandboxUnavailable) as e:
            if os.environ.get("ARC25_DEBUG"):
                raise
            rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
            # under a launcher, another rank's progress bar may have left a line open: start a line of our own
            click.echo(f"{chr(10) if rank else ''}Error: {rank}{one_line(e)}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=Cli)
def main():
    """arc25-fast: train code LLMs on ARC tasks with packed, padding-free batches."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed (imported by transformers too) would warn that it probed for one
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@main.command()
@config_options(TrainConfig, DataConfig)
def train(config_file, **values):
    """Train on one process (same DeepSpeed engine as train_ds.py)."""
    cfg = resolve(TrainConfig, config_file, given(values))
    from .train import train as run

    run(cfg)


@main.command()
@config_options(TTTConfig, DataConfig, exclude=TTT_EXCLUDED)
def ttt(config_file, **values):
    """Test-time training: an adapter per task (or --shared) from each task's demo pairs, leave-one-out."""
    cfg = resolve(TTTConfig, config_file, given(values))
    from .ttt import ttt as run

    run(cfg)


@main.command("search-and-learn")
@config_options(SearchConfig, DataConfig, exclude=SEARCH_EXCLUDED)
def search_and_learn(config_file, **values):
    """Per task: sample programs, run them in the sandbox, fine-tune on what they really did (hindsight), sample
    again; one resident process per rank, tasks from a shared queue; the evaluate ranking over all rounds."""
    cfg = resolve(SearchConfig, config_file, given(values))
    from .search_and_learn import search_and_learn as run

    run(cfg)


@main.command()
@config_options(EvalConfig, DataConfig, exclude=tuple(f.name for f in fields(DataConfig)
                                                      if f.name not in EVAL_DATA_OPTIONS))
def evaluate(config_file, **values):
    """Sample answers, run programs in a sandbox, score pass@k; write predictions, a submission and HER lines."""
    cfg = resolve(EvalConfig, config_file, given(values))
    from .evaluate import evaluate as run

    run(cfg)


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
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write sampling_speed.json and sample_lengths.png into this folder (e.g. profile-seq-len's).")
def profile_sampling_speed(config_file, n_samples, n_text_samples, workers, json_path, plot, report_dir, **values):
    """Samples/s and tokens/s of the data path, per source and for the mix, against the text path."""
    from .profiling import profile_sampling_speed as run

    cfg = resolve(DataConfig, config_file, given(values))
    if report_dir:
        json_path = json_path or str(Path(report_dir) / "sampling_speed.json")
        plot = plot or str(Path(report_dir) / "sample_lengths.png")
    report = run(cfg, n_samples, n_text_samples, [int(w) for w in workers.split(",") if w != ""],
                 Path(plot) if plot else None, log=click.echo)
    _write_json(report, json_path)


PROFILE_EXCLUDED = ("output_dir", "overwrite", "resume", "eval_every", "val_source", "val_samples", "save_every",
                    "keep_checkpoints", "log_every", "wandb", "wandb_project", "num_workers", "global_batch_tokens",
                    "global_batch_samples", "max_steps", "max_bad_steps", "warmup_steps", "lr", "lr_schedule",
                    "weight_decay", "grad_accum", "max_tokens", "pack_buffer", "eval_tasks", "eval_tasks_every",
                    "eval_max_tasks", "eval_samples", "eval_prompt_kind", "eval_max_new_tokens", "collective_timeout",
                    "unsafe_sandbox")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@main.command("profile-seq-len")
@config_options(TrainConfig, DataConfig, exclude=PROFILE_EXCLUDED)
@click.option("--grid-sides", default="5,10,20,30", show_default=True, help="Grid sides of the profiled samples.")
@click.option("--demo-pairs", default="3", show_default=True, help="Demo pairs of the profiled samples.")
@click.option("--budgets", default="1024,2048,4096,8192,16384,32768", show_default=True,
              help="Micro-batch token budgets (max_tokens) to time.")
@click.option("--steps", default=3, show_default=True, help="Timed steps per point (after --warmup).")
@click.option("--warmup", default=1, show_default=True, help="Untimed steps per point.")
@click.option("--oom-search/--no-oom-search", default=True, show_default=True,
              help="On GPU: find the largest token budget that fits, per input size.")
@click.option("--lengths-only", is_flag=True, help="Only the sample-length statistics of --task-source (no training).")
@click.option("--n-samples", default=2000, show_default=True, help="Samples per source for the length statistics.")
@click.option("--report", "report_dir", default="runs/profile-seq-len", show_default=True,
              type=click.Path(file_okay=False), help="Report folder: report.json, points.csv, table.md, PNG plots.")
def profile_seq_len(config_file, grid_sides, demo_pairs, budgets, steps, warmup, oom_search, lengths_only, n_samples,
                    report_dir, **values):
    """Training speed against input size: tokens/s, samples/s, step split, memory and MFU per grid side, demo
    pairs and token budget; and the sample-length statistics of the training mix."""
    cfg = resolve(TrainConfig, config_file, given(values))
    report_dir = Path(report_dir)
    if lengths_only:
        from .profiling import profile_seq_len as lengths

        report = lengths(cfg.data, n_samples, report_dir / "sample_lengths.png", log=click.echo)
        _write_json(report, str(report_dir / "lengths.json"))
        return
    from .profile_training import profile_training

    sides, pairs, sizes = _ints(grid_sides), _ints(demo_pairs), _ints(budgets)
    if not sides or not pairs or not sizes or min(sides) < 1 or max(sides) > 30 or min(pairs) < 0 or min(sizes) < 64:
        raise click.BadParameter("grid sides 1..30, demo pairs >= 0, budgets >= 64, each list non-empty")
    profile_training(cfg, sides, pairs, sizes, steps, warmup, oom_search, report_dir, n_samples, log=click.echo)


@main.command("show-sample")
@config_options(DataConfig)
@click.option("--index", default=0, show_default=True, help="Which sample of the seed's first stream.")
@click.option("--color/--no-color", default=None, help="Colour the trained spans (default: when writing to a "
                                                         "terminal).")
def show_sample(config_file, index, color, **values):
    """Print one decoded sample, every trained span (demo outputs with --train-on, the answer) told apart."""
    from .pipeline import build_pipeline, packing_config
    from .stream import PackedStream

    cfg = resolve(DataConfig, config_file, given(values))
    mix, encoder = build_pipeline(cfg)
    sample = PackedStream(mix, encoder, packing_config(cfg), cfg.seed).draw(index)
    enc = encoder.encode(sample)
    tok = encoder.tokenizer
    click.echo(f"# {sample.source} task {sample.task_id}: {len(enc.ids)} tokens, {enc.n_trained} trained in "
               f"{len(enc.spans)} span(s) (--train-on {cfg.train_on})")
    pieces, pos = [], 0
    for start, end in enc.spans.tolist():
        pieces += [(tok.decode(enc.ids[pos:start]), False), (tok.decode(enc.ids[start:end]), True)]
        pos = end
    pieces.append((tok.decode(enc.ids[pos:]), False))
    if color if color is not None else sys.stdout.isatty():
        click.echo("".join(click.style(t, fg="green", bold=True) if trained else t for t, trained in pieces),
                   color=True)
    else:
        click.echo("".join(f"[[trained]]{t}[[/trained]]" if trained else t for t, trained in pieces))


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
