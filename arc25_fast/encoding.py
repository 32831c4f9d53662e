"""Samples to token ids: the reference text path and the token-exact fast path.

``TextEncoder`` is the reference: render the prompt with the tokenizer's chat template (Jinja) and tokenize it.
``FastEncoder`` gives the same ids without rendering grids: grids go through the numba kernel, and every stretch
of text between two digits is tokenized once and cached. This is exact because, in the supported tokenizers,
a digit is always a pre-token of its own, so no token ever spans a digit. ``verify_token_exact`` checks the
contract on real samples, and ``check_digit_tokens`` refuses tokenizers for which it cannot hold.
"""
import re
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from .grid_formats import GridFormat, grid_format
from .kernels.grid_tokens import HEADER, grid_body_tokens
from .prompts import Sample, Segment
from .tokenizer import ChatPieces, render_chat, render_prompt

DIGITS = "0123456789"
SPLIT_DIGITS = re.compile(r"([0-9])")
CHUNK_CACHE_LIMIT = 1 << 16
WHOLE_TEXT_MAX_PIECES = 5  # prompt text between grids recurs; program text with many numbers does not


class TokenizerNotSupported(ValueError):
    """The fast encoder cannot be exact with this tokenizer."""


class TokenMismatchError(RuntimeError):
    """The fast encoder disagreed with the reference text path."""


@dataclass(slots=True)
class EncodedSample:
    """Token ids of one sample; tokens ``[n_prompt, n_prompt + n_trained)`` (answer + end of turn) are trained."""

    ids: np.ndarray
    n_prompt: int
    n_trained: int

    def __len__(self) -> int:
        return len(self.ids)


def render_segments(segments: list[Segment], fmt: GridFormat) -> str:
    return "".join(s if isinstance(s, str) else fmt.to_text(s) for s in segments)


def _first_special(ids: list[int], start: int, special: set[int]) -> int:
    for i in range(start, len(ids)):
        if ids[i] in special:
            return i
    return len(ids) - 1


class TextEncoder:
    """Reference path: chat template text, then ``tokenizer(text)``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: GridFormat | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt or grid_format()
        self.special = set(tokenizer.all_special_ids)

    def render(self, sample: Sample) -> str:
        return render_chat(self.tokenizer, render_segments(sample.user, self.fmt),
                           render_segments(sample.answer, self.fmt))

    def encode(self, sample: Sample) -> EncodedSample:
        user = render_segments(sample.user, self.fmt)
        text = render_chat(self.tokenizer, user, render_segments(sample.answer, self.fmt))
        prompt = render_prompt(self.tokenizer, user)
        if not text.startswith(prompt):
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path}: the chat template's prompt is not a prefix "
                             "of the full conversation")
        enc = self.tokenizer(text, add_special_tokens=False)
        n_prompt = enc.char_to_token(len(prompt))
        if n_prompt is None or enc.token_to_chars(n_prompt).start != len(prompt):
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path}: a token spans the end of the prompt")
        ids = enc["input_ids"]
        end = _first_special(ids, n_prompt, self.special)
        return EncodedSample(np.asarray(ids, dtype=np.int32), n_prompt, end + 1 - n_prompt)


def check_digit_tokens(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The token id of each digit, after checking that every digit is always exactly one token."""
    name = tokenizer.name_or_path
    digit_ids = []
    for d in DIGITS:
        ids = tokenizer.encode(d, add_special_tokens=False)
        if len(ids) != 1:
            raise TokenizerNotSupported(f"tokenizer {name}: digit {d!r} is {len(ids)} tokens, not one; "
                                        "the fast encoder needs one token per digit (use --encoder text)")
        digit_ids.append(ids[0])
    for probe in ("0123456789", "9876543210", "x10y", " 42\n", "(3, 4)", "30x30\n1 00"):
        want = [digit_ids[int(c)] for c in probe if c.isdigit()]
        got = [i for i in tokenizer.encode(probe, add_special_tokens=False) if i in digit_ids]
        if got != want:
            raise TokenizerNotSupported(f"tokenizer {name}: digits in {probe!r} are not split one token per digit "
                                        f"({tokenizer.encode(probe, add_special_tokens=False)}); "
                                        "the fast encoder cannot be exact with it (use --encoder text)")
    return np.asarray(digit_ids, dtype=np.int32)


class FastEncoder:
    """Token-exact encoder: numba for grids, cached tokenization for the text between digits."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: GridFormat | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt or grid_format()
        self.digit_ids = check_digit_tokens(tokenizer)
        self.chat = ChatPieces.from_tokenizer(tokenizer)
        self._cache: dict[str, np.ndarray] = {d: self.digit_ids[i:i + 1] for i, d in enumerate(DIGITS)}
        pieces = [self._tokenize_chunk(p) for p in self.fmt.pieces]
        self.table = np.concatenate([
            self.digit_ids, [self.fmt.shape_header, self.fmt.row_numbers], [len(p) for p in pieces], *pieces,
        ]).astype(np.int32)
        assert len(self.table) == HEADER + sum(len(p) for p in pieces)
        self.suffix_ids = self._tokenize_chunk(self.chat.suffix)
        special = set(tokenizer.all_special_ids)
        self.n_end_of_turn = next((i + 1 for i, t in enumerate(self.suffix_ids) if t in special), len(self.suffix_ids))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {d: self._cache[d] for d in DIGITS}}

    def _tokenize_chunk(self, text: str) -> np.ndarray:
        """Ids of a digit-free stretch of text, tokenized between two sentinel digits as it appears in context."""
        ids = self.tokenizer.encode(f"0{text}0", add_special_tokens=False)
        zero = self.digit_ids[0]
        if ids[0] != zero or ids[-1] != zero:
            raise TokenizerNotSupported(f"tokenizer {self.tokenizer.name_or_path}: text {text!r} merges with a "
                                        "neighbouring digit; the fast encoder cannot be exact (use --encoder text)")
        return np.asarray(ids[1:-1], dtype=np.int32)

    def _lookup(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._tokenize_chunk(text)
            if len(self._cache) < CHUNK_CACHE_LIMIT:
                self._cache[text] = ids
        return ids

    def _text(self, text: str, parts: list[np.ndarray]) -> None:
        """Ids of any text: split at digits, each stretch from the cache; short recurring texts cached whole."""
        ids = self._cache.get(text)
        if ids is None:
            pieces = [self._lookup(p) for p in SPLIT_DIGITS.split(text) if p]
            if len(pieces) > WHOLE_TEXT_MAX_PIECES:
                parts.extend(pieces)
                return
            ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
            if len(self._cache) < CHUNK_CACHE_LIMIT:
                self._cache[text] = ids
        parts.append(ids)

    def _segments(self, segments: list[Segment], parts: list[np.ndarray], pending: str = "") -> None:
        fmt = self.fmt
        for seg in segments:
            if type(seg) is str:
                pending += seg
            else:
                self._text(pending + fmt.prefix, parts)
                parts.append(grid_body_tokens(seg, self.table))
                pending = fmt.suffix
        self._text(pending, parts)

    def encode(self, sample: Sample) -> EncodedSample:
        parts: list[np.ndarray] = []
        self._segments([*sample.user, self.chat.mid], parts, self.chat.prefix)
        n_prompt = sum(len(p) for p in parts)
        self._segments(sample.answer, parts)
        parts.append(self.suffix_ids)
        ids = np.concatenate(parts)
        return EncodedSample(ids, n_prompt, len(ids) - len(self.suffix_ids) - n_prompt + self.n_end_of_turn)


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def verify_token_exact(fast: FastEncoder, reference: TextEncoder, samples: list[Sample]) -> None:
    """Raise ``TokenMismatchError`` naming the tokenizer and the first differing position if any sample differs."""
    tok = fast.tokenizer
    for i, sample in enumerate(samples):
        a, b = fast.encode(sample), reference.encode(sample)
        if np.array_equal(a.ids, b.ids) and (a.n_prompt, a.n_trained) == (b.n_prompt, b.n_trained):
            continue
        p = first_difference(a.ids, b.ids)
        where = f"tokenizer {tok.name_or_path}: sample {i} ({sample.source} {sample.task_id})"
        if p == len(a.ids) == len(b.ids):
            raise TokenMismatchError(f"{where}: same ids but trained span differs: fast "
                                     f"({a.n_prompt}, {a.n_trained}) vs text path ({b.n_prompt}, {b.n_trained})")
        raise TokenMismatchError(
            f"{where}: fast encoding differs from tokenizer(text) at token {p}: fast {a.ids[p:p + 4].tolist()} "
            f"{tok.decode(a.ids[p:p + 4])!r} vs text path {b.ids[p:p + 4].tolist()} {tok.decode(b.ids[p:p + 4])!r}")
