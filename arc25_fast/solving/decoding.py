"""Decoding on a Hugging Face model without recomputed prompts or padded prefills.

- ``sample``: each prompt is prefilled once, alone (no padding), and its KV cache is shared by its K samples; the
  K x B rows of up to B prompts of close lengths then decode together on a cache left-padded only where those
  lengths differ (padding costs attention over a few cache positions, never a prefill), each row stopping on its own.
  Each row draws from its own generator, seeded by (seed, prompt, sample index): the same seed gives the same samples
  whatever the batch size, the order of the prompts or the decode step (``static_decode``, or transformers' forward).
- ``dfs``: every completion whose probability is at least ``min_prob``, most probable first, by depth-first search
  on one KV cache (extended for a child, cropped back for its sibling), as the ARChitects and NVARC decode grids.
- ``score``: the log-probability of given answers after a prompt; the prompt is prefilled once and its cache shared
  by all the answers (augmentation re-scoring, the "product of experts").

Why a prompt alone rather than packed prompts: ARC prompts are long (2-9k tokens) and a batch holds few distinct
prompts (one per test input and view), so one prompt already fills the device's matrix units; packing would need a
varlen kernel in the generation path for little gain. The decode, where batching matters, is batched.
"""
import hashlib
import inspect
import math
import time
from dataclasses import dataclass

import torch

from . import drawn
from .static_decode import DecodeStep, StaticKV, unsupported


@dataclass
class Generated:
    """One sampled answer: its text, its token count, and (depth-first search) its log-probability."""

    text: str
    tokens: int
    logprob: float | None = None  # the completion's log-probability (depth-first search)
    ids: list[int] | None = None  # the token ids drawn, stop token excluded (shared-prefix sampling)


@dataclass
class Candidate:
    tokens: list[int]  # the completion, its stop token included
    logprob: float


def _lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model) -> str | None:
    """Why this model cannot use these decoders (falls back to ``generate``), or None."""
    config = _lm(model).config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []) or \
            getattr(config, "use_sliding_window", False):
        return "sliding-window attention layers"
    return None


def _forward(model, ids: torch.Tensor, cache, positions: torch.Tensor | None = None,
             mask: torch.Tensor | None = None):
    """One forward with a KV cache (transformers names it ``cache`` or ``past_key_values``); (logits, cache)."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(_lm(model).forward).parameters else "past_key_values"
    cache = DynamicCache() if cache is None else cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
    return out.logits.float(), getattr(out, "cache", None) or out.past_key_values


def row_generator(seed: int, prompt: list[int], k: int, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{k}|".encode() + bytes(memoryview(torch.tensor(prompt, dtype=torch.int64)
                                                                         .numpy()))).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


DECODERS = ("static", "graph", "hf")
TRIE_LOGITS = 1 << 28  # the most logits one group of earlier completions is scored with (1 GB in float32)


@torch.no_grad()
def sample(model, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
           stop_ids: list[int], seed: int, batch_size: int, device: torch.device,
           decode: str = "static", exclude: list[list[list[int]]] | None = None) -> list[list[list[int]]]:
    """``n`` completions (token ids, stop token excluded) per prompt. Prompts decode together in groups of at most
    ``batch_size`` whose lengths are close (within a quarter, or 64 tokens), so the shared cache is padded little.

    ``decode``: ``static`` (``static_decode.DecodeStep``: fixed shapes on preallocated KV tensors), ``graph`` (the
    same step replayed as a CUDA graph) or ``hf`` (transformers' forward on a ``DynamicCache``); the same samples.

    ``exclude``: per prompt, completions it drew before (as returned here), left out of its samples (``drawn``)."""
    if decode not in DECODERS:
        raise ValueError(f"decode {decode!r}: use one of {', '.join(DECODERS)}")
    if decode != "hf" and (why := unsupported(_lm(model))):
        raise ValueError(f"--decode {decode}: {why}; use --decode hf")
    if decode == "graph" and device.type != "cuda":
        raise ValueError(f"--decode graph replays CUDA graphs; the device is {device}: use --decode static")
    if exclude is not None and temperature <= 0:
        raise ValueError("leaving out earlier completions needs sampling (temperature > 0), not greedy decoding")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and len(prompts[i]) <= 1.25 * len(prompts[groups[-1][0]]) + 64:
            groups[-1].append(i)
        else:
            groups.append([i])
    out: list[list[list[int]]] = [[] for _ in prompts]
    for group in groups:
        batch = Batch(model, [prompts[i] for i in group], n, seed, device, Picking(temperature, top_p, stop_ids),
                      max_new_tokens, None if exclude is None else [exclude[i] for i in group])
        done = _decode_hf(batch, max_new_tokens) if decode == "hf" else \
            _decode_static(batch, max_new_tokens, decode == "graph")
        for i, samples in zip(group, done):
            out[i] = samples
    return out


@dataclass(frozen=True)
class Picking:
    """How a row's next token is chosen."""

    temperature: float  # 0: greedy
    top_p: float
    stop_ids: list[int]


class Batch:
    """The K x B rows of up to B prompts: each prompt prefilled once, alone; each row's own generator; with
    ``exclude``, each prompt's earlier completions in a trie (``drawn``) that its rows walk down while they follow one."""

    def __init__(self, model, prompts: list[list[int]], n: int, seed: int, device: torch.device, picking: Picking,
                 max_new_tokens: int, exclude: list[list[list[int]]] | None = None):
        self.model, self.prompts, self.n, self.device, self.picking = model, prompts, n, device, picking
        self.stop = set(picking.stop_ids)
        self.caches, first, tries = [], [], []
        for i, p in enumerate(prompts):
            logits, cache = _forward(model, torch.tensor([p], device=device), None)
            self.caches.append(cache)
            first.append(logits[0, -1])
            earlier = exclude[i] if exclude else []
            tries.append(self.trie(earlier, logits[0, -1], cache, len(p), max_new_tokens) if earlier else None)
        self.lengths = [len(p) for p in prompts]
        self.rows = [(i, k) for i in range(len(prompts)) for k in range(n)]
        self.first = torch.stack([first[i] for i, _ in self.rows])
        self.generators = [row_generator(seed, prompts[i], k, device) for i, k in self.rows]
        self.nodes: list[drawn.Node | None] = [tries[i] for i, _ in self.rows]  # where each row is in its trie
        self.excluding = any(t is not None for t in tries)
        self.done: list[list[int]] = [[] for _ in self.rows]

    def trie(self, earlier: list[list[int]], first: torch.Tensor, cache, length: int, max_new_tokens: int
             ) -> drawn.Node:
        """The trie of a prompt's earlier completions, weighed under the model as it is now: the completions run
        in groups on copies of the prompt's cache (the prompt is not prefilled again), each group's logits at most
        ``TRIE_LOGITS`` values (a 150k vocabulary's 1,024 positions are 0.6 GB)."""
        root, picking = drawn.build(earlier, max_new_tokens), self.picking
        longest = max(1, max(len(a) for a in earlier))
        group = max(1, min(8, TRIE_LOGITS // (longest * first.shape[-1])))
        for some, out in _continued(self.model, cache, length, earlier, group, self.device):
            for r, a in enumerate(some):
                drawn.observe(root, a, torch.cat([first[None], out[r, :len(a)]]), picking.temperature, picking.top_p,
                              picking.stop_ids)
        drawn.weigh(root)
        return root

    def pick(self, logits: torch.Tensor, active: list[int]) -> list[int]:
        """One token per active row: greedy at temperature 0, else nucleus sampling with each row's own generator,
        the mass of its prompt's earlier completions left out while the row follows one."""
        picking = self.picking
        if picking.temperature <= 0:
            return logits.argmax(-1).tolist()
        probs = drawn.probabilities(logits, picking.temperature, picking.top_p)
        if self.excluding:
            probs = drawn.leave_out(probs, [self.nodes[r] for r in active], picking.stop_ids)
        # each row draws from its own generator (the same samples whatever the batch); one read of all rows' tokens
        return torch.cat([torch.multinomial(probs[a], 1, generator=self.generators[r])
                          for a, r in enumerate(active)]).tolist()

    def take(self, active: list[int], tokens: list[int], step: int, max_new_tokens: int) -> list[int]:
        """Record each active row's token; the positions in ``active`` of the rows that go on."""
        keep = []
        for a, (r, t) in enumerate(zip(active, tokens)):
            if (node := self.nodes[r]) is not None:
                self.nodes[r] = node.children.get(t)
            if t in self.stop:
                continue
            self.done[r].append(t)
            if step + 1 < max_new_tokens:
                keep.append(a)
        return keep

    def samples(self) -> list[list[list[int]]]:
        return [[self.done[i * self.n + k] for k in range(self.n)] for i in range(len(self.prompts))]


def _decode_hf(batch: Batch, max_new_tokens: int):
    """Transformers' forward per token on one ``DynamicCache``; a finished row leaves the batch at once."""
    from transformers import DynamicCache

    lengths, rows, device = batch.lengths, batch.rows, batch.device
    width = max(lengths)
    # each row's prompt cache, right-aligned (the prompts' ends meet the decoded tokens), with no room after it
    kv = StaticKV.from_prompts(batch.caches, lengths, [i for i, _ in rows], width)
    batch.caches = []
    joint = DynamicCache()
    for layer, (keys, values) in enumerate(zip(kv.keys, kv.values)):
        joint.update(keys, values, layer)
    del kv
    # no mask when no row is padded: transformers reads an all-ones mask back to skip it (a sync a step)
    mask = torch.tensor([[0] * (width - lengths[i]) + [1] * lengths[i] for i, _ in rows], device=device) \
        if min(lengths) < width else None
    active = list(range(len(rows)))
    tokens = batch.pick(batch.first, active)
    for step in range(max_new_tokens):
        keep = batch.take(active, tokens, step, max_new_tokens)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            joint.batch_select_indices(index)
            mask = None if mask is None else mask[index]
            active = [active[a] for a in keep]
            tokens = [tokens[a] for a in keep]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = torch.tensor([[lengths[rows[r][0]] + step] for r in active], device=device)
        logits, joint = _forward(batch.model, torch.tensor([[t] for t in tokens], device=device), joint, positions,
                                 mask)
        tokens = batch.pick(logits[:, -1], active)
    return batch.samples()


def _decode_static(batch: Batch, max_new_tokens: int, graph: bool):
    """``DecodeStep`` on a ``StaticKV`` sized for the longest answer. A finished row keeps its slot (fixed shapes)
    until at most half the slots are live; then the live rows move to a step of their own size."""
    lengths, rows, device = batch.lengths, batch.rows, batch.device
    kv = StaticKV.from_prompts(batch.caches, lengths, [i for i, _ in rows], max(lengths) + max_new_tokens)
    batch.caches = []
    step_fn = DecodeStep(_lm(batch.model), kv, torch.tensor([lengths[i] for i, _ in rows], device=device), graph)
    active = list(range(len(rows)))  # the live rows; active[a] sits in slot slots[a]
    tokens = batch.pick(batch.first, active)
    slots = list(range(len(rows)))
    live = None  # the live slots as an index on the device, while some slots are not live
    for step in range(max_new_tokens):
        keep = batch.take(active, tokens, step, max_new_tokens)
        if not keep:
            break
        if len(keep) < len(active):
            active, tokens, slots = [active[a] for a in keep], [tokens[a] for a in keep], [slots[a] for a in keep]
            live = torch.tensor(slots, device=device)
            if len(active) <= len(step_fn.positions) // 2:
                step_fn = DecodeStep(step_fn.lm, step_fn.kv.select(live), step_fn.positions[live], graph)
                slots, live = list(range(len(active))), None
        fed = [0] * len(step_fn.positions)
        for s, t in zip(slots, tokens):
            fed[s] = t
        logits = step_fn(torch.tensor(fed, device=device))
        tokens = batch.pick(logits if live is None else logits[live], active)
    return batch.samples()


@torch.no_grad()
def dfs(model, prompt: list[int], stop_ids: list[int], min_prob: float, max_new_tokens: int,
        max_candidates: int = 0, max_seconds: float = 0.0, device: torch.device = torch.device("cpu")
        ) -> tuple[list[Candidate], bool]:
    """Every completion ending in a stop token with probability >= ``min_prob`` (at temperature 1), most probable
    first; and whether the search was complete (not cut by ``max_candidates`` or ``max_seconds``)."""
    stop, floor = set(stop_ids), math.log(min_prob)
    started = time.perf_counter()
    logits, cache = _forward(model, torch.tensor([prompt], device=device), None)
    found: list[Candidate] = []
    complete = True
    # each frame: (log-probabilities of the next token, cache length, tokens so far, log-probability so far)
    stack = [(torch.log_softmax(logits[0, -1], -1), len(prompt), [], 0.0)]
    children: list[list[tuple[int, float]]] = []
    while stack:
        if len(children) < len(stack):  # a new frame: its children above the floor, most probable first
            lp, _, _, total = stack[-1]
            allowed = (lp + total >= floor).nonzero().flatten().tolist()
            children.append(sorted(((t, total + float(lp[t])) for t in allowed), key=lambda c: -c[1]))
        _, length, prefix, _ = stack[-1]
        if not children[-1]:
            stack.pop()
            children.pop()
            continue
        token, total = children[-1].pop(0)
        if token in stop:
            found.append(Candidate(prefix + [token], total))
            if max_candidates and len(found) >= max_candidates:
                complete = False
                break
            continue
        if len(prefix) + 1 >= max_new_tokens:
            continue  # no room left for a stop token
        if max_seconds and time.perf_counter() - started > max_seconds:
            complete = False
            break
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)  # back to this frame (a negative count removes that many positions)
        logits, cache = _forward(model, torch.tensor([[token]], device=device), cache,
                                 torch.tensor([[length]], device=device))
        stack.append((torch.log_softmax(logits[0, -1], -1), length + 1, prefix + [token], total))
    found.sort(key=lambda c: -c.logprob)
    return found, complete


@torch.no_grad()
def score(model, prompt: list[int], answers: list[list[int]], device: torch.device,
          batch_size: int = 16) -> list[float]:
    """log P(answer | prompt) for each answer; the prompt is prefilled once and its cache shared by all."""
    logits, cache = _forward(model, torch.tensor([prompt], device=device), None)
    first = torch.log_softmax(logits[0, -1], -1)
    scores = []
    for group, out in _continued(model, cache, len(prompt), answers, batch_size, device):
        lp = torch.log_softmax(out, -1)
        for r, a in enumerate(group):
            total = float(first[a[0]])
            if len(a) > 1:
                total += float(lp[r, torch.arange(len(a) - 1), torch.tensor(a[1:], device=device)].sum())
            scores.append(total)
    return scores


def _continued(model, cache, length: int, answers: list[list[int]], batch_size: int, device: torch.device):
    """Each group of at most ``batch_size`` answers run on copies of a prompt's prefilled cache (``length``
    positions), right-padded with each answer's last token: (the group, logits ``[rows, width, vocab]``)."""
    for b in range(0, len(answers), batch_size):
        group = answers[b:b + batch_size]
        width = max(1, max(len(a) for a in group))
        ids = torch.tensor([a + [a[-1] if a else 0] * (width - len(a)) for a in group], device=device)
        positions = torch.arange(length, length + width, device=device).expand(len(group), -1)
        out, _ = _forward(model, ids, _repeat(cache, len(group)), positions)
        yield group, out


def _repeat(cache, rows: int):
    from transformers import DynamicCache

    shared = DynamicCache()
    for layer in range(len(cache.layers)):
        shared.update(cache.layers[layer].keys.expand(rows, -1, -1, -1).contiguous(),
                      cache.layers[layer].values.expand(rows, -1, -1, -1).contiguous(), layer)
    return shared


def score_from_scratch(model, prompt: list[int], answers: list[list[int]], device: torch.device) -> list[float]:
    """The reference for ``score``: one full forward per answer (what prefix sharing saves)."""
    scores = []
    with torch.no_grad():
        for a in answers:
            logits = model(input_ids=torch.tensor([prompt + a], device=device)).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            scores.append(float(lp[torch.arange(len(a)), torch.tensor(a, device=device)].sum()))
    return scores
