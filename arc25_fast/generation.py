"""Sampling answers: vLLM when installed (LoRA adapters served as adapters, not merged), Hugging Face ``generate``
otherwise. Both take prompts as token ids from the training encoder, so prompts are exactly the training ones."""
import time
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    n: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 1024
    batch_size: int = 8  # prompts per generate call
    seed: int = 0


@dataclass
class Generated:
    text: str
    tokens: int


class HFGenerator:
    """``model.generate`` on left-padded batches; adapters swapped in place on one PEFT model."""

    def __init__(self, model, tokenizer, stop_ids: list[int], device: torch.device):
        self.model, self.tokenizer, self.stop_ids, self.device = model, tokenizer, stop_ids, device
        self.tokens = 0
        self.seconds = 0.0
        self._adapter: tuple[str, str] | None = None  # (path, name) of the task adapter in use
        self._loaded = 0

    def use_adapter(self, path: str) -> None:
        """Make the adapter at ``path`` the active one (a task's TTT adapter), dropping the previous task's."""
        from peft import PeftModel

        if self._adapter is not None and self._adapter[0] == path:
            return
        name = f"task{self._loaded}"
        self._loaded += 1
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.set_adapter(name)
        if self._adapter is not None:
            self.model.delete_adapter(self._adapter[1])
        self._adapter = (path, name)

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[list[Generated]]:
        from .model import sync_tied_head

        if adapter is not None:
            self.use_adapter(adapter)
        sync_tied_head(self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        out: list[list[Generated]] = []
        start = time.perf_counter()
        try:
            for b in range(0, len(prompts), sampling.batch_size):
                batch = prompts[b:b + sampling.batch_size]
                width = max(len(p) for p in batch)
                ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=self.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
                torch.manual_seed(sampling.seed + b)
                with torch.no_grad():
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                              do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                                              top_p=sampling.top_p, num_return_sequences=sampling.n,
                                              eos_token_id=self.stop_ids, pad_token_id=pad)
                new = gen[:, width:].tolist()
                for i in range(len(batch)):
                    answers = []
                    for seq in new[i * sampling.n:(i + 1) * sampling.n]:
                        end = next((j for j, t in enumerate(seq) if t in self.stop_ids), len(seq))
                        self.tokens += end + (end < len(seq))
                        answers.append(Generated(self.tokenizer.decode(seq[:end]), end))
                    out.append(answers)
        finally:
            self.seconds += time.perf_counter() - start
        return out


class VllmGenerator:
    """vLLM's offline engine; a task's TTT adapter is a ``LoRARequest``."""

    def __init__(self, model: str, adapter: str | None, stop_ids: list[int], dtype: str, seed: int,
                 max_model_len: int, max_lora_rank: int):
        from vllm import LLM

        self.llm = LLM(model=model, enable_lora=True, max_lora_rank=max_lora_rank, seed=seed,
                       dtype={"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[dtype],
                       max_model_len=max_model_len)
        self.adapter, self.stop_ids = adapter, stop_ids
        self.tokens = 0
        self.seconds = 0.0
        self._ids: dict[str, int] = {}

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[list[Generated]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        path = adapter or self.adapter
        lora = None
        if path is not None:
            lora = LoRARequest(path, self._ids.setdefault(path, len(self._ids) + 1), path)
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed, stop_token_ids=self.stop_ids)
        start = time.perf_counter()
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora,
                                    use_tqdm=False)
        self.seconds += time.perf_counter() - start
        out = []
        for r in results:
            out.append([Generated(o.text, len(o.token_ids)) for o in r.outputs])
            self.tokens += sum(len(o.token_ids) for o in r.outputs)
        return out


class ReplayGenerator:
    """Answers recorded by an earlier run (``evaluate --replay``), served for the prompts they answered: no model.
    Re-runs and re-scores saved samples, e.g. under a stricter sandbox or a changed ranking."""

    def __init__(self, answers: dict[tuple[int, ...], list[str]]):
        self.answers = answers
        self.tokens = 0
        self.seconds = 0.0

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[list[Generated]]:
        return [[Generated(text, 0) for text in self.answers[tuple(p)]] for p in prompts]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
