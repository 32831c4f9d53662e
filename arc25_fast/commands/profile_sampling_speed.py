"""``arc25-fast profile-sampling-speed``: samples/s and tokens/s of the data path against the reference text path."""
from pathlib import Path

import click

from ..data.profiling import profile_sampling_speed as run
from .configs import DataConfig, TrainConfig
from .flags import command_config, config_options
from .reports import write_json_report


@click.command("profile-sampling-speed")
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
    cfg = command_config(DataConfig, config_file, values, file_written_for=(TrainConfig,))
    if report_dir:
        json_path = json_path or str(Path(report_dir) / "sampling_speed.json")
        plot = plot or str(Path(report_dir) / "sample_lengths.png")
    report = run(cfg, n_samples, n_text_samples, [int(w) for w in workers.split(",") if w != ""],
                 Path(plot) if plot else None, log=click.echo)
    write_json_report(report, json_path)
