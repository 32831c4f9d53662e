"""Sampling answers: vLLM when installed (LoRA adapters served as adapters, not merged), Hugging Face ``generate``
otherwise. Both take prompts as token ids from the training encoder, so prompts are exactly the training ones."""
import contextlib
import time

import torch

from ..training.model import sync_tied_head
from .decoding import Generated, dfs, sample, score, supports
from .options import Sampling


def sampling_problem(sampling: Sampling) -> str | None:
    """Why these sampling options cannot run (on this machine), checked before any work; or None."""
    if sampling.decode == "graph" and not torch.cuda.is_available():
        return "--decode graph replays CUDA graphs, and this machine has no GPU: use --decode static"
    if sampling.rest_samples >= sampling.n:
        return (f"--rest-samples {sampling.rest_samples} must be less than --samples {sampling.n}: the rest is "
                "written for a partial program among the others")
    if sampling.rest_samples and sampling.rest_steps > sampling.rest_samples:
        return f"--rest-steps {sampling.rest_steps} is more than --rest-samples {sampling.rest_samples}"
    if sampling.split_colors and not sampling.rest_samples:
        return "--split-colors writes the first programs for one colour each: it needs --rest-samples to go on from them"
    return None


@contextlib.contextmanager
def sampling_mode(packed):
    """The model being trained (a ``PackedCausalLM``) ready to sample from in place: SDPA attention (the packed
    kernels need a pack's boundaries) and eval mode, both restored afterwards."""
    lm = packed.causal_lm
    key, was_training = lm.config._attn_implementation, packed.training
    lm.set_attn_implementation("sdpa")
    packed.eval()
    try:
        yield
    finally:
        lm.set_attn_implementation(key)
        packed.train(was_training)


class HFGenerator:
    """Sampling on a Hugging Face model: shared-prefix decoding (``decoding.sample``: each prompt prefilled once, no
    padded prefill), or ``model.generate`` on left-padded batches for models whose caches it cannot build.

    With ``adapters=True`` (``evaluate``) it holds the base model and answers each call with exactly the adapter it is
    given, ``None`` meaning the base model: an adapter is loaded once and stays while the same path is asked, and is
    unloaded (its layers removed, nothing merged) before another is loaded. Each adapter is applied by
    ``PeftModel.from_pretrained`` on the bare base model, so a tied embedding/head adapter gets its head term like the
    first adapter of a fresh model. With ``adapters=False`` (``train --eval-tasks``) it samples from the in-memory
    model as it is."""

    def __init__(self, model, tokenizer, stop_ids: list[int], device: torch.device, adapters: bool = True,
                 reload=None, prefix_sharing: bool | None = None):
        self.model, self.tokenizer, self.stop_ids, self.device = model, tokenizer, stop_ids, device
        self.adapters = adapters
        # shared-prefix sampling (``decoding``) unless asked otherwise or the model needs generate's own caches
        self.prefix_sharing = supports(model) is None if prefix_sharing is None else prefix_sharing
        self.reload = reload  # () -> a fresh base model, for when a failed adapter load leaves its layers behind
        self.adapter_path: str | None = None  # the adapter applied now
        self.tokens = 0
        self.seconds = 0.0

    def use_adapter(self, path: str | None) -> None:
        from peft import PeftModel

        if not self.adapters:
            if path is not None:
                raise ValueError("this generator samples from the model as it is; it applies no adapter")
            return
        if path == self.adapter_path:
            return
        if isinstance(self.model, PeftModel):
            self.model = self.model.unload()
        self.adapter_path = None
        if path is not None:
            try:
                self.model = PeftModel.from_pretrained(self.model, path).eval()
            except Exception:
                if self.reload is None:
                    raise
                self.model = self.reload()  # the failed load may have injected layers into the base model
                raise
            self.adapter_path = path

    @contextlib.contextmanager
    def _running(self, adapter: str | None):
        """``adapter`` applied (a tied head's copy refreshed), then the time inside counted as generation time."""
        self.use_adapter(adapter)
        sync_tied_head(self.model)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None,
                 exclude: list[list[list[int]]] | None = None) -> list[list[Generated]]:
        """``sampling.n`` answers per prompt; ``exclude``: per prompt, the ``ids`` of answers it drew before, left out
        (shared-prefix sampling only)."""
        if exclude is not None and not self.prefix_sharing:
            raise ValueError("leaving out earlier programs needs shared-prefix sampling; this model samples with "
                             f"transformers' generate ({supports(self.model) or 'prefix sharing turned off'})")
        with self._running(adapter):
            if self.prefix_sharing:
                return self._sample(prompts, sampling, exclude)
            return self._generate(prompts, sampling)

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Generated]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        out: list[list[Generated]] = []
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
        return out

    def _sample(self, prompts: list[list[int]], sampling: Sampling,
                exclude: list[list[list[int]]] | None) -> list[list[Generated]]:
        drawn = sample(self.model, prompts, sampling.n, sampling.temperature, sampling.top_p,
                       sampling.max_new_tokens, self.stop_ids, sampling.seed, sampling.batch_size, self.device,
                       sampling.decode, exclude)
        out = []
        for answers in drawn:
            row = []
            for seq in answers:
                n = len(seq) + (len(seq) < sampling.max_new_tokens)  # the stop token counts when it came
                self.tokens += n
                row.append(Generated(self.tokenizer.decode(seq), n, ids=seq))
            out.append(row)
        return out

    def dfs(self, prompts: list[list[int]], min_prob: float, max_new_tokens: int, max_candidates: int,
            max_seconds: float, adapter: str | None = None) -> list[list[Generated]]:
        """Every completion of each prompt with probability >= ``min_prob``, most probable first; the caps hold
        for all the prompts together (one task)."""
        out = []
        with self._running(adapter):
            start = time.perf_counter()
            for prompt in prompts:
                left = max_seconds - (time.perf_counter() - start) if max_seconds else 0.0
                if max_seconds and left <= 0:
                    out.append([])
                    continue
                found, _ = dfs(self.model, prompt, self.stop_ids, min_prob, max_new_tokens, max_candidates,
                               left, self.device)
                row = []
                for c in found:
                    body = [t for t in c.tokens if t not in self.stop_ids]
                    self.tokens += len(c.tokens)
                    row.append(Generated(self.tokenizer.decode(body), len(c.tokens), c.logprob))
                out.append(row)
        return out

    def score(self, prompt: list[int], answers: list[list[int]], adapter: str | None = None) -> list[float]:
        """log P(answer | prompt) per answer, the prompt prefilled once (augmentation re-scoring)."""
        with self._running(adapter):
            return score(self.model, prompt, answers, self.device)


class VllmGenerator:
    """vLLM's offline engine on the base model; each call's adapter is a ``LoRARequest`` (None: the base model)."""

    def __init__(self, model: str, stop_ids: list[int], dtype: str, seed: int, max_model_len: int,
                 max_lora_rank: int):
        from vllm import LLM

        self.llm = LLM(model=model, enable_lora=True, max_lora_rank=max_lora_rank, seed=seed,
                       dtype={"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[dtype],
                       max_model_len=max_model_len, enable_prefix_caching=True)  # K samples share one prefill
        self.stop_ids = stop_ids
        self.tokens = 0
        self.seconds = 0.0
        self._ids: dict[str, int] = {}

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[list[Generated]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        lora = None
        if adapter is not None:
            lora = LoRARequest(adapter, self._ids.setdefault(adapter, len(self._ids) + 1), adapter)
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
