"""Adapters on the embeddings and the LM head: the chunked loss includes the head's low-rank term (tied embeddings
included), the saved adapter reloads and reproduces the trained logits, merging works, and what the loss cannot
honour is refused."""
import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from test_reference_kernels import per_sample_reference
from transformers import AutoModelForCausalLM, Qwen2Config

from arc25_fast.cli import main
from arc25_fast.commands.configs import TrainConfig
from arc25_fast.kernels import attention
from arc25_fast.runtime.options import ConfigError, configure
from arc25_fast.training.model import ModelError, PackedCausalLM, add_adapter, model_from_config, model_inputs

CPU = torch.device("cpu")


def small_model(tied: bool, vocab: int):
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return model_from_config(config, attention.register("sdpa"), torch.float32, seed=0)


def randomise_adapter(model) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def batch(default_mix, tiny_tokenizer):
    from arc25_fast.data.encoding import FastEncoder
    from arc25_fast.data.options import PackingConfig
    from arc25_fast.data.stream import PackedStream, to_torch

    stream = PackedStream(default_mix, FastEncoder(tiny_tokenizer), PackingConfig(max_tokens=2000, buffer_size=24),
                          seed=6)
    return next(to_torch(b) for b in stream if len(b["cu_seqlens"]) >= 3)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_on_head_and_embeddings_trains_the_exact_loss(batch, tiny_tokenizer, tied):
    cfg = configure(TrainConfig, lora_targets="all", lora_rank=4)
    model = add_adapter(small_model(tied, len(tiny_tokenizer)), cfg)
    randomise_adapter(model)
    lm = model.get_base_model()
    assert type(lm.get_output_embeddings()).__name__ == "Linear" and hasattr(lm.get_output_embeddings(), "lora_A")
    reference = add_adapter(small_model(tied, len(tiny_tokenizer)), cfg)  # plain PEFT, each sample alone
    reference.load_state_dict(model.state_dict())
    packed = PackedCausalLM(model, chunk_tokens=97)
    loss, _ = packed(**model_inputs(batch, CPU))
    loss.backward()
    reference.get_base_model().set_attn_implementation("eager")
    want = per_sample_reference(reference, batch)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    ref = dict(reference.named_parameters())
    head = "base_model.model.lm_head.lora_{}.default.weight"
    emb = "base_model.model.model.embed_tokens.lora_embedding_{}.default"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        expected = ref[name].grad
        if tied and name == emb.format("A"):  # one adapter serves both ends: its gradient is the sum of both
            expected = expected + ref[head.format("B")].grad.T
        if tied and name == emb.format("B"):
            expected = expected + ref[head.format("A")].grad.T
        # a sum of two terms may cancel: absolute tolerance relative to the gradient's scale
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")
    if tied:  # PEFT's tied head copies are not trained separately
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lm_head.lora" in n)


def test_dora_on_the_head_and_foreign_adapters_are_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="dora on .*lm_head.* vocabulary-sized merged weight"):
        add_adapter(small_model(False, len(tiny_tokenizer)), configure(TrainConfig, lora_targets="all", lora_variant="dora"))
    base = small_model(False, len(tiny_tokenizer))
    saved = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    saved.save_pretrained(tmp_path / "mts")
    with pytest.raises(ModelError, match="modules_to_save"):
        add_adapter(small_model(False, len(tiny_tokenizer)), configure(TrainConfig, adapter=str(tmp_path / "mts")))
    other = small_model(False, len(tiny_tokenizer) + 64)  # a base of another vocabulary size
    get_peft_model(other, LoraConfig(r=4, target_modules=["lm_head"])).save_pretrained(tmp_path / "other")
    with pytest.raises(ModelError, match="does not fit model"):
        add_adapter(small_model(False, len(tiny_tokenizer)), configure(TrainConfig, adapter=str(tmp_path / "other")))


@pytest.fixture(scope="module")
def all_targets_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("all_targets")
    result = CliRunner().invoke(main, ["train", "--output-dir", str(out), "--lora-targets", "all", "--lora-rank", "4",
                                       "--max-steps", "3", "--max-tokens", "1024", "--lr", "1e-2", "--eval-every", "0",
                                       "--verify-samples", "0", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_saved_head_and_embedding_adapter_reloads_and_merges(all_targets_run, tmp_path):
    out = all_targets_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "embed_tokens" in config["target_modules"] and config["ensure_weight_tying"] is True  # PEFT ties lm_head
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_embedding_A" in k for k in saved) and not any("base_layer" in k for k in saved)
    ids = torch.randint(0, 400, (1, 50))
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    # the trained weights as DeepSpeed holds them, loaded into a fresh model, evaluated by the packed loss's head
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out / "base_model")),
                                        str(out / "adapter"))
    state = torch.load(out / "checkpoints" / "step-000003" / "deepspeed" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert any("lora_embedding_A" in k for k in state)
    wrapper = PackedCausalLM(trained)
    missing, unexpected = wrapper.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k and "lm_head" not in k]
    with torch.no_grad():
        bounds = [0, ids.shape[1]]
        got = wrapper.logits(ids, torch.arange(ids.shape[1])[None], torch.tensor(bounds, dtype=torch.int32),
                             ids.shape[1], bounds)
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0], got, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, reloaded(input_ids=ids).logits, atol=1e-3)  # the adapter changed the model
    result = CliRunner().invoke(main, ["merge-lora", str(out / "adapter"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
