"""Best-fit-decreasing packing of samples into micro-batches, and padding-free micro-batch assembly."""
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def best_fit_decreasing(lengths: np.ndarray, capacity: int):
    """Assign each item to a bin of size ``capacity``; items longer than ``capacity`` get bin -1.

    Items are placed longest first, each into the open bin it fills most tightly.
    Returns (bin index per item, load per bin).
    """
    n = lengths.shape[0]
    order = np.argsort(-lengths, kind="mergesort")
    bin_of = np.full(n, -1, dtype=np.int64)
    loads = np.zeros(n, dtype=np.int64)
    n_bins = 0
    for k in range(n):
        i = order[k]
        size = lengths[i]
        if size > capacity or size <= 0:
            continue
        best = -1
        best_room = capacity + 1
        for b in range(n_bins):
            room = capacity - loads[b]
            if size <= room < best_room:
                best = b
                best_room = room
                if room == size:
                    break
        if best < 0:
            best = n_bins
            n_bins += 1
        bin_of[i] = best
        loads[best] += size
    return bin_of, loads[:n_bins]


@njit(cache=True, nogil=True)
def assemble_micro_batch(lengths: np.ndarray, span_counts: np.ndarray, spans: np.ndarray, input_ids: np.ndarray):
    """Labels, answer mask, position ids and cu_seqlens for samples laid end to end in ``input_ids``.

    Sample ``s`` has ``span_counts[s]`` trained ranges ``spans[k] = (start, end)`` (token indices within the sample,
    ``start >= 1``), its answer last. Labels are already shifted: ``labels[t]`` is the token that position ``t`` must
    predict, or -100; ``answer[t]`` is 1 where that token belongs to the answer span. A label never crosses a sample
    boundary, so the last position of a sample never predicts the next sample's first token.
    """
    total = input_ids.shape[0]
    labels = np.full(total, -100, dtype=np.int64)
    answer = np.zeros(total, dtype=np.uint8)
    position_ids = np.empty(total, dtype=np.int64)
    cu_seqlens = np.empty(lengths.shape[0] + 1, dtype=np.int32)
    cu_seqlens[0] = 0
    offset = 0
    k = 0
    max_seqlen = 0
    for s in range(lengths.shape[0]):
        length = lengths[s]
        for t in range(length):
            position_ids[offset + t] = t
        for j in range(span_counts[s]):
            start = max(spans[k, 0], 1)
            end = min(spans[k, 1], length)
            for t in range(start - 1, end - 1):
                labels[offset + t] = input_ids[offset + t + 1]
                if j == span_counts[s] - 1:
                    answer[offset + t] = 1
            k += 1
        offset += length
        cu_seqlens[s + 1] = offset
        if length > max_seqlen:
            max_seqlen = length
    return labels, answer, position_ids, cu_seqlens, max_seqlen
