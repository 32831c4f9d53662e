"""Tokenizers: the project's offline tiny tokenizer, loading any other, and the chat template's pieces.

The tiny tokenizer is a byte-level BPE with Qwen2's pre-tokenizer (every digit is its own pre-token) and a
ChatML chat template. It is built by ``scripts/build_tiny_tokenizer.py`` from prompts the project renders itself,
and shipped in ``arc25_fast/assets/tiny-tokenizer`` so that runs need no download.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

TINY = "tiny"
TINY_PATH = Path(__file__).parent.parent / "assets" / "tiny-tokenizer"
QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def load_tokenizer(name: str = TINY) -> PreTrainedTokenizerBase:
    """``tiny`` (offline default), a local directory, or a hub id; a failure is one line naming the tokenizer."""
    if name == TINY:
        return PreTrainedTokenizerFast.from_pretrained(str(TINY_PATH))
    local = name.startswith((".", "/", "~")) or os.path.exists(name)
    path = os.path.expanduser(name)
    if local and not os.path.isdir(path):
        raise ValueError(f"tokenizer {name}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(path if local else name)
    except (OSError, ValueError) as e:
        where = "local tokenizer directory" if local else "hub tokenizer (offline or unknown id?)"
        raise ValueError(f"tokenizer {name}: cannot load it as a {where}: {str(e).strip().splitlines()[0]}") from None


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE, model_max_length=131072)


@dataclass(frozen=True)
class ChatPieces:
    """The chat template's text before the user message, between it and the answer, and after the answer."""

    prefix: str
    mid: str
    suffix: str

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "ChatPieces":
        user, answer = "@@USER@@", "@@ANSWER@@"
        text = render_chat(tokenizer, user, answer)
        if text.count(user) != 1 or text.count(answer) != 1 or text.index(user) > text.index(answer):
            raise ValueError(f"tokenizer {tokenizer.name_or_path}: its chat template does not place the user "
                             "message and the answer verbatim, once each")
        prefix, rest = text.split(user)
        mid, suffix = rest.split(answer)
        if render_prompt(tokenizer, user) != prefix + user + mid:
            raise ValueError(f"tokenizer {tokenizer.name_or_path}: its chat template renders the prompt differently "
                             "with and without the answer")
        return cls(prefix, mid, suffix)


def render_chat(tokenizer: PreTrainedTokenizerBase, user: str, answer: str) -> str:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)

