"""Every architecture in docs/ARCHITECTURES.md either trains packed exactly like each sample alone, or is refused
with the reason the table gives — never trained silently wrong."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from arc25_fast.kernels import attention
from arc25_fast.training.model import ModelError, PackedCausalLM, check_packed_model, model_from_config

TABLE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURES.md"
ROWS = [m.groups() for m in re.finditer(r"^\| (\w+) \| (supported|refused) \| ([^|]*)\|$", TABLE.read_text(), re.M)]
WINDOW = 8
LENGTHS = (21, 9, 14)  # longer than the window: the window is reached
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {
    "mistral": dict(sliding_window=WINDOW), "mixtral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=16, final_logit_softcapping=3.0),
    "phi3": dict(sliding_window=WINDOW), "starcoder2": dict(sliding_window=WINDOW),
    "cohere2": dict(sliding_window=WINDOW, logit_scale=0.5), "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=0.5), "gpt_neox": dict(rotary_pct=0.5), "phi": dict(partial_rotary_factor=0.5),
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, n_positions=256), "bloom": dict(n_head=4, n_layer=2),
    "falcon": dict(num_kv_heads=2), "gpt_bigcode": dict(n_embd=64, n_head=4, n_layer=2, n_positions=256),
}


def tiny_model(model_type: str, key: str):
    config = AutoConfig.for_model(model_type)
    for name, value in {**SMALL, **EXTRA.get(model_type, {})}.items():
        try:
            setattr(config, name, value)
        except (AttributeError, TypeError):
            pass  # not an option of this config class (e.g. a derived property)
    if getattr(config, "layer_types", None) is not None:  # alternate sliding and full layers
        config.layer_types = ["sliding_attention" if getattr(config, "sliding_window", None) and i % 2 == 0
                              else "full_attention" for i in range(config.num_hidden_layers)]
    return model_from_config(config, key, torch.float32)


def packed_batch(vocab: int):
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, vocab, (n,), generator=gen) for n in LENGTHS]
    bounds = [0]
    for n in LENGTHS:
        bounds.append(bounds[-1] + n)
    flat = torch.cat(ids)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    label_positions = torch.tensor([b + t for b, n in zip(bounds, LENGTHS) for t in range(n - 1)])
    return ids, dict(input_ids=flat[None], position_ids=positions[None],
                     cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(LENGTHS), bounds=bounds,
                     label_positions=label_positions, targets=flat[label_positions + 1])


def test_the_table_lists_both_outcomes():
    kinds = {status for _, status, _ in ROWS}
    assert kinds == {"supported", "refused"} and len(ROWS) >= 25


@pytest.mark.parametrize("model_type,status,reason", ROWS, ids=[r[0] for r in ROWS])
def test_architecture_is_exact_when_packed_or_refused(model_type, status, reason):
    key = attention.register("sdpa")
    try:
        model = tiny_model(model_type, key)
        check_packed_model(model, key)
    except ModelError as e:
        assert status == "refused", f"{model_type} is listed as supported but was refused: {e}"
        message = str(e)
        assert "\n" not in message and message.startswith(f"model type {model_type}")
        assert reason.strip() in message
        return
    assert status == "supported", f"{model_type} is listed as refused but passed the packed check"
    ids, batch = packed_batch(model.config.vocab_size)
    model.eval()  # dropout off on both sides; gradients still flow
    packed = PackedCausalLM(model, chunk_tokens=7)
    loss, stats = packed(**batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_attn_implementation("eager")
    reference = sum(F.cross_entropy(model(input_ids=x[None], use_cache=False).logits[0, :-1].float(), x[1:],
                                    reduction="sum") for x in ids)
    reference.backward()
    assert int(stats[0]) == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-4)
    assert grads, "no gradient reached the model"
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, name=name: f"{model_type} gradient of {name}: {m}")
