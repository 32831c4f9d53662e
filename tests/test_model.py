"""Packed batches compute exactly what each sample alone computes; the step loss ignores how samples are split."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arc25_fast.commands.configs import TrainConfig
from arc25_fast.data.encoding import FastEncoder
from arc25_fast.data.options import PackingConfig
from arc25_fast.data.stream import PackedStream, micro_batch, to_torch
from arc25_fast.kernels import attention
from arc25_fast.kernels.loss import chunked_cross_entropy
from arc25_fast.runtime.distributed import init_distributed
from arc25_fast.runtime.options import configure
from arc25_fast.training.engine import build_engine
from arc25_fast.training.model import PackedCausalLM, load_base_model, model_inputs
from arc25_fast.training.trainer import build_model, optimizer_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(default_mix, tiny_tokenizer):
    stream = PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=3000, buffer_size=32),
                          seed=0)
    it = iter(stream)
    b = next(b for b in it if len(b["cu_seqlens"]) >= 4)
    return to_torch(b)


def per_sample_loss(model, batch):
    """Reference: each sample alone through the plain model (eager attention), full logits, summed CE."""
    cu = batch["cu_seqlens"].tolist()
    total = 0.0
    for s, e in zip(cu[:-1], cu[1:]):
        logits = model(input_ids=batch["input_ids"][:, s:e]).logits[0].float()
        total = total + F.cross_entropy(logits, batch["labels"][0, s:e], ignore_index=-100, reduction="sum")
    return total


@pytest.mark.parametrize("backend", attention.BACKENDS)
def test_packed_equals_unpacked_loss_and_gradients(batch, tiny_tokenizer, backend):
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if backend not in attention.available_backends(device):
        pytest.skip(f"attention backend {backend} needs {'the flash-attn package and ' if backend == 'flash-attn' else ''}"
                    "a CUDA GPU")
    dtype = torch.float32 if backend == "sdpa" else torch.bfloat16
    model = load_base_model("tiny", len(tiny_tokenizer), dtype, attention.register(backend)).to(device)
    packed = PackedCausalLM(model, chunk_tokens=257)
    b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    loss, stats = packed(**model_inputs(b, device))
    n = int(stats[0])
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("eager")
    ref = per_sample_loss(model, b)
    (ref / n).backward()
    # fp32: only summation order differs; bf16 kernels vs eager attention differ by rounding
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert n == int((b["labels"] != -100).sum())
    torch.testing.assert_close(loss, ref, **tol)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, **tol, msg=lambda m, k=k: f"gradient of {k}: {m}")


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.25, None), (1.0, 3.0), (2.0, 5.0)])
def test_chunked_cross_entropy_matches_full(scale, softcap):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (50,))
    labels[::3] = -100
    answer = torch.zeros(50, dtype=torch.bool)
    answer[30:] = True
    logits = hidden @ weight.T * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_losses = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    full = token_losses.sum()
    gh, gw = torch.autograd.grad(full, (hidden, weight))
    positions = (labels != -100).nonzero().squeeze(1)
    for chunk in (1, 7, 1000):
        loss, stats = chunked_cross_entropy(hidden, lambda h: h @ weight.T, positions, labels[positions],
                                            answer[positions], chunk, scale, softcap)
        ch, cw = torch.autograd.grad(loss, (hidden, weight))
        right = (logits.argmax(-1) == labels) & (labels != -100)
        assert stats[0] == len(positions) and stats[1] == int(right.sum())
        torch.testing.assert_close(float(stats[2]), float(token_losses[answer].sum().detach()), rtol=1e-5, atol=1e-5)
        assert stats[3] == int((answer & (labels != -100)).sum()) and stats[4] == int((right & answer).sum())
        torch.testing.assert_close(loss, full)
        torch.testing.assert_close(ch, gh)
        torch.testing.assert_close(cw, gw)


def test_step_is_the_same_for_1_or_4_micro_batches(default_mix, tiny_tokenizer):
    init_distributed("cpu")
    stream = PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=1500, buffer_size=32),
                          seed=2)
    it = iter(stream)
    quarters = [to_torch(next(it)) for _ in range(4)]
    whole = micro_batch([s for uid in np.concatenate([q["uids"] for q in quarters])
                         for s in [stream.encoder.encode(stream.draw(int(uid)))]])
    whole = to_torch(whole)
    cfg = configure(TrainConfig, max_tokens=6000, lora=False, lr=1e-2, grad_clip=0.0)
    results = []
    for micro, grad_accum in (([whole], 1), (quarters, 4)):
        _, packed, _ = build_model(cfg, len(tiny_tokenizer), CPU)
        engine, _ = build_engine(cfg, packed, CPU, grad_accum, world=1)
        stats = optimizer_step(engine, micro, cfg.optim.lr, CPU, world=1)
        norm = float(engine.get_global_grad_norm())
        results.append((stats["loss"], norm, [p.detach().clone() for p in packed.parameters()]))
    (loss_1, norm_1, weights_1), (loss_4, norm_4, weights_4) = results
    assert loss_1 == pytest.approx(loss_4, rel=1e-6)
    assert norm_1 == pytest.approx(norm_4, rel=1e-5)
    for a, b in zip(weights_1, weights_4):  # Adam's first step moves every weight by ~lr: agree to 1% of it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def _flat_state(obj, prefix=""):
    """Every tensor of a (nested) optimizer state, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj.detach().clone()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: v for key, value in items for k, v in _flat_state(value, f"{prefix}/{key}").items()}


def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(default_mix, tiny_tokenizer):
    init_distributed("cpu")
    stream = PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=1500, buffer_size=32),
                          seed=4)
    it = iter(stream)
    good, poisoned = to_torch(next(it)), to_torch(next(it))
    cfg = configure(TrainConfig, max_tokens=1500, lr=1e-2)
    _, packed, _ = build_model(cfg, len(tiny_tokenizer), CPU)
    engine, _ = build_engine(cfg, packed, CPU, 1, world=1)
    first = optimizer_step(engine, [good], cfg.optim.lr, CPU, world=1)
    assert np.isfinite(first["loss"]) and np.isfinite(first["grad_norm"])
    weights = {n: p.detach().clone() for n, p in packed.named_parameters() if p.requires_grad}
    state = _flat_state(engine.optimizer.state_dict())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "exp_avg" in k)  # Adam has moments to keep
    with torch.no_grad():  # a real overflow: a frozen embedding row the batch uses becomes inf
        packed.causal_lm.get_input_embeddings().weight[int(poisoned["input_ids"][0, 5])] = float("inf")
    second = optimizer_step(engine, [poisoned], cfg.optim.lr, CPU, world=1)
    assert not (np.isfinite(second["loss"]) and np.isfinite(second["grad_norm"]))
    for name, p in packed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, weights[name]), name
    after = _flat_state(engine.optimizer.state_dict())
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("trainable,bias,scale,softcap", [(False, False, 1.0, None), (True, True, 0.3, 4.0),
                                                          (True, False, 2.0, None)])
def test_fused_linear_cross_entropy_equals_autograd(trainable, bias, scale, softcap):
    """A plain linear head takes the fused path: loss and gradients computed together, nothing recomputed."""
    from torch import nn

    torch.manual_seed(0)
    hidden = torch.randn(60, 16, requires_grad=True)
    head = nn.Linear(16, 50, bias=bias)
    head.weight.requires_grad_(trainable)
    targets, positions = torch.randint(0, 50, (60,)), torch.arange(0, 60, 2)
    answer = positions >= 40
    wrt = [hidden] + ([head.weight] + ([head.bias] if bias else []) if trainable else [])
    loss, stats = chunked_cross_entropy(hidden, head, positions, targets[positions], answer, 7, scale, softcap)
    grads = torch.autograd.grad(loss, wrt)
    logits = head(hidden[positions]) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_losses = F.cross_entropy(logits, targets[positions], reduction="none")
    want = torch.autograd.grad(token_losses.sum(), wrt)
    torch.testing.assert_close(loss, token_losses.sum())
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert stats[0] == 30 and stats[3] == int(answer.sum())
    assert stats[1] == int((logits.argmax(-1) == targets[positions]).sum())
    torch.testing.assert_close(float(stats[2]), float(token_losses[answer].sum().detach()), rtol=1e-5, atol=1e-5)


def test_the_adapter_init_is_seeded_for_a_saved_base_model(tiny_tokenizer, tmp_path):
    """A base model loaded from disk draws no seeded random numbers of its own: LoRA A must still start the same."""
    load_base_model("tiny", len(tiny_tokenizer), torch.float32, "sdpa", 0).save_pretrained(tmp_path / "base")
    cfg = configure(TrainConfig, model=str(tmp_path / "base"))
    torch.manual_seed(123)  # whatever ran before
    first = {n: p.detach().clone() for n, p in build_model(cfg, len(tiny_tokenizer), CPU)[1].named_parameters()
             if p.requires_grad}
    torch.manual_seed(456)
    second = {n: p for n, p in build_model(cfg, len(tiny_tokenizer), CPU)[1].named_parameters() if p.requires_grad}
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    assert any(first[n].abs().sum() > 0 for n in first if "lora_A" in n)
