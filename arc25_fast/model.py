"""Models: loading (local, hub, or a random one of a given shape), LoRA/DoRA/rsLoRA, and the packed loss wrapper."""
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen2Config

from .config import TrainConfig
from .kernels import attention
from .kernels.loss import chunked_cross_entropy

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


def tiny_config(vocab_size: int) -> Qwen2Config:
    """A small Qwen2-architecture model that trains in minutes on two CPU cores."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=10000.0)


def is_random_init(name: str) -> bool:
    return name == "tiny" or name.endswith(".json")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_base_model(name: str, vocab_size: int, dtype: torch.dtype, attn_implementation: str,
                    seed: int = 0) -> PreTrainedModel:
    """``tiny``, a ``config.json`` (random weights of that shape), a local directory or a hub id."""
    if is_random_init(name):
        config = tiny_config(vocab_size) if name == "tiny" else AutoConfig.from_pretrained(name)
        config.vocab_size = max(config.vocab_size, vocab_size)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn_implementation, dtype=dtype)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"model {name}: vocabulary of {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")
    return model


def lora_targets(spec: str) -> list[str]:
    if spec == "attention":
        return ATTENTION_PROJECTIONS
    if spec == "attention+mlp":
        return ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    return [s.strip() for s in spec.split(",") if s.strip()]


def add_adapter(model: PreTrainedModel, cfg: TrainConfig) -> nn.Module:
    """Wrap with a trainable PEFT adapter (new or continued), or leave for full fine-tuning."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.adapter:
        return PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    if not cfg.lora:
        return model
    if cfg.lora_variant not in ("lora", "dora", "rslora"):
        raise ValueError(f"unknown LoRA variant {cfg.lora_variant!r}: use lora, dora or rslora")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(cfg.lora_targets), use_dora=cfg.lora_variant == "dora",
                      use_rslora=cfg.lora_variant == "rslora", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class PackedCausalLM(nn.Module):
    """Causal LM on one packed micro-batch: varlen attention and the chunked answer-token loss.

    Returns the *sum* of token losses, the number of labelled tokens and the correct (argmax) count, so the
    caller can normalise by the labelled tokens of the whole global batch.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 2048):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    @property
    def causal_lm(self) -> PreTrainedModel:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int):
        lm = self.causal_lm
        no_masks = {"full_attention": None, "sliding_attention": None}
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=no_masks, use_cache=False,
                          **attention.packed_kwargs(cu_seqlens, max_seqlen)).last_hidden_state
        head = lm.lm_head
        return chunked_cross_entropy(hidden[0], head.weight, head.bias, labels[0], self.chunk_tokens)


def merge_adapter(adapter_dir: str, output_dir: str, base_model: str | None = None) -> None:
    """Merge a PEFT adapter into its base model and save model and tokenizer to ``output_dir``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base_name = base_model or adapter_config["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer_dir = Path(adapter_dir)
    if (tokenizer_dir / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(output_dir)
