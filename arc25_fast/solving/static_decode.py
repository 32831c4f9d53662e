"""A decode step of fixed shapes: the model's own decoder layers on preallocated KV tensors, replayable as a CUDA graph.

Transformers' forward pays, per generated token, its mask building, its output capture and a growing ``DynamicCache``
(a ``cat`` per layer), and its shapes change every step. Here the K x B rows of a sampling batch decode on key/value
tensors allocated once for the prompt and every new token (``StaticKV``); a step reads only tensors that stay at
the same address (the tokens, the positions, the write index, the cache) and advances positions and write index in
place. So on a GPU it is captured once as a CUDA graph and replayed: one launch per token instead of several
hundred (``--decode graph``). The layers are the model's own modules (norms, attention, MLP, LoRA wrappers), called
with this cache, so the numbers are those of transformers' SDPA path (``tests/test_static_decode.py``).
"""
import inspect

import torch

from ..runtime.logs import note


class StaticKV:
    """Key/value tensors ``[rows, kv_heads, length, head_dim]`` per layer, written at one shared index.

    Rows are right-aligned (every prompt ends at the same column), so one write index serves all rows, and
    ``mask()`` gives the columns a row attends to: its prompt and every token decoded so far.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], prompt_columns: torch.Tensor, width: int):
        self.keys, self.values = keys, values
        self.width = width  # the column of the first decoded token
        self.prompt_columns = prompt_columns  # [rows, length] bool: the row's prompt
        self.columns = torch.arange(keys[0].shape[2], device=keys[0].device)
        self.write = torch.full((1,), width, dtype=torch.long, device=keys[0].device)  # next column written

    @classmethod
    def from_prompts(cls, caches: list, lengths: list[int], rows: list[int], length: int) -> "StaticKV":
        """Each row's copy of its prompt's prefilled cache (a transformers cache per prompt; ``rows[r]`` its prompt),
        in tensors with room for ``length`` columns."""
        width = max(lengths)
        runs = []  # (prompt, its consecutive rows): one copy per run and layer, not one per row
        for r, i in enumerate(rows):
            if runs and runs[-1][0] == i and runs[-1][1].stop == r:
                runs[-1] = (i, slice(runs[-1][1].start, r + 1))
            else:
                runs.append((i, slice(r, r + 1)))
        keys, values = [], []
        for layer in range(len(caches[0].layers)):
            k0, v0 = caches[0].layers[layer].keys, caches[0].layers[layer].values
            k = k0.new_zeros((len(rows), k0.shape[1], length, k0.shape[3]))
            v = v0.new_zeros((len(rows), v0.shape[1], length, v0.shape[3]))
            for i, at in runs:
                k[at, :, width - lengths[i]:width] = caches[i].layers[layer].keys
                v[at, :, width - lengths[i]:width] = caches[i].layers[layer].values
            keys.append(k)
            values.append(v)
        columns = torch.arange(length, device=keys[0].device)
        starts = torch.tensor([width - lengths[i] for i in rows], device=keys[0].device)
        prompt = (columns[None, :] >= starts[:, None]) & (columns[None, :] < width)
        return cls(keys, values, prompt, width)

    def select(self, index: torch.Tensor) -> "StaticKV":
        """The rows ``index`` only, in new tensors (finished rows leave)."""
        kv = StaticKV([k[index] for k in self.keys], [v[index] for v in self.values], self.prompt_columns[index],
                      self.width)
        kv.write.copy_(self.write)
        return kv

    def mask(self) -> torch.Tensor:
        """``[rows, 1, 1, length]`` bool: the columns each row attends to now (its prompt, and the decoded ones up to
        and including the one being written)."""
        decoded = (self.columns >= self.width) & (self.columns <= self.write)
        return (self.prompt_columns | decoded[None, :])[:, None, None, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The transformers cache protocol: write this step's keys and values, return the whole layer."""
        self.keys[layer_idx].index_copy_(2, self.write, key_states)
        self.values[layer_idx].index_copy_(2, self.write, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


def unsupported(lm) -> str | None:
    """Why ``DecodeStep`` cannot run this (bare, PEFT-injected) causal LM, or None."""
    inner = getattr(lm, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"{type(lm).__name__} has no model.{name} (not a Llama/Qwen2-style decoder)"
    if lm.config._attn_implementation != "sdpa":
        return f"attention {lm.config._attn_implementation!r}, not sdpa"
    return None


class DecodeStep:
    """``step(tokens)`` -> next-token logits ``[rows, vocab]`` (fp32) for every row, on a ``StaticKV``.

    ``tokens`` is copied into a buffer of fixed address; the positions and the cache's write index advance by one in
    place after each step. With ``graph=True`` (CUDA only) the first step is captured as a CUDA graph and every later
    one replays it; where the capture fails, the step runs eagerly and a note says so once.
    """

    graph_failed = False

    def __init__(self, lm, kv: StaticKV, positions: torch.Tensor, graph: bool = False):
        self.lm, self.kv = lm, kv
        self.tokens = torch.zeros((positions.shape[0], 1), dtype=torch.long, device=positions.device)
        self.positions = positions.reshape(-1, 1).clone()
        forward = inspect.signature(type(lm.model.layers[0]).forward).parameters
        self.cache_name = "cache" if "cache" in forward else "past_key_values"
        self.graph = None
        self.logits: torch.Tensor | None = None
        if graph:
            if positions.device.type != "cuda":
                raise ValueError("a CUDA graph needs a CUDA device")
            try:
                self.graph = self._capture()
            except RuntimeError as e:  # an operator the graph cannot hold: this step runs eagerly, said once
                if not DecodeStep.graph_failed:
                    note(f"--decode graph: this model's step could not be captured ({str(e).splitlines()[0][:160]}); "
                         "decoding eagerly (--decode static)")
                DecodeStep.graph_failed = True

    def _forward(self) -> torch.Tensor:
        inner = self.lm.model
        hidden = inner.embed_tokens(self.tokens)
        cos_sin = inner.rotary_emb(hidden, self.positions)
        mask = self.kv.mask()
        for layer in inner.layers:
            out = layer(hidden, attention_mask=mask, position_ids=self.positions, position_embeddings=cos_sin,
                        use_cache=True, **{self.cache_name: self.kv})
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.lm.lm_head(inner.norm(hidden))[:, -1].float()
        self.positions.add_(1)
        self.kv.write.add_(1)
        return logits

    def _capture(self):
        """Warm up once on a side stream (lazy initialisation stays out of the graph), then capture one step.

        Capturing runs nothing; the warm-up step's advance is undone, and the cache column it wrote is written again
        by the first real step before any row attends to it."""
        device = self.positions.device
        positions, write = self.positions.clone(), self.kv.write.clone()
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._forward()
        finally:
            self.positions.copy_(positions)
            self.kv.write.copy_(write)
        return graph

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.reshape(-1, 1))
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits
