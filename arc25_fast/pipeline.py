"""Building the data pipeline: the task mix, the encoder (fast when it can be exact), and the checks that run
before any training: token-exactness against the reference text path, and that samples fit the token budget."""
import numpy as np
from transformers import PreTrainedTokenizerBase

from .config import ConfigError, DataConfig
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
from .logs import note
from .rng import Rng
from .sources import Augmentation, Mix, load_mix
from .stream import Encoder, PackingConfig
from .synthetic import SyntheticConfig
from .tokenizer import load_tokenizer

VERIFY_STREAM = 1 << 20  # stream ids at and above this are never training streams
VALIDATION_STREAM = (1 << 20) + 1
FIT_PROBE_SAMPLES = 64


def build_mix(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> Mix:
    """The weighted task mix; invalid tasks stop here (or are counted with ``--skip-invalid``)."""
    aug = Augmentation(cfg.dihedral, cfg.color_permutation, cfg.keep_background, cfg.shuffle_examples,
                       cfg.train_as_test)
    synthetic = synthetic_config(cfg)
    mix = load_mix(cfg.task_sources, aug, synthetic, cfg.skip_invalid,
                   special_texts(tokenizer) if tokenizer is not None else ())
    for report in mix.reports:
        if report.skipped:
            note(f"{report.source}: skipped {len(report.skipped)} invalid task(s) of {report.loaded + len(report.skipped)}"
                 f", first: {report.skipped[0]}")
    return mix


def synthetic_config(cfg: DataConfig) -> SyntheticConfig:
    if cfg.synthetic_min_side > cfg.synthetic_max_side:
        raise ConfigError(f"--synthetic-min-side {cfg.synthetic_min_side} is more than --synthetic-max-side "
                          f"{cfg.synthetic_max_side}")
    return SyntheticConfig(max_calls=cfg.synthetic_max_calls, max_inputs=cfg.synthetic_max_inputs,
                           min_side=cfg.synthetic_min_side, max_side=cfg.synthetic_max_side,
                           noise=cfg.synthetic_noise, background=cfg.synthetic_background,
                           distinct_colors=cfg.synthetic_distinct_colors)


def build_encoder(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Encoder:
    """The fast encoder, or the reference one when asked for or (with ``auto``) when the tokenizer rules it out."""
    fmt = grid_format(cfg.grid_format)
    if cfg.encoder == "text":
        return TextEncoder(tokenizer, fmt, cfg.train_on)
    problem = digit_safety_problem(tokenizer)
    if problem is None:
        try:
            return FastEncoder(tokenizer, fmt, cfg.train_on)
        except TokenizerNotSupported as e:
            problem = str(e)
    if cfg.encoder == "fast":
        raise TokenizerNotSupported(f"tokenizer {tokenizer.name_or_path}: {problem}; the fast encoder cannot be "
                                    "exact with it (use --encoder text or auto)")
    note(f"warning: tokenizer {tokenizer.name_or_path}: {problem}; using the text encoder (slower, exact)")
    return TextEncoder(tokenizer, fmt, cfg.train_on)


def verify_encoder(encoder: Encoder, mix: Mix, n_samples: int, seed: int, cfg: DataConfig) -> Encoder:
    """Check the fast encoder against the text path on ``n_samples`` samples; ``auto`` falls back on a mismatch."""
    if not isinstance(encoder, FastEncoder) or n_samples <= 0:
        return encoder
    rng = Rng.for_block(seed, VERIFY_STREAM, 0, 0)
    reference = TextEncoder(encoder.tokenizer, encoder.fmt, encoder.train_on)
    try:
        verify_token_exact(encoder, reference, [mix.sample(rng) for _ in range(n_samples)])
    except TokenMismatchError as e:
        if cfg.encoder == "fast":
            raise
        note(f"warning: {e}; using the text encoder (slower, exact)")
        return reference
    return encoder


def check_samples_fit(encoder: Encoder, mix: Mix, cfg: DataConfig) -> None:
    """Fail before training when no sample fits the token budget (the stream would only drop samples)."""
    rng = Rng.for_block(cfg.seed, VERIFY_STREAM, 1, 0)
    lengths = np.array([len(encoder.encode(mix.sample(rng))) for _ in range(FIT_PROBE_SAMPLES)])
    if (lengths > cfg.max_tokens).all():
        raise DataError(f"no sample fits in max_tokens={cfg.max_tokens}: all {len(lengths)} samples probed are "
                        f"longer (shortest {lengths.min()} tokens, median {int(np.median(lengths))}); "
                        "raise --max-tokens")


def build_pipeline(cfg: DataConfig) -> tuple[Mix, Encoder]:
    tokenizer = load_tokenizer(cfg.tokenizer)
    mix = build_mix(cfg, tokenizer)
    encoder = verify_encoder(build_encoder(tokenizer, cfg), mix, cfg.verify_samples, cfg.seed, cfg)
    check_samples_fit(encoder, mix, cfg)
    return mix, encoder


def packing_config(cfg: DataConfig) -> PackingConfig:
    return PackingConfig(max_tokens=cfg.max_tokens, buffer_size=cfg.pack_buffer)
