"""GPU-only checks (they skip on CPU; ``scripts/gpu_check.sh`` runs them on a CUDA machine): the real varlen kernels
on packed batches in bf16, bitwise per sequence where the kernel can be made batch-invariant."""
import pytest
import torch
from test_reference_kernels import per_sample_reference

from arc25_fast.kernels import attention
from arc25_fast.training.model import PackedCausalLM, load_base_model, model_inputs

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")


def packed_qkv(lengths, heads=4, kv_heads=2, dim=64, dtype=torch.bfloat16):
    torch.manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, device="cuda", dtype=dtype)
    k = torch.randn(total, kv_heads, dim, device="cuda", dtype=dtype)
    v = torch.randn(total, kv_heads, dim, device="cuda", dtype=dtype)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return q, k, v, bounds


@pytest.mark.parametrize("window", [None, 37])
def test_torch_varlen_is_bitwise_per_sequence_with_one_split(window):
    if not attention.varlen_features()["num_splits"]:
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no num_splits (batch invariance needs torch>=2.12)")
    from torch.nn.attention.varlen import varlen_attn

    lengths = [300, 17, 1024, 5]
    q, k, v, bounds = packed_qkv(lengths)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    options = attention.varlen_keywords(window, None, q.shape[-1], gqa=True, batch_invariant=True)
    packed = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **options)
    for s, e in zip(bounds[:-1], bounds[1:]):
        one = torch.tensor([0, e - s], dtype=torch.int32, device="cuda")
        alone = varlen_attn(q[s:e], k[s:e], v[s:e], one, one, e - s, e - s, **options)
        assert torch.equal(packed[s:e], alone)


@pytest.mark.parametrize("window", [None, 37])
def test_torch_varlen_equals_per_sequence_sdpa_in_bf16(window):
    """Whatever this torch's varlen_attn signature: grouped-query heads and windows give SDPA's result per sample."""
    from torch.nn.attention.varlen import varlen_attn

    lengths = [300, 17, 1024, 5]
    q, k, v, bounds = packed_qkv(lengths)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    packed = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths),
                         **attention.varlen_keywords(window, None, q.shape[-1], gqa=True))
    for s, e in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(e - s, device="cuda")
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
        want = torch.nn.functional.scaled_dot_product_attention(
            *(x[s:e].transpose(0, 1).float() for x in (q, k, v)), attn_mask=allowed, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(packed[s:e].float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch-varlen", "flash-attn"])
def test_packed_equals_per_sample_in_bf16(default_mix, tiny_tokenizer, backend):
    if backend not in attention.available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} is not installed")
    from arc25_fast.data.encoding import FastEncoder
    from arc25_fast.data.options import PackingConfig
    from arc25_fast.data.stream import PackedStream, to_torch

    stream = PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=4000, buffer_size=32),
                          seed=3)
    batch = next(to_torch(b) for b in stream if len(b["cu_seqlens"]) >= 4)
    key = attention.register(backend)
    model = load_base_model("tiny", len(tiny_tokenizer), torch.bfloat16, key).cuda().eval()
    b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        loss, stats = PackedCausalLM(model)(**model_inputs(b, torch.device("cuda")))
        model.set_attn_implementation("eager")
        want = per_sample_reference(model, b)
    torch.testing.assert_close(loss.float() / stats[0].float(), want.float() / stats[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_gives_the_samples_of_the_eager_static_step(tiny_tokenizer, dtype):
    """``--decode graph`` replays one captured step; the replayed tokens are those of the eager step (the same
    kernels on the same buffers), with rows that stop early moving to smaller graphs."""
    from arc25_fast.solving import decoding

    model = load_base_model("tiny", len(tiny_tokenizer), dtype, "sdpa", 0).to("cuda").eval()
    prompts = [[5, 17, 33, 8, 90, 4], [7, 7, 12], [101, 3, 55, 21, 9, 14, 2, 60, 70]]
    args = dict(n=6, temperature=1.0, top_p=0.95, max_new_tokens=24, stop_ids=list(range(0, 400, 8)), seed=3,
                batch_size=3, device=torch.device("cuda"))
    static = decoding.sample(model, prompts, decode="static", **args)
    graph = decoding.sample(model, prompts, decode="graph", **args)
    assert graph == static
    assert len({len(s) for samples in graph for s in samples}) > 2
