"""``arc25-fast show-sample``: one decoded training sample, every trained span told apart."""
import sys

import click

from ..data.pipeline import build_pipeline
from ..data.stream import PackedStream
from .configs import DataConfig, TrainConfig
from .flags import command_config, config_options


@click.command("show-sample")
@config_options(DataConfig)
@click.option("--index", default=0, show_default=True, help="Which sample of the seed's first stream.")
@click.option("--color/--no-color", default=None, help="Colour the trained spans (default: when writing to a "
                                                         "terminal).")
def show_sample(config_file, index, color, **values):
    """Print one decoded sample, every trained span (demo outputs with --train-on, the answer) told apart."""
    cfg = command_config(DataConfig, config_file, values, file_written_for=(TrainConfig,))
    mix, encoder = build_pipeline(cfg)
    sample = PackedStream(mix, encoder, cfg.packing, cfg.data.seed).draw(index)
    enc = encoder.encode(sample)
    tok = encoder.tokenizer
    click.echo(f"# {sample.source} task {sample.task_id}: {len(enc.ids)} tokens, {enc.n_trained} trained in "
               f"{len(enc.spans)} span(s) (--train-on {cfg.data.train_on})")
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
