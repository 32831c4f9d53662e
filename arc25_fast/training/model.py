"""Models: loading (local, hub, or a random one of a given shape), PEFT adapters, and the packed-loss wrapper."""
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen2Config

from ..kernels import attention
from ..kernels.loss import chunked_cross_entropy
from ..runtime.options import ConfigError
from .options import TrainingParts

# the projections of attention and of the MLP under each family's names; the first group a model has all of is used
ATTENTION_GROUPS = (["q_proj", "k_proj", "v_proj", "o_proj"], ["query_key_value", "dense"],
                    ["qkv_proj", "o_proj"], ["Wqkv", "out_proj"], ["c_attn", "c_proj"])
MLP_GROUPS = (["gate_proj", "up_proj", "down_proj"], ["dense_h_to_4h", "dense_4h_to_h"], ["gate_up_proj", "down_proj"],
              ["fc1", "fc2"], ["c_fc", "c_proj"], ["w1", "w2", "w3"])
EMBEDDING, HEAD = "embed_tokens", "lm_head"


class ModelError(ValueError):
    """A model, adapter or model option the trainer cannot use as asked; one line."""


def tiny_config(vocab_size: int) -> Qwen2Config:
    """A small Qwen2-architecture model that trains in minutes on two CPU cores."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=10000.0)


def is_random_init(name: str) -> bool:
    return name == "tiny" or name.endswith(".json")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.endswith(".json")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_model_config(name: str, vocab_size: int | None = None):
    """The model's config without its weights (cheap): for checks before anything is loaded."""
    if name == "tiny":
        return tiny_config(vocab_size or 1024)
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise ModelError(f"model {name}: no such file or directory")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name) if looks_like_path(name) else name)
    except (OSError, ValueError) as e:
        where = "local model directory" if looks_like_path(name) else "hub model (offline or unknown id?)"
        raise ModelError(f"model {name}: cannot load its config as a {where}: {str(e).splitlines()[0]}") from None


def _cannot_run(config, e: Exception) -> ModelError:
    return ModelError(f"model type {config.model_type}: cannot run with the packed attention backends "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")


def model_from_config(config, attn_implementation: str, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """Random weights of the configured shape (seeded)."""
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise _cannot_run(config, e) from None


def load_base_model(name: str, vocab_size: int, dtype: torch.dtype, attn_implementation: str,
                    seed: int = 0) -> PreTrainedModel:
    """``tiny``, a ``config.json`` (random weights of that shape), a local directory or a hub id."""
    config = load_model_config(name, vocab_size)  # a clear error for a missing path or an unknown id
    if is_random_init(name):
        config.vocab_size = max(config.vocab_size, vocab_size)
        model = model_from_config(config, attn_implementation, dtype, seed)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name),
                                                         attn_implementation=attn_implementation, dtype=dtype)
        except (ValueError, KeyError) as e:
            raise _cannot_run(config, e) from None
    if model.config.vocab_size < vocab_size:
        raise ModelError(f"model {name}: vocabulary of {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")
    return model


def head_transform(config) -> tuple[float, float | None]:
    """What the model does to its logits after the LM head: a scale, then a soft-cap (``logits = cap * tanh(x / cap)``)."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies
        scale *= float(config.logit_scale)
    return scale, getattr(config, "final_logit_softcapping", None) or None


def decoder_of(lm: PreTrainedModel) -> nn.Module:
    """The transformer body under the LM head (``model``, ``gpt_neox``, ...)."""
    body = getattr(lm, lm.base_model_prefix, None)
    if body is None or body is lm:
        raise ModelError(f"model type {lm.config.model_type}: no decoder body under the LM head")
    return body


def module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


def lora_targets(spec: str, lm: PreTrainedModel) -> list[str]:
    """Module names for a ``--lora-targets`` preset or list; ``embed_tokens``/``lm_head`` name the model's own
    input embedding and output head, whatever they are called in this architecture."""
    present = {name.split(".")[-1] for name, _ in lm.named_modules()}
    linear = sorted({name.split(".")[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)})

    def group(groups: tuple, what: str) -> list[str]:
        found = next((g for g in groups if all(n in present for n in g)), None)
        if found is None:
            raise ModelError(f"--lora-targets {spec}: model type {lm.config.model_type} has no {what} projections "
                             f"under the names this preset knows; name them (its linear modules: {', '.join(linear)})")
        return found

    if spec in ("attention", "attention+mlp", "all"):
        names = group(ATTENTION_GROUPS, "attention")
        if spec != "attention":
            names = names + [n for n in group(MLP_GROUPS, "MLP") if n not in names]
        if spec == "all":
            names = names + [EMBEDDING, HEAD]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    aliases = {EMBEDDING: module_name(lm, lm.get_input_embeddings()).split(".")[-1],
               HEAD: module_name(lm, lm.get_output_embeddings()).split(".")[-1]}
    names = [aliases.get(n, n) for n in names]
    missing = [n for n in names if n not in present]
    if missing:
        raise ModelError(f"--lora-targets: model type {lm.config.model_type} has no module named "
                         f"{', '.join(missing)} (its linear modules: {', '.join(linear)})")
    return names


def ties_embeddings(lm: PreTrainedModel) -> bool:
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    return head is not None and getattr(head, "weight", None) is not None and head.weight is emb.weight


def add_adapter(model: PreTrainedModel, cfg: TrainingParts) -> nn.Module:
    """Wrap with a trainable PEFT adapter (new or continued), or leave for full fine-tuning."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.model.adapter:
        adapter_file = Path(cfg.model.adapter) / "adapter_config.json"
        if not adapter_file.exists():
            raise ModelError(f"adapter {cfg.model.adapter}: no adapter_config.json")
        try:
            wrapped = PeftModel.from_pretrained(model, cfg.model.adapter, is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelError(f"adapter {cfg.model.adapter} does not fit model {cfg.model.name}: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
        check_peft_for_packed_loss(wrapped)
        return wrapped
    if not cfg.lora.enabled:
        return model
    targets = lora_targets(cfg.lora.targets, model)
    head_name = module_name(model, model.get_output_embeddings()).split(".")[-1]
    emb_name = module_name(model, model.get_input_embeddings()).split(".")[-1]
    vocab_targets = [t for t in targets if t in (head_name, emb_name)]
    if vocab_targets and cfg.lora.variant == "dora":
        raise ConfigError(f"--lora-variant dora on {', '.join(vocab_targets)} would form a vocabulary-sized merged "
                          "weight at every step; use lora or rslora there")
    tied = ties_embeddings(model) and bool(vocab_targets)
    if tied and set(vocab_targets) != {head_name, emb_name}:
        targets = sorted(set(targets) | {head_name, emb_name})  # tied: one adapter serves both (PEFT ties them)
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, use_dora=cfg.lora.variant == "dora",
                      use_rslora=cfg.lora.variant == "rslora", task_type="CAUSAL_LM", ensure_weight_tying=tied)
    wrapped = get_peft_model(model, lora)
    check_peft_for_packed_loss(wrapped)
    return wrapped


def check_peft_for_packed_loss(model: nn.Module) -> None:
    """Refuse adapter setups the chunked loss cannot honour exactly (it calls the head module on labelled rows)."""
    from peft.tuners.lora import LoraLayer

    lm = model.get_base_model()
    head = lm.get_output_embeddings()
    config = next(iter(model.peft_config.values()))
    if getattr(config, "peft_type", None) is not None and str(config.peft_type.value) != "LORA":
        raise ModelError(f"adapter type {config.peft_type.value}: only LoRA adapters (lora, dora, rslora) are supported")
    if isinstance(head, LoraLayer) and any(head.use_dora.values()):
        raise ModelError("a DoRA adapter on the LM head would form a vocabulary-sized merged weight at every step; "
                         "use lora or rslora there")
    if getattr(config, "modules_to_save", None):
        names = ", ".join(sorted(config.modules_to_save))
        raise ModelError(f"adapter trains full copies of {names} (modules_to_save); the packed trainer supports LoRA "
                         "adapters only")


class TiedLoraHead(nn.Module):
    """The LM head of a tied-embedding model whose embedding carries a LoRA adapter: the head is the transposed
    adapted embedding, computed from the embedding's own adapter weights, so both paths train the same weights
    (PEFT's tied head copies are separate parameters that ZeRO's flat buffers would silently untie)."""

    def __init__(self, head: nn.Module, embedding: nn.Module):
        super().__init__()
        self.head, self.embedding = head, embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base = self.head.get_base_layer()
        out = F.linear(hidden, base.weight, base.bias)
        for name in self.head.active_adapters:
            if name in self.embedding.lora_embedding_A:
                x = self.head.lora_dropout[name](hidden)
                out = out + (x @ self.embedding.lora_embedding_B[name]) @ self.embedding.lora_embedding_A[name] \
                    * self.embedding.scaling[name]
        return out


def tied_lora_head(lm: PreTrainedModel) -> TiedLoraHead | None:
    from peft.tuners.lora import LoraLayer

    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if isinstance(head, LoraLayer) and isinstance(emb, LoraLayer) and getattr(emb, "lora_embedding_A", None) \
            and head.get_base_layer().weight is emb.get_base_layer().weight:
        return TiedLoraHead(head, emb)
    return None


def sync_tied_head(model: nn.Module) -> None:
    """Copy the embedding adapter into PEFT's tied head copies (before saving or generating)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = tied_lora_head(lm)
    if tied is None:
        return
    with torch.no_grad():
        for name in tied.head.active_adapters:
            tied.head.lora_A[name].weight.copy_(tied.embedding.lora_embedding_B[name].t())
            tied.head.lora_B[name].weight.copy_(tied.embedding.lora_embedding_A[name].t())


class PackedCausalLM(nn.Module):
    """Causal LM on one packed micro-batch: varlen attention and the chunked trained-token loss.

    Returns the *sum* of token losses (with grad) and detached stats (labelled tokens, correct, and the same on the
    answer span), so the caller can normalise by the labelled tokens of the whole global batch.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 2048):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        lm = self.causal_lm
        self.scale, self.softcap = head_transform(lm.config)
        tied = tied_lora_head(lm)
        if tied is not None:  # PEFT's head copies (transposed views) become plain frozen copies, refreshed by
            for name in tied.head.lora_A:  # sync_tied_head; the embedding's adapter is what trains
                for layer in (tied.head.lora_A[name], tied.head.lora_B[name]):
                    layer.weight = nn.Parameter(layer.weight.detach().contiguous().clone(), requires_grad=False)
        self._tied_head = [tied]  # in a list: not a submodule (its parameters belong to the model already)

    @property
    def causal_lm(self) -> PreTrainedModel:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def head(self) -> nn.Module:
        return self._tied_head[0] or self.causal_lm.get_output_embeddings()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, bounds: list[int]) -> torch.Tensor:
        if input_ids.shape[-1] != bounds[-1]:
            raise ValueError(f"packed batch holds {input_ids.shape[-1]} tokens but its samples end at {bounds[-1]}")
        no_masks = {"full_attention": None, "sliding_attention": None}
        return decoder_of(self.causal_lm)(input_ids=input_ids, position_ids=position_ids, attention_mask=no_masks,
                                          use_cache=False, **attention.packed_kwargs(cu_seqlens, max_seqlen, bounds)
                                          ).last_hidden_state[0]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                bounds: list[int], label_positions: torch.Tensor, targets: torch.Tensor,
                target_answer: torch.Tensor | None = None):
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, bounds)
        return chunked_cross_entropy(hidden, self.head, label_positions, targets, target_answer, self.chunk_tokens,
                                     self.scale, self.softcap)

    def logits(self, input_ids, position_ids, cu_seqlens, max_seqlen, bounds) -> torch.Tensor:
        """Full logits of a packed batch ([T, vocab], after the model's logit transform): for checks, not training."""
        out = self.head(self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, bounds)).float()
        out = out * self.scale
        return torch.tanh(out / self.softcap) * self.softcap if self.softcap else out


def check_packed_model(lm: PreTrainedModel, attn_implementation: str, lengths: tuple[int, ...] = (23, 7, 12)) -> None:
    """Refuse a model whose packed outputs differ from its own per-sample outputs.

    A few short random samples go through the packed path (boundaries, positions, head transform) and, each alone,
    through the model's own forward with transformers' eager attention. A model that does not pass the boundaries
    to its attention, ignores ``position_ids`` or transforms its logits in an unknown way fails here, before
    training, with one line naming the model type.
    """
    device = next(lm.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = min(lm.config.vocab_size, lm.get_input_embeddings().num_embeddings)
    ids = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    packed = PackedCausalLM(lm)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    flat = torch.cat(ids)[None].to(device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    kind = lm.config.model_type
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            try:
                got = packed.logits(flat, positions, cu, max(lengths), bounds)
            except attention.PackedAttentionUnsupported as e:
                raise ModelError(f"model type {kind}: {e}") from None
            except (TypeError, AttributeError, KeyError, RuntimeError) as e:
                raise ModelError(f"model type {kind}: its forward does not accept packed batches "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            lm.set_attn_implementation("eager")
            try:
                want = torch.cat([lm(input_ids=x[None].to(device), use_cache=False).logits[0].float() for x in ids])
            finally:
                lm.set_attn_implementation(attn_implementation)
    finally:
        lm.train(was_training)
    err = (got - want).abs()
    scale = want.abs().mean().clamp_min(1e-6)
    fp32 = next(lm.parameters()).dtype == torch.float32
    bad = err.max() > 2e-3 * max(1.0, float(want.abs().max())) if fp32 else err.mean() > 0.1 * scale
    if bad:
        raise ModelError(f"model type {kind}: packed outputs differ from per-sample outputs (mean |diff| "
                         f"{float(err.mean()):.3g} vs mean |logit| {float(scale):.3g}); it does not honour packed "
                         "sample boundaries or positions, so training it packed would be silently wrong")


def merge_adapter(adapter_dir: str, output_dir: str, base_model: str | None = None) -> None:
    """Merge a PEFT adapter into its base model and save model and tokenizer to ``output_dir``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base_name = base_model or adapter_config["base_model_name_or_path"]
    load_model_config(base_name)
    model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    tied = tied_lora_head(peft_model.get_base_model())
    if tied is None:
        merged = peft_model.merge_and_unload()
    else:  # the head shares the embedding's weight: merging both would add the same delta twice
        from peft.tuners.lora import LoraLayer

        for module in peft_model.get_base_model().modules():
            if isinstance(module, LoraLayer) and module is not tied.head:
                module.merge()
        merged = peft_model.unload()
    merged.save_pretrained(output_dir)
    tokenizer_dir = Path(adapter_dir)
    if (tokenizer_dir / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(output_dir)


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The packed model's forward arguments for one micro-batch, on ``device``."""
    out = {k: batch[k].to(device, non_blocking=True)
           for k in ("input_ids", "position_ids", "cu_seqlens", "label_positions", "targets", "target_answer")}
    out["max_seqlen"] = batch["max_seqlen"]
    out["bounds"] = batch["bounds"]
    return out
