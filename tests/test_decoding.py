"""Decoding without recomputed prompts: shared-prefix sampling gives the same samples whatever the batch size and
order, and greedy decoding equals Hugging Face's; DFS gives exactly the completions brute-force enumeration finds;
prefix-shared scoring equals scoring each answer from scratch."""
import itertools
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from arc25_fast.solving import decoding, drawn
from arc25_fast.training.model import load_base_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return load_base_model("tiny", len(tiny_tokenizer), torch.float32, "sdpa", 0).eval()


PROMPTS = [[5, 17, 33, 8, 90, 4], [7, 7, 12], [101, 3, 55, 21, 9, 14, 2, 60, 70]]  # three lengths


def test_shared_prefix_samples_do_not_depend_on_batch_size_or_order(model):
    args = dict(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, stop_ids=[0], seed=11, device=CPU)
    one = decoding.sample(model, PROMPTS, batch_size=1, **args)
    all_ = decoding.sample(model, PROMPTS, batch_size=3, **args)
    reversed_ = decoding.sample(model, PROMPTS[::-1], batch_size=2, **args)[::-1]
    assert one == all_ == reversed_
    assert len({tuple(s) for samples in one for s in samples}) > 3  # they are samples, not one answer repeated
    other_seed = decoding.sample(model, PROMPTS, batch_size=3, **{**args, "seed": 12})
    assert other_seed != one


def test_greedy_shared_prefix_decoding_equals_generate(model):
    got = decoding.sample(model, PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=8, stop_ids=[0], seed=0,
                          batch_size=3, device=CPU)
    for prompt, samples in zip(PROMPTS, got):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=8, eos_token_id=0, pad_token_id=0)[0, len(prompt):]
        want = want.tolist()
        want = want[:want.index(0)] if 0 in want else want
        assert samples == [want, want]


@pytest.fixture(scope="module")
def small_vocab():
    """A model over 6 tokens (5 is the stop token), sharpened so that the search prunes."""
    config = Qwen2Config(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(4)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def brute_force(model, prompt: list[int], stop: int, max_new: int, min_prob: float) -> dict[tuple, float]:
    out = {}
    for length in range(1, max_new + 1):
        for body in itertools.product([t for t in range(6) if t != stop], repeat=length - 1):
            seq = list(body) + [stop]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([prompt + seq])).logits[0].float(), -1)
            total = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(seq))
            if total >= math.log(min_prob):
                out[tuple(seq)] = total
    return out


@pytest.mark.parametrize("min_prob", [0.2, 0.05, 0.01])
def test_dfs_finds_exactly_what_brute_force_finds(small_vocab, min_prob):
    prompt = [1, 2, 3, 0]
    want = brute_force(small_vocab, prompt, 5, 4, min_prob)
    got, complete = decoding.dfs(small_vocab, prompt, [5], min_prob, 4)
    assert complete and {tuple(c.tokens) for c in got} == set(want)
    for c in got:
        assert c.logprob == pytest.approx(want[tuple(c.tokens)], abs=1e-4)
    assert [c.logprob for c in got] == sorted((c.logprob for c in got), reverse=True)
    assert len(want) >= {0.2: 1, 0.05: 2, 0.01: 9}[min_prob]  # the thresholds do open several branches


def test_dfs_stops_at_its_caps(small_vocab):
    everything, _ = decoding.dfs(small_vocab, [1, 2, 3, 0], [5], 0.01, 4)
    capped, complete = decoding.dfs(small_vocab, [1, 2, 3, 0], [5], 0.01, 4, max_candidates=2)
    assert not complete and len(capped) == 2 < len(everything)


def test_prefix_shared_scores_equal_scores_from_scratch(model):
    prompt = PROMPTS[2]
    answers = [[4, 8, 15, 0], [16], [23, 42, 7, 7, 9, 0], [1, 0]]
    shared = decoding.score(model, prompt, answers, CPU, batch_size=3)
    scratch = decoding.score_from_scratch(model, prompt, answers, CPU)
    assert shared == pytest.approx(scratch, abs=1e-4)


def nucleus(dist: torch.Tensor, top_p: float) -> torch.Tensor:
    """The distribution sampling draws from: the smallest set of most probable tokens reaching ``top_p``,
    renormalised."""
    kept, total = torch.zeros_like(dist), 0.0
    for t in dist.argsort(descending=True).tolist():
        if total >= top_p:
            break
        kept[t], total = dist[t], total + float(dist[t])
    return kept / kept.sum()


def completion_probabilities(model, prompt: list[int], stop: int, max_new: int, top_p: float) -> dict[tuple, float]:
    """Every outcome of sampling at temperature 1 in the nucleus ``top_p`` (the tokens before the stop token, or
    ``max_new`` tokens cut there) and its probability, by one full forward each."""
    out = {}
    tokens = [t for t in range(model.config.vocab_size) if t != stop]
    for length in range(max_new + 1):
        for body in itertools.product(tokens, repeat=length):
            seq = list(body) + ([stop] if length < max_new else [])
            with torch.no_grad():
                dists = torch.softmax(model(input_ids=torch.tensor([prompt + seq])).logits[0].float(), -1)
            out[body] = math.prod(float(nucleus(dists[len(prompt) - 1 + j], top_p)[t]) for j, t in enumerate(seq))
    return out


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_leaves_out_earlier_completions_and_keeps_the_rest_in_proportion(small_vocab, top_p):
    """Sampling without replacement: the earlier completions never come again, and every other completion comes
    with its probability divided by what is left (P(s) / (1 - P(earlier))), in the nucleus too (where an earlier
    completion is all a node's nucleus holds, that node holds nothing else to draw)."""
    prompt, n = [1, 2, 3, 0], 4000
    truth = completion_probabilities(small_vocab, prompt, 5, 3, top_p)
    assert sum(truth.values()) == pytest.approx(1.0, abs=1e-4)
    ranked = sorted(truth, key=truth.get, reverse=True)
    earlier = [list(s) for s in ranked[:3]]
    taken = sum(truth[s] for s in ranked[:3])
    assert 0.3 < taken < 0.9  # enough mass left out that the test tells the two distributions apart

    def frequencies(exclude):
        got = decoding.sample(small_vocab, [prompt], n=n, temperature=1.0, top_p=top_p, max_new_tokens=3,
                              stop_ids=[5], seed=3, batch_size=1, device=CPU, exclude=exclude)[0]
        counts = {}
        for s in got:
            counts[tuple(s)] = counts.get(tuple(s), 0) + 1
        return {s: c / n for s, c in counts.items()}

    plain, fresh = frequencies(None), frequencies([earlier])
    assert not any(tuple(s) in fresh for s in earlier)
    assert sum(plain.get(tuple(s), 0) for s in earlier) == pytest.approx(taken, abs=0.04)
    for s in ranked[3:]:
        if truth[s] / (1 - taken) > 0.02:  # within 4 standard deviations of the binomial at n=4000
            assert fresh.get(s, 0) == pytest.approx(truth[s] / (1 - taken), abs=0.03), s
            assert plain.get(s, 0) == pytest.approx(truth[s], abs=0.03), s
    assert set(fresh) <= {s for s in truth if truth[s] > 0}


def test_earlier_completions_are_weighed_as_scored_from_scratch(model):
    """The share of the prompt's mass the trie holds is the earlier completions' total probability, whether they
    stopped (probability up to and with the stop token) or were cut at the token limit (that of the prefix), some
    of them prefixes of others."""
    prompt, stop, max_new = PROMPTS[0], 0, 4
    earlier = [[4, 8, 15], [4, 8], [4, 9, 2, 2], [16], []]  # [4, 9, 2, 2]: cut at 4 tokens
    batch = decoding.Batch(model, [prompt], 1, 0, CPU, decoding.Picking(1.0, 1.0, [stop]), max_new, [earlier])
    root = batch.nodes[0]
    stopped = decoding.score_from_scratch(model, prompt, [a + [stop] for a in earlier if len(a) < max_new], CPU)
    cut = decoding.score_from_scratch(model, prompt, [a for a in earlier if len(a) == max_new], CPU)
    assert root.taken == pytest.approx(sum(math.exp(s) for s in stopped + cut), rel=1e-4)
    branch = root.children[4].children[9]  # below it, only the cut completion: all of its own mass is taken
    assert branch.children[2].children[2].taken == 1.0 and 0 < branch.taken < 1


def test_a_completion_that_is_all_of_a_nucleus_takes_all_of_its_mass():
    """Where the nucleus after an earlier completion holds only the stop token, sampling there can only repeat it:
    the whole branch is taken (the nucleus renormalised), not the stop token's probability before the nucleus."""
    root = drawn.build([[0]], max_new_tokens=4)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 4.0]])  # token 3 stops; after [0] it is 0.95
    assert float(torch.softmax(logits[1], -1)[3]) > 0.9
    drawn.observe(root, [0], logits, 1.0, 0.9, [3])
    drawn.weigh(root)
    assert root.children[0].taken == pytest.approx(1.0)
    assert root.taken == pytest.approx(float(nucleus(torch.softmax(logits[0], -1), 0.9)[0]))


def test_left_out_sampling_is_seeded_and_needs_a_temperature(model):
    args = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=6, stop_ids=[0], seed=11, device=CPU)
    earlier = [s for s in decoding.sample(model, PROMPTS, batch_size=3, **args)]
    one = decoding.sample(model, PROMPTS, batch_size=1, exclude=earlier, **args)
    assert one == decoding.sample(model, PROMPTS, batch_size=3, exclude=earlier, **args)
    assert not any(s in before for now, before in zip(one, earlier) for s in now)
    with pytest.raises(ValueError, match="temperature > 0"):
        decoding.sample(model, PROMPTS, batch_size=3, exclude=earlier, **{**args, "temperature": 0.0})
