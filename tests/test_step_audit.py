"""The fixed cost of a step, pinned on the CPU: host syncs and operators of a training step and of a decode step
(``arc25_fast.runtime.step_audit``), and the local engine's steps equal to DeepSpeed's (same losses, same weights)."""
import numpy as np
import pytest
import torch

from arc25_fast.commands.configs import TrainConfig
from arc25_fast.data.options import PackingConfig
from arc25_fast.data.stream import PackedStream, to_torch
from arc25_fast.runtime.distributed import init_distributed
from arc25_fast.runtime.options import configure
from arc25_fast.runtime.step_audit import StepAudit
from arc25_fast.solving import decoding
from arc25_fast.training.engine import build_engine
from arc25_fast.training.local_engine import LocalEngine
from arc25_fast.training.model import load_base_model
from arc25_fast.training.trainer import build_model, optimizer_step, snapshot

CPU = torch.device("cpu")
# measured on the tiny model (2 layers), one micro-batch of 2 samples; a change that adds operators per step fails here
OPS_CEILING = {("local", "full"): 1160, ("local", "lora"): 1390}  # measured 1104 / 1322, +5 %


@pytest.fixture(scope="module")
def micro_batches(default_mix, tiny_tokenizer):
    from arc25_fast.data.encoding import FastEncoder

    init_distributed("cpu")
    stream = iter(PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=1200,
                                                                                       buffer_size=16), seed=5))
    return [to_torch(next(stream)) for _ in range(6)]


def engine_of(kind: str, lora: bool, tokenizer, grad_clip: float = 1.0):
    torch.manual_seed(0)
    cfg = configure(TrainConfig, lora=lora, dtype="fp32", engine=kind, lr=1e-3, grad_clip=grad_clip, tokenizer="tiny")
    _, packed, _ = build_model(cfg, len(tokenizer), CPU)
    return build_engine(cfg, packed, CPU, 1, 1)[0], packed


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_local_step_syncs_once_and_dispatches_few_operators(micro_batches, tiny_tokenizer, lora):
    engine, packed = engine_of("local", lora, tiny_tokenizer)
    optimizer_step(engine, micro_batches[:1], 1e-3, CPU, 1)  # first-step allocations (optimizer state) out of view
    with StepAudit(packed.parameters()) as audit:
        stats = optimizer_step(engine, micro_batches[1:2], 1e-3, CPU, 1)
    assert dict(audit.syncs) == {"tolist": 1}, audit.syncs  # the loss, the stats, the stop flag and the grad norm
    assert sum(audit.ops.values()) <= OPS_CEILING[("local", "full" if not lora else "lora")], audit.summary()
    assert np.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0


def test_the_deepspeed_step_syncs_where_the_audit_says(micro_batches, tiny_tokenizer):
    """DeepSpeed's step on one process, for comparison (docs/BENCHMARKS.md names each sync)."""
    engine, packed = engine_of("deepspeed", False, tiny_tokenizer)
    optimizer_step(engine, micro_batches[:1], 1e-3, CPU, 1)
    with StepAudit(packed.parameters()) as audit:
        optimizer_step(engine, micro_batches[1:2], 1e-3, CPU, 1)
    assert dict(audit.syncs) == {"tolist": 1, "all_reduce": 2, "item": 3}, audit.syncs


def test_the_audit_counts_device_reads_and_not_host_data():
    weight = torch.ones(3)
    host = torch.arange(4)
    with StepAudit([weight]) as audit:
        y = weight * 2
        y.sum().item()
        host.tolist()  # loader data: stays on the host on a GPU too
        float(weight[0])
        y.tolist()
        int(host[1])
    assert dict(audit.syncs) == {"item": 2, "tolist": 1}
    assert audit.ops["mul"] == 1


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_local_engine_steps_equal_deepspeed_steps(micro_batches, tiny_tokenizer, lora):
    """Same losses, gradient norms and weights after several steps (clipping active), fp32 on the CPU."""
    runs = {}
    for kind in ("deepspeed", "local"):
        engine, packed = engine_of(kind, lora, tiny_tokenizer, grad_clip=0.05)
        stats = [optimizer_step(engine, micro_batches[i:i + 2], 1e-3, CPU, 1) for i in range(0, 6, 2)]
        runs[kind] = (stats, snapshot(packed))
    for a, b in zip(runs["deepspeed"][0], runs["local"][0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert runs["deepspeed"][0][0]["grad_norm"] > 0.05  # clipping was exercised
    for name, w in runs["deepspeed"][1].items():
        torch.testing.assert_close(runs["local"][1][name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_step_leaves_weights_and_optimizer_state_unchanged(micro_batches, tiny_tokenizer):
    engine, packed = engine_of("local", False, tiny_tokenizer)
    assert isinstance(engine, LocalEngine)
    optimizer_step(engine, micro_batches[:1], 1e-3, CPU, 1)
    before = snapshot(packed)
    state = {k: v.clone() for k, v in engine.optimizer.state[engine.master[0]].items()}
    original = engine.module.forward
    engine.module.forward = lambda **kw: (lambda out: (out[0] * float("nan"), out[1]))(original(**kw))
    stats = optimizer_step(engine, micro_batches[1:2], 1e-3, CPU, 1)
    del engine.module.forward
    assert not np.isfinite(stats["grad_norm"])
    for name, w in snapshot(packed).items():
        assert torch.equal(w, before[name]), name
    for k, v in engine.optimizer.state[engine.master[0]].items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("decode", ["hf", "static"])
@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[5, 6, 7, 8, 9], [5, 6, 7]]],
                         ids=["one prompt", "prompts of two lengths"])
def test_a_decode_step_syncs_once(tiny_tokenizer, prompts, decode):
    """The shared-prefix sampler reads each step's picked tokens once (stopping rows is host logic). With prompts
    of different lengths transformers' forward also reads the padding mask back; the static step has no such read
    (its mask is built on the device), and no more operators than the forward it replaces."""
    model = load_base_model("tiny", len(tiny_tokenizer), torch.float32, "sdpa").eval()
    args = dict(seed=0, batch_size=2, device=CPU, decode=decode)
    decoding.sample(model, prompts, 4, 1.0, 1.0, 2, [], **args)
    with StepAudit(model.parameters()) as short:
        decoding.sample(model, prompts, 4, 1.0, 1.0, 3, [], **args)
    with StepAudit(model.parameters()) as long:
        decoding.sample(model, prompts, 4, 1.0, 1.0, 8, [], **args)
    per_step = {k: (long.syncs[k] - short.syncs[k]) / 5 for k in long.syncs}
    syncs = 2 if decode == "hf" and len(prompts) > 1 else 1
    assert sum(per_step.values()) == syncs and per_step["tolist"] == 1, (short.syncs, long.syncs)
    ops = (sum(long.ops.values()) - sum(short.ops.values())) / 5
    assert ops <= 380, ops  # 4 layers: 322-376 measured (hf), 347-355 (static)
