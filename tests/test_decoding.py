"""Decoding without recomputed prompts: shared-prefix sampling gives the same samples whatever the batch size and
order, and greedy decoding equals Hugging Face's; DFS gives exactly the completions brute-force enumeration finds;
prefix-shared scoring equals scoring each answer from scratch."""
import itertools
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from arc25_fast.solving import decoding
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
