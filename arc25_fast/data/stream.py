"""Packed, padding-free micro-batches: deterministic streams, DataLoader workers, and the consumed position.

Each stream is deterministic in (seed, rank, stream). Sample ``uid`` is drawn in block ``uid // BLOCK`` with that
block's own generators, so any sample can be replayed from its uid alone; a stream's position is therefore a
small JSON-able state (the next uid, the uids waiting in the packing buffer, the bins packed but not yet
yielded), and restoring it makes a resumed run see exactly the micro-batches of the uninterrupted run.
"""
import atexit
import os
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..kernels.packing import assemble_micro_batch, best_fit_decreasing
from ..runtime.rng import Rng
from .encoding import EncodedSample, FastEncoder, TextEncoder
from .grids import DataError
from .options import PackingConfig
from .prompts import Sample


class SampleSource(Protocol):
    """Where a stream draws its samples: a task mix (``sources.Mix``) or any one source."""

    def sample(self, rng: Rng) -> Sample: ...


BLOCK = 256
MAX_CONSECUTIVE_DROPS = 1000  # a stream that drops this many samples in a row can produce nothing: stop
Encoder = FastEncoder | TextEncoder


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
    """Flat, padding-free micro-batch: input_ids, shifted labels, answer mask, position_ids, cu_seqlens, max_seqlen."""
    input_ids = np.concatenate([s.ids for s in samples]).astype(np.int64)
    lengths = np.array([len(s.ids) for s in samples], dtype=np.int64)
    span_counts = np.array([len(s.spans) for s in samples], dtype=np.int64)
    spans = np.concatenate([s.spans for s in samples]).astype(np.int64).reshape(-1, 2)
    labels, answer, position_ids, cu_seqlens, max_seqlen = assemble_micro_batch(lengths, span_counts, spans,
                                                                                input_ids)
    label_positions = np.flatnonzero(labels != -100)
    return {"input_ids": input_ids, "labels": labels, "answer": answer, "position_ids": position_ids,
            "cu_seqlens": cu_seqlens, "max_seqlen": int(max_seqlen), "n_samples": len(samples),
            "label_positions": label_positions, "targets": labels[label_positions],
            "target_answer": answer[label_positions], "n_labels": len(label_positions)}


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

    def __init__(self, mix: SampleSource, encoder: Encoder, packing: PackingConfig, seed: int, rank: int = 0,
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
        dropped_in_a_row, shortest = 0, None
        while len(self.buffer) < self.cfg.buffer_size:
            uid = self.next_uid
            self.next_uid += 1
            sample = self.encoder.encode(self.draw(uid))
            if len(sample) > self.cfg.max_tokens:
                self.stats.dropped += 1
                dropped_in_a_row += 1
                shortest = len(sample) if shortest is None else min(shortest, len(sample))
                if dropped_in_a_row >= MAX_CONSECUTIVE_DROPS:
                    raise DataError(f"no sample fits in max_tokens={self.cfg.max_tokens}: the last "
                                    f"{dropped_in_a_row} samples drawn were all longer (shortest {shortest} tokens); "
                                    "raise --max-tokens")
                continue
            dropped_in_a_row = 0
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
    out["answer"] = torch.from_numpy(batch["answer"]).unsqueeze(0).bool()
    for key in ("cu_seqlens", "label_positions", "targets"):
        out[key] = torch.from_numpy(batch[key])
    out["target_answer"] = torch.from_numpy(batch["target_answer"]).bool()
    out["bounds"] = batch["cu_seqlens"].tolist()
    return out


def as_is(batch: dict) -> dict:
    """DataLoader ``collate_fn``: numpy arrays cross from workers by pickle, far cheaper than tensors via shared
    memory for micro-batches this small; ``to_torch`` then wraps them without a copy."""
    return batch


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (even by ``kill -9``)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_init(worker_id: int) -> None:
    """A data worker: one torch thread, dies with its trainer, and leaves SIGINT/SIGTERM to the trainer, which
    finishes its step and checkpoints (it stops the workers itself)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != get_worker_info().dataset.trainer_pid:  # the trainer died before the line above took effect
        os._exit(1)


_LOADERS: "weakref.WeakSet[Loader]" = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    """Runs before multiprocessing's own exit hook, which would otherwise wait forever on a worker that ignores
    the SIGTERM it sends."""
    for it in list(_LOADERS):
        it.close()


class Loader:
    """Micro-batches as tensors, produced by ``num_workers`` processes (0: in this one).

    ``close`` (also run when the loader is dropped and at exit) ends the workers for sure. Torch's own shutdown
    is not enough here: the workers ignore SIGTERM (see ``worker_init``), and after a worker raised, its index
    queue can stop delivering the stop signal, leaving a worker that blocks the interpreter's exit.
    """

    def __init__(self, dataset: "PackedDataset", num_workers: int):
        self._batches = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=as_is,
                                        prefetch_factor=8 if num_workers else None,
                                        worker_init_fn=worker_init if num_workers else None))
        if num_workers:
            _LOADERS.add(self)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict:
        return to_torch(next(self._batches))

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._batches, "_workers", [])]

    def close(self) -> None:
        """Kill the workers (they hold nothing the trainer needs: the data position lives in the trainer), then let
        torch release its queues. Torch's SIGCHLD check is told first, or it would report the kill as a crash."""
        it = getattr(self, "_batches", None)  # None: the DataLoader itself failed to start
        workers = getattr(it, "_workers", [])
        if not workers or it._shutdown:
            return
        if it._worker_pids_set:
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(timeout=10)
        it._shutdown_workers()

    def __del__(self) -> None:
        self.close()


class PackedDataset(IterableDataset):
    """One ``PackedStream`` per DataLoader worker of this rank; yields numpy micro-batches (see ``loader``).

    ``resume`` is what ``DataPosition.state()`` saved: each stream's state and how many micro-batches the trainer
    consumed, so that the DataLoader's round-robin over workers picks up at the same stream as before.
    """

    def __init__(self, mix: SampleSource, encoder: Encoder, packing: PackingConfig, seed: int, rank: int, num_workers: int,
                 resume: dict | None = None):
        super().__init__()
        self.mix, self.encoder, self.packing = mix, encoder, packing
        self.seed, self.rank = seed, rank
        self.trainer_pid = os.getpid()
        self.num_streams = max(num_workers, 1)
        self.resume = resume or {"consumed": 0, "streams": {}}
        if self.resume["streams"] and self.resume.get("num_streams") != self.num_streams:
            raise ValueError(f"cannot resume the data stream with {self.num_streams} workers: it was saved with "
                             f"{self.resume.get('num_streams')} (use --num-workers {self.resume.get('num_streams')})")

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
