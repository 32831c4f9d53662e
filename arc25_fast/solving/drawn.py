"""Sampling that leaves out what a prompt has drawn before (sampling without replacement across calls).

A search that samples a task's prompt again (the next round, the next step from the same partial program) would
otherwise draw its most probable programs again: a program written 14 times is run 14 times, and a round learns
nothing from the copies. Here the earlier completions of a prompt are kept in a trie whose every node holds the share
of the sampling distribution's mass (after temperature and nucleus) that lies in the earlier completions below it,
scored under the model as it is now (it may have learned since). Each step of a row still inside the trie scales a
child token's probability by the share of its subtree left (a completion that ended at the node gives its stop tokens
none), which is exactly the distribution over the completions not drawn before (Shi et al., "Incremental Sampling
Without Replacement for Sequence Models", 2020). Where nothing is left (the nucleus holds only earlier completions),
the prompt samples as if nothing had been drawn.
"""
from __future__ import annotations

import torch

LEFT_FLOOR = 1e-9  # a node with less mass left than this samples as if nothing had been drawn


class Node:
    """A prefix of the earlier completions; ``taken``: the share of its mass in earlier completions below it."""

    __slots__ = ("children", "ends", "cut", "taken", "seen", "child_p", "stop_p")

    def __init__(self):
        self.children: dict[int, Node] = {}
        self.ends = False  # an earlier completion stopped here: every stop token is taken
        self.cut = False  # an earlier completion was cut here by the token limit: everything below is taken
        self.taken = 0.0
        self.seen = False  # its distribution has been read (``observe``)
        self.child_p: list[float] = []  # the probability of each child token, in ``children``' order
        self.stop_p = 0.0  # the probability of stopping here


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution over the last dimension: softmax at ``temperature``, then the nucleus ``top_p``
    (the smallest set of most probable tokens reaching it; the rest set to 0, not renormalised)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return probs


def build(completions: list[list[int]], max_new_tokens: int) -> Node:
    """The trie of earlier completions (token ids, stop token excluded; one of ``max_new_tokens`` tokens was cut)."""
    root = Node()
    for tokens in completions:
        node = root
        for t in tokens:
            node = node.children.setdefault(t, Node())
        if len(tokens) >= max_new_tokens:
            node.cut = True
        else:
            node.ends = True
    return root


def observe(root: Node, tokens: list[int], logits: torch.Tensor, temperature: float, top_p: float,
            stop_ids: list[int]) -> None:
    """Reads the distributions along one completion of the trie: ``logits[j]`` are those after its first j tokens
    (``logits[0]``: after the prompt). Only the probabilities the shares need leave the device, in one read. The
    nucleus is renormalised here, as sampling from it renormalises: where it holds only the stop token, stopping
    there takes all of the node's mass."""
    probs = probabilities(logits.float(), temperature, top_p)
    probs = probs / probs.sum(-1, keepdim=True)
    nodes, rows, cols = [], [], []
    node = root
    for j in range(len(tokens) + 1):
        if not node.seen and not node.cut:
            node.seen = True
            wanted = list(node.children) + (stop_ids if node.ends else [])
            nodes.append((node, len(wanted)))
            rows += [j] * len(wanted)
            cols += wanted
        if j < len(tokens):
            node = node.children[tokens[j]]
    if not rows:
        return
    read = probs[torch.tensor(rows, device=probs.device), torch.tensor(cols, device=probs.device)].tolist()
    at = 0
    for node, n in nodes:
        node.child_p = read[at:at + len(node.children)]
        node.stop_p = sum(read[at + len(node.children):at + n])
        at += n


def weigh(root: Node) -> None:
    """Sets every node's ``taken`` share from the distributions ``observe`` read (leaves first)."""
    order, stack = [], [root]
    while stack:  # no recursion: a completion may be longer than Python's recursion limit
        node = stack.pop()
        order.append(node)
        stack.extend(node.children.values())
    for node in reversed(order):
        if node.cut:
            node.taken = 1.0
            continue
        total = node.stop_p if node.ends else 0.0
        total += sum(p * child.taken for p, child in zip(node.child_p, node.children.values()))
        node.taken = min(total, 1.0)


def leave_out(probs: torch.Tensor, nodes: list[Node | None], stop_ids: list[int]) -> torch.Tensor:
    """The rows' sampling distributions (``probs[a]`` that of the row at ``nodes[a]``, None: a row no longer
    following an earlier completion) with the earlier completions' mass taken out, unnormalised; one scale tensor
    for all the rows, so a decode step costs a few operations whatever the number of rows. A row whose node has
    nothing left keeps its distribution."""
    rows, cols, keep = [], [], []
    for a, node in enumerate(nodes):
        if node is None or node.taken > 1.0 - LEFT_FLOOR:
            continue
        for t, child in node.children.items():
            rows.append(a)
            cols.append(t)
            keep.append(1.0 - child.taken)
        if node.ends:
            rows += [a] * len(stop_ids)
            cols += stop_ids
            keep += [0.0] * len(stop_ids)
    if not rows:
        return probs
    scale = torch.ones_like(probs)
    scale[torch.tensor(rows, device=probs.device), torch.tensor(cols, device=probs.device)] = \
        torch.tensor(keep, device=probs.device, dtype=probs.dtype)
    # a trace of the original keeps a row drawable where the decode's logits differ from the scored ones by a
    # rounding error (an earlier completion is then drawn again with a chance of about 1e-12)
    return probs * scale.add_(1e-12)
