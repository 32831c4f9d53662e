"""``arc25-fast profile-seq-len``: training speed against input size, and the sample lengths of the training mix."""
from pathlib import Path

import click

from ..data.profiling import profile_seq_len as lengths
from ..runtime.startup import start
from ..training.profiling import profile_training
from .configs import ProfileConfig, TrainConfig
from .flags import command_config, config_options
from .reports import write_json_report


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("profile-seq-len")
@config_options(ProfileConfig)
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
    cfg = command_config(ProfileConfig, config_file, values, file_written_for=(TrainConfig,))
    report_dir = Path(report_dir)
    if lengths_only:
        report = lengths(cfg, n_samples, report_dir / "sample_lengths.png", log=click.echo)
        write_json_report(report, str(report_dir / "lengths.json"))
        return
    sides, pairs, sizes = _ints(grid_sides), _ints(demo_pairs), _ints(budgets)
    if not sides or not pairs or not sizes or min(sides) < 1 or max(sides) > 30 or min(pairs) < 0 or min(sizes) < 64:
        raise click.BadParameter("grid sides 1..30, demo pairs >= 0, budgets >= 64, each list non-empty")
    started = start("profile", cfg.host, group="launcher", log_dir=report_dir)
    profile_training(cfg, started, sides, pairs, sizes, steps, warmup, oom_search, report_dir, n_samples,
                     log=click.echo)
