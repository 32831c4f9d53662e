"""``arc25-fast merge-lora``: a LoRA adapter merged into its base model, saved with the tokenizer."""
import click

from ..training.model import merge_adapter


@click.command("merge-lora")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Base model (default: the one recorded in the adapter).")
def merge_lora(adapter, output, model):
    """Merge a LoRA adapter into its base model and save the result (with the tokenizer)."""
    merge_adapter(adapter, output, model)
    click.echo(f"wrote {output}")
