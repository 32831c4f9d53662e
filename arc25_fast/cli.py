"""The ``arc25-fast`` command line: one command per module of ``commands``; bad input becomes one line and a
non-zero exit status."""
import os

import click

from .commands.evaluate import evaluate
from .commands.merge_lora import merge_lora
from .commands.profile_sampling_speed import profile_sampling_speed
from .commands.profile_seq_len import profile_seq_len
from .commands.search_and_learn import search_and_learn
from .commands.show_sample import show_sample
from .commands.train import train
from .commands.ttt import ttt
from .data.encoding import TokenMismatchError
from .runtime.distributed import CollectiveTimeout
from .runtime.faults import EXIT_BAD_INPUT, RunStopped
from .sandbox.isolation import SandboxUnavailable


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


for command in (train, ttt, search_and_learn, evaluate, profile_sampling_speed, profile_seq_len, show_sample,
                merge_lora):
    main.add_command(command)


if __name__ == "__main__":
    main()
