"""Samples to token ids and trained spans: the reference text path and the token-exact fast path.

``TextEncoder`` is the reference: render the prompt with the tokenizer's chat template (Jinja) and tokenize it;
trained spans come from character offsets mapped through the tokenizer's offsets. ``FastEncoder`` gives the same
ids and spans without rendering grids: grids go through the numba kernel, and every stretch of text between two
digits is tokenized once and cached. This is exact when no token can join an ASCII digit with anything else
(``digit_safety_problem`` decides that from the tokenizer's model and vocabulary, and probes every digit pair);
``verify_token_exact`` checks the contract on real samples.

Trained spans (``--train-on``): the answer and the end of turn, always last; with ``all-outputs`` also the body
(first digit to last digit) of every demo output grid, or of all but the first. Bodies start and end on digits,
which are tokens of their own, so their boundaries are token boundaries on both paths.
"""
import re
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..kernels.grid_tokens import HEADER, grid_body_tokens
from .grid_formats import GridFormat, grid_format
from .grids import DataError
from .prompts import Sample, Segment
from .tokenizer import ChatPieces, render_chat, render_prompt

DIGITS = "0123456789"
SPLIT_DIGITS = re.compile(r"([0-9])")
CHUNK_CACHE_LIMIT = 1 << 16
WHOLE_TEXT_MAX_PIECES = 5  # prompt text between grids recurs; program text with many numbers does not
TRAIN_ON = ("answer", "all-outputs", "all-outputs-but-first")
BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
PROBE_CONTEXTS = ("", " ", "\n", "x", ", ", ")(", "a", "=", ".", "\t", "é", "##")


class TokenizerNotSupported(ValueError):
    """The fast encoder cannot be exact with this tokenizer."""


class TokenMismatchError(RuntimeError):
    """The fast encoder disagreed with the reference text path."""


class SpecialTokenText(DataError):
    """Sample text holds a special token's text, which the tokenizer would read as a control token."""


@dataclass(slots=True)
class EncodedSample:
    """Token ids of one sample and its trained token ranges ``spans[k] = [start, end)``, the answer's last.

    A prompt to generate from has no spans.
    """

    ids: np.ndarray
    spans: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_prompt(self) -> int:
        """Tokens before the answer."""
        return int(self.spans[-1, 0]) if len(self.spans) else len(self.ids)

    @property
    def n_trained(self) -> int:
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())


def render_segments(segments: list[Segment], fmt: GridFormat) -> str:
    return "".join(s if isinstance(s, str) else fmt.to_text(s) for s in segments)


def trained_outputs(sample: Sample, train_on: str) -> tuple[int, ...]:
    """Indices in ``sample.user`` of the demo output grids whose bodies are trained."""
    if train_on == "answer":
        return ()
    return sample.demo_outputs if train_on == "all-outputs" else sample.demo_outputs[1:]


def special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts the tokenizer reads as added (special or control) tokens wherever they appear."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.content}, key=len, reverse=True)


class SpecialTextCheck:
    """Refuses sample text that holds a special token's text; remembers text already found clean."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        texts = special_texts(tokenizer)
        self.pattern = re.compile("|".join(re.escape(t) for t in texts)) if texts else None
        self.clean: set[str] = set()

    def __call__(self, sample: Sample) -> None:
        if self.pattern is None:
            return
        for seg in (*sample.user, *sample.answer):
            if type(seg) is str and seg not in self.clean:
                if m := self.pattern.search(seg):
                    raise SpecialTokenText(f"{sample.source}: task {sample.task_id}: text contains the special "
                                           f"token {m.group()!r}")
                if len(self.clean) < CHUNK_CACHE_LIMIT:
                    self.clean.add(seg)


def _spans(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)


class TextEncoder:
    """Reference path: chat template text, then ``tokenizer(text)``; spans from character offsets."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: GridFormat | None = None, train_on: str = "answer"):
        self.tokenizer = tokenizer
        self.fmt = fmt or grid_format()
        self.train_on = train_on
        self.special = set(tokenizer.all_special_ids)
        self.chat = ChatPieces.from_tokenizer(tokenizer)
        self.check_special = SpecialTextCheck(tokenizer)

    def render(self, sample: Sample) -> str:
        return render_chat(self.tokenizer, render_segments(sample.user, self.fmt),
                           render_segments(sample.answer, self.fmt))

    def _user_text(self, sample: Sample, trained: tuple[int, ...]) -> tuple[str, list[tuple[int, int]]]:
        """The user message and the character ranges of the trained demo output bodies in it."""
        text, bodies = [], []
        pos = 0
        for i, seg in enumerate(sample.user):
            piece = seg if isinstance(seg, str) else self.fmt.to_text(seg)
            if i in trained:
                bodies.append((pos + len(self.fmt.prefix), pos + len(piece) - len(self.fmt.suffix)))
            text.append(piece)
            pos += len(piece)
        return "".join(text), bodies

    def encode(self, sample: Sample) -> EncodedSample:
        name = self.tokenizer.name_or_path
        self.check_special(sample)
        user, bodies = self._user_text(sample, trained_outputs(sample, self.train_on))
        prompt = render_prompt(self.tokenizer, user)
        if not sample.answer:
            return EncodedSample(np.asarray(self.tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                            dtype=np.int32), _spans([]))
        text = render_chat(self.tokenizer, user, render_segments(sample.answer, self.fmt))
        if not text.startswith(prompt) or not prompt.startswith(self.chat.prefix + user):
            raise ValueError(f"tokenizer {name}: the chat template's prompt is not a prefix of the full conversation")
        enc = self.tokenizer(text, add_special_tokens=False)
        n_prompt = enc.char_to_token(len(prompt))
        if n_prompt is None or enc.token_to_chars(n_prompt).start != len(prompt):
            raise ValueError(f"tokenizer {name}: a token spans the end of the prompt")
        ids = enc["input_ids"]
        spans = []
        offset = len(self.chat.prefix)
        for a, b in bodies:
            start, last = enc.char_to_token(offset + a), enc.char_to_token(offset + b - 1)
            if (start is None or last is None or enc.token_to_chars(start).start != offset + a
                    or enc.token_to_chars(last).end != offset + b):
                raise ValueError(f"tokenizer {name}: a token spans the edge of a demo output grid")
            spans.append((start, last + 1))
        end = next((i for i in range(n_prompt, len(ids)) if ids[i] in self.special), len(ids) - 1)
        spans.append((n_prompt, end + 1))
        return EncodedSample(np.asarray(ids, dtype=np.int32), _spans(spans))


def digit_safety_problem(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the fast encoder cannot be exact with this tokenizer, or None when it can.

    Decided from the tokenizer itself, not from sampled text: a BPE or Unigram model whose vocabulary has no token
    joining an ASCII digit with anything else can never produce a token across a digit, whatever its pre-tokenizer
    (BPE merges and Unigram pieces both stop at the digit). Every digit pair, and every digit next to a handful of
    contexts, is then probed through the full tokenizer (normalizer included).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "it is not a fast (Rust) tokenizer, so its vocabulary cannot be checked"
    model = type(backend.model).__name__
    if model not in ("BPE", "Unigram"):
        return f"its {model} model can attach continuation markers to the text after a digit"
    vocab = backend.get_vocab(with_added_tokens=False)
    mixed = sorted(t for t in vocab if len(t) > 1 and any(c in DIGITS for c in t) and not BYTE_FALLBACK.match(t))
    if mixed:
        return (f"{len(mixed)} tokens join a digit with other text (e.g. {', '.join(repr(t) for t in mixed[:3])}), "
                "so the text between digits cannot be tokenized on its own")
    digit_ids = []
    for d in DIGITS:
        ids = tokenizer.encode(d, add_special_tokens=False)
        if len(ids) != 1:
            return f"digit {d!r} is {len(ids)} tokens, not one"
        digit_ids.append(ids[0])
    for ctx in PROBE_CONTEXTS:
        for a in DIGITS:
            probe = "".join(f"{a}{ctx}{b}" for b in DIGITS)
            got = [i for i in tokenizer.encode(probe, add_special_tokens=False) if i in digit_ids]
            want = [digit_ids[int(c)] for c in probe if c in DIGITS]
            if got != want:
                return f"the digits of {probe!r} do not come out one token each"
    return None


def check_digit_tokens(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The token id of each digit, after checking that the fast encoder can be exact with this tokenizer."""
    problem = digit_safety_problem(tokenizer)
    if problem:
        raise TokenizerNotSupported(f"tokenizer {tokenizer.name_or_path}: {problem}; the fast encoder needs one "
                                    "token per digit that never joins other text (use --encoder text)")
    return np.asarray([tokenizer.encode(d, add_special_tokens=False)[0] for d in DIGITS], dtype=np.int32)


class FastEncoder:
    """Token-exact encoder: numba for grids, cached tokenization for the text between digits."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: GridFormat | None = None, train_on: str = "answer"):
        self.tokenizer = tokenizer
        self.fmt = fmt or grid_format()
        self.train_on = train_on
        self.digit_ids = check_digit_tokens(tokenizer)
        self.chat = ChatPieces.from_tokenizer(tokenizer)
        self.check_special = SpecialTextCheck(tokenizer)
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

    def _text(self, text: str, parts: list[np.ndarray]) -> int:
        """Append the ids of any text (split at digits, each stretch from the cache); returns how many."""
        ids = self._cache.get(text)
        if ids is None:
            pieces = [self._lookup(p) for p in SPLIT_DIGITS.split(text) if p]
            if len(pieces) > WHOLE_TEXT_MAX_PIECES:
                parts.extend(pieces)
                return sum(len(p) for p in pieces)
            ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
            if len(self._cache) < CHUNK_CACHE_LIMIT:
                self._cache[text] = ids
        parts.append(ids)
        return len(ids)

    def _segments(self, segments: list[Segment], parts: list[np.ndarray], pending: str, pos: int,
                  trained: tuple[int, ...] = (), spans: list | None = None) -> int:
        fmt = self.fmt
        for i, seg in enumerate(segments):
            if type(seg) is str:
                pending += seg
            else:
                pos += self._text(pending + fmt.prefix, parts)
                body = grid_body_tokens(seg, self.table)
                if i in trained:
                    spans.append((pos, pos + len(body)))
                parts.append(body)
                pos += len(body)
                pending = fmt.suffix
        return pos + self._text(pending, parts)

    def encode(self, sample: Sample) -> EncodedSample:
        self.check_special(sample)
        parts: list[np.ndarray] = []
        spans: list[tuple[int, int]] = []
        n_prompt = self._segments([*sample.user, self.chat.mid], parts, self.chat.prefix, 0,
                                  trained_outputs(sample, self.train_on), spans)
        if sample.answer:
            end = self._segments(sample.answer, parts, "", n_prompt)
            parts.append(self.suffix_ids)
            spans.append((n_prompt, end + self.n_end_of_turn))
        return EncodedSample(np.concatenate(parts), _spans(spans))


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def verify_token_exact(fast: FastEncoder, reference: TextEncoder, samples: list[Sample]) -> None:
    """Raise ``TokenMismatchError`` naming the tokenizer and the first difference (ids or trained spans)."""
    tok = fast.tokenizer
    for i, sample in enumerate(samples):
        a, b = fast.encode(sample), reference.encode(sample)
        if np.array_equal(a.ids, b.ids) and np.array_equal(a.spans, b.spans):
            continue
        p = first_difference(a.ids, b.ids)
        where = f"tokenizer {tok.name_or_path}: sample {i} ({sample.source} {sample.task_id})"
        if p == len(a.ids) == len(b.ids):
            raise TokenMismatchError(f"{where}: same ids but trained spans differ: fast {a.spans.tolist()} vs text "
                                     f"path {b.spans.tolist()}")
        raise TokenMismatchError(
            f"{where}: fast encoding differs from tokenizer(text) at token {p}: fast {a.ids[p:p + 4].tolist()} "
            f"{tok.decode(a.ids[p:p + 4])!r} vs text path {b.ids[p:p + 4].tolist()} {tok.decode(b.ids[p:p + 4])!r}")
