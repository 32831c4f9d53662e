"""Building the data pipeline: the task mix, the encoder (fast when it can be exact), and the checks that run
before any training: token-exactness against the reference text path, and that samples fit the token budget."""

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..runtime.logs import note
from ..runtime.rng import Rng
from .encoding import (
    FastEncoder,
    TextEncoder,
    TokenizerNotSupported,
    TokenMismatchError,
    digit_safety_problem,
    special_texts,
    verify_token_exact,
)
from .grid_formats import grid_format
from .grids import DataError
from .options import DataOptions, DataParts, PackingConfig
from .sources import Mix, load_mix
from .stream import Encoder
from .tokenizer import load_tokenizer

VERIFY_STREAM = 1 << 20  # stream ids at and above this are never training streams
VALIDATION_STREAM = (1 << 20) + 1
FIT_PROBE_SAMPLES = 64


def build_mix(cfg: DataParts, tokenizer: PreTrainedTokenizerBase | None = None) -> Mix:
    """The weighted task mix; invalid tasks stop here (or are counted with ``--skip-invalid``)."""
    mix = load_mix(cfg.sources.task_sources, cfg.augmentation, cfg.synthetic, cfg.data.skip_invalid,
                   special_texts(tokenizer) if tokenizer is not None else (), cfg.sources.train_as_test)
    for report in mix.reports:
        if report.skipped:
            note(f"{report.source}: skipped {len(report.skipped)} invalid task(s) of {report.loaded + len(report.skipped)}"
                 f", first: {report.skipped[0]}")
    return mix


def build_encoder(tokenizer: PreTrainedTokenizerBase, data: DataOptions) -> Encoder:
    """The fast encoder, or the reference one when asked for or (with ``auto``) when the tokenizer rules it out."""
    fmt = grid_format(data.grid_format)
    if data.encoder == "text":
        return TextEncoder(tokenizer, fmt, data.train_on)
    problem = digit_safety_problem(tokenizer)
    if problem is None:
        try:
            return FastEncoder(tokenizer, fmt, data.train_on)
        except TokenizerNotSupported as e:
            problem = str(e)
    if data.encoder == "fast":
        raise TokenizerNotSupported(f"tokenizer {tokenizer.name_or_path}: {problem}; the fast encoder cannot be "
                                    "exact with it (use --encoder text or auto)")
    note(f"warning: tokenizer {tokenizer.name_or_path}: {problem}; using the text encoder (slower, exact)")
    return TextEncoder(tokenizer, fmt, data.train_on)


def verify_encoder(encoder: Encoder, mix: Mix, data: DataOptions, n_samples: int | None = None) -> Encoder:
    """Check the fast encoder against the text path on ``n_samples`` samples (default ``--verify-samples``);
    ``auto`` falls back on a mismatch."""
    n_samples = data.verify_samples if n_samples is None else n_samples
    if not isinstance(encoder, FastEncoder) or n_samples <= 0:
        return encoder
    rng = Rng.for_block(data.seed, VERIFY_STREAM, 0, 0)
    reference = TextEncoder(encoder.tokenizer, encoder.fmt, encoder.train_on)
    try:
        verify_token_exact(encoder, reference, [mix.sample(rng) for _ in range(n_samples)])
    except TokenMismatchError as e:
        if data.encoder == "fast":
            raise
        note(f"warning: {e}; using the text encoder (slower, exact)")
        return reference
    return encoder


def check_samples_fit(encoder: Encoder, mix: Mix, seed: int, packing: PackingConfig) -> None:
    """Fail before training when no sample fits the token budget (the stream would only drop samples)."""
    rng = Rng.for_block(seed, VERIFY_STREAM, 1, 0)
    lengths = np.array([len(encoder.encode(mix.sample(rng))) for _ in range(FIT_PROBE_SAMPLES)])
    if (lengths > packing.max_tokens).all():
        raise DataError(f"no sample fits in max_tokens={packing.max_tokens}: all {len(lengths)} samples probed are "
                        f"longer (shortest {lengths.min()} tokens, median {int(np.median(lengths))}); "
                        "raise --max-tokens")


def checked_encoder(data: DataOptions, mix: Mix, tokenizer: PreTrainedTokenizerBase | None = None) -> Encoder:
    """The encoder of ``--tokenizer`` (or of ``tokenizer``, already loaded), checked against the text path on
    ``mix``'s samples."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
    return verify_encoder(build_encoder(tokenizer, data), mix, data)


def build_pipeline(cfg: DataParts) -> tuple[Mix, Encoder]:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mix = build_mix(cfg, tokenizer)
    encoder = checked_encoder(cfg.data, mix, tokenizer)
    check_samples_fit(encoder, mix, cfg.data.seed, cfg.packing)
    return mix, encoder
