"""The CUDA attention backends' code, run on CPU with reference kernels of exactly the CUDA kernels' signatures:
packed == per-sample (loss and gradients, fp32) through the torch-varlen and flash-attn paths, windows, GQA and
soft-capping included; misuse (trailing rows, int64 cu_seqlens, short max_seqlen) is caught."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from test_architectures import tiny_model

from arc25_fast.data.options import PackingConfig
from arc25_fast.data.stream import PackedStream, to_torch
from arc25_fast.kernels import attention, reference
from arc25_fast.training.model import ModelError, PackedCausalLM, check_packed_model, load_base_model, model_inputs

CPU = torch.device("cpu")


@pytest.fixture
def swapped(monkeypatch):
    """The CUDA kernels replaced by the references, as tests do instead of a GPU."""
    monkeypatch.setitem(attention.KERNELS, "torch-varlen", reference.varlen_attn)
    monkeypatch.setitem(attention.KERNELS, "flash-attn", reference.flash_attn_varlen_func)


def test_references_have_the_kernels_signatures():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    if attention.varlen_features(varlen_attn)["num_splits"]:  # the signature the reference mirrors (torch 2.12+)
        assert shape(varlen_attn) == shape(reference.varlen_attn)
    else:  # an older torch's kernel takes a subset of its keywords (varlen_keywords passes only those it has)
        names = {name for name, _, _ in shape(reference.varlen_attn)} | {"is_causal"}  # torch 2.10's causal flag
        assert {name for name, _, _ in shape(varlen_attn)} <= names, shape(varlen_attn)
    params = list(inspect.signature(reference.flash_attn_varlen_func).parameters)
    assert params == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                      "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
                      "return_attn_probs", "block_table"]  # flash-attn 2.8


def test_reference_matches_causal_sdpa_per_segment():
    torch.manual_seed(0)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    out = reference.varlen_attn(q, k, v, cu, cu, 7, 7, window_size=(-1, 0), enable_gqa=True)
    for s, e in ((0, 4), (4, 11)):
        want = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                              is_causal=True, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[s:e], want)
    with pytest.raises(ValueError, match="enable_gqa"):
        reference.varlen_attn(q, k, v, cu, cu, 7, 7)
    with pytest.raises(TypeError, match="int32"):
        reference.varlen_attn(q, k, v, cu.long(), cu.long(), 7, 7, enable_gqa=True)
    with pytest.raises(ValueError, match="max_seqlen 5 is shorter"):
        reference.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    padded = torch.cat([q, torch.randn(3, 4, 8)])
    rows = reference.varlen_attn(padded, torch.cat([k, torch.randn(3, 2, 8)]), torch.cat([v, torch.randn(3, 2, 8)]),
                                 cu, cu, 7, 7, window_size=(-1, 0), enable_gqa=True)
    assert torch.isnan(rows[11:]).all() and not torch.isnan(rows[:11]).any()  # what trailing rows would get


@pytest.fixture(scope="module")
def real_batch(default_mix, tiny_tokenizer):
    from arc25_fast.data.encoding import FastEncoder

    stream = PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=2500, buffer_size=24),
                          seed=3)
    return next(to_torch(b) for b in stream if len(b["cu_seqlens"]) >= 4)


def per_sample_reference(model, batch):
    cu = batch["cu_seqlens"].tolist()
    return sum(F.cross_entropy(model(input_ids=batch["input_ids"][:, s:e], use_cache=False).logits[0].float(),
                               batch["labels"][0, s:e], ignore_index=-100, reduction="sum")
               for s, e in zip(cu[:-1], cu[1:]))


def assert_packed_equals_per_sample(model, inputs, reference_loss_fn):
    packed = PackedCausalLM(model, chunk_tokens=300)
    loss, _ = packed(**inputs)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    key = model.config._attn_implementation
    model.set_attn_implementation("eager")
    want = reference_loss_fn()
    want.backward()
    model.set_attn_implementation(key)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["torch-varlen", "flash-attn"])
def test_cuda_backend_code_on_a_real_packed_batch(swapped, real_batch, tiny_tokenizer, backend):
    model = load_base_model("tiny", len(tiny_tokenizer), torch.float32, attention.register(backend)).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA goes through the kernel
    check_packed_model(model, attention.register(backend))
    assert_packed_equals_per_sample(model, model_inputs(real_batch, CPU), lambda: per_sample_reference(model, real_batch))


@pytest.mark.parametrize("backend", ["torch-varlen", "flash-attn"])
@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gemma2", "gpt_neox"])
def test_cuda_backend_code_with_windows_and_soft_caps(swapped, backend, model_type):
    from test_architectures import LENGTHS, packed_batch

    key = attention.register(backend)
    model = tiny_model(model_type, key).eval()
    if model_type == "gemma2" and backend == "torch-varlen":
        with pytest.raises(ModelError, match="soft-capping, which torch's varlen_attn does not implement"):
            check_packed_model(model, key)
        return
    check_packed_model(model, key)
    ids, inputs = packed_batch(model.config.vocab_size)
    assert max(LENGTHS) > (getattr(model.config, "sliding_window", None) or 0)  # any window is reached
    assert_packed_equals_per_sample(model, inputs, lambda: sum(
        F.cross_entropy(model(input_ids=x[None], use_cache=False).logits[0, :-1].float(), x[1:], reduction="sum")
        for x in ids))


def test_trailing_rows_are_refused_before_the_kernel(swapped, real_batch, tiny_tokenizer):
    model = load_base_model("tiny", len(tiny_tokenizer), torch.float32, attention.register("torch-varlen"))
    inputs = model_inputs(real_batch, CPU)
    inputs["bounds"] = inputs["bounds"][:-1]  # the last sample's rows now trail past the declared samples
    inputs["cu_seqlens"] = inputs["cu_seqlens"][:-1]
    with pytest.raises(ValueError, match="packed batch holds .* tokens but its samples end at"):
        PackedCausalLM(model)(**inputs)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch 2.11's ``varlen_attn`` signature: windows and a scale, grouped-query K/V taken natively, no
    ``enable_gqa`` or ``num_splits``."""
    return reference.varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                 scale=scale, window_size=window_size, enable_gqa=True)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's: ``is_causal`` only."""
    return reference.varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                 window_size=(-1, 0) if is_causal else (-1, -1), enable_gqa=True)


@pytest.mark.parametrize("kernel", [varlen_attn_2_11, varlen_attn_2_10], ids=["torch-2.11", "torch-2.10"])
def test_older_varlen_signatures_train_exactly(monkeypatch, real_batch, tiny_tokenizer, kernel):
    """An older torch's kernel gets only the keywords it has: the packed loss and gradients still equal per-sample."""
    monkeypatch.setitem(attention.KERNELS, "torch-varlen", kernel)
    assert not attention.varlen_features()["enable_gqa"]
    model = load_base_model("tiny", len(tiny_tokenizer), torch.float32, attention.register("torch-varlen")).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    check_packed_model(model, attention.register("torch-varlen"))
    assert_packed_equals_per_sample(model, model_inputs(real_batch, CPU), lambda: per_sample_reference(model, real_batch))


def test_a_feature_the_installed_varlen_lacks_names_the_torch_that_has_it(monkeypatch):
    from test_architectures import tiny_model

    monkeypatch.setitem(attention.KERNELS, "torch-varlen", varlen_attn_2_10)
    key = attention.register("torch-varlen")
    with pytest.raises(ModelError, match=r"sliding-window attention needs torch>=2\.11 for --attn torch-varlen"):
        check_packed_model(tiny_model("mistral", key).eval(), key)
    monkeypatch.setitem(attention.KERNELS, "torch-varlen", varlen_attn_2_11)
    with pytest.raises(attention.PackedAttentionUnsupported, match=r"num_splits=1\) needs torch>=2\.12"):
        attention.varlen_keywords(None, None, 64, gqa=True, batch_invariant=True)
    monkeypatch.setitem(attention.KERNELS, "torch-varlen", reference.varlen_attn)
    assert attention.varlen_keywords(5, 0.5, 64, gqa=True, batch_invariant=True) == {
        "window_size": (4, 0), "scale": 0.5, "enable_gqa": True, "num_splits": 1}
