"""CLIP's byte-level BPE tokenizer: the same ids as OpenAI's reference, tuned for input pipelines.

`tokenize(texts, context_length=77)` -> np.int32 [N, L]: start token 49406, the BPE ids, end token
49407 (always the last id, also when truncated), zero padding. `tokenize_tf` wraps it for tf.data.

Text cleaning follows the reference exactly: ftfy `fix_text`, HTML unescape twice, strip, collapse
whitespace runs, lowercase, split with CLIP's pre-tokenisation regex. Plain printable ASCII without
'&' is unchanged by ftfy and HTML unescaping, so such text (most captions) skips both; the tests
check this equivalence. Each pre-token's ids are cached, so BPE merges run once per distinct word;
on the ASCII path so are the ids of each space-separated chunk ("dog," -> ids of "dog" and ","),
which is exact because no pre-token spans a space.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
# The vocabulary: 256 byte symbols, the same with an end-of-word marker, the merges, 2 specials.
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
_END_OF_WORD = "</w>"

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, and
# runs of anything else that is not whitespace. Applied to lowercased text, case-insensitively.
_SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RUN = regex.compile(r"\s+")
# The same split for lowercased printable ASCII, where \p{L} is [a-z], \p{N} is [0-9], \s is ' '
# (stdlib `re` runs this ASCII-only pattern twice as fast as `regex`).
_ASCII_SPLIT_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+"""
)


def default_vocab_path() -> Path:
    """The BPE merges file shipped as package data."""
    return Path(
        str(importlib.resources.files("clipjax.data") / "assets" / "bpe_simple_vocab_16e6.txt.gz")
    )


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value (index = byte), as GPT-2/CLIP byte-level BPE.

    Bytes that are visible latin-1 characters stand for themselves; the other 68 bytes (controls,
    space, NBSP, soft hyphen) are given the characters U+0100.. in increasing byte order.
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for b in range(256):
        if b in visible:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + extra))
            extra += 1
    return symbols


def clean_text(text: str) -> str:
    """The reference cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _is_plain_ascii(text: str) -> bool:
    """True for text that ftfy and HTML unescaping leave unchanged: printable ASCII without '&'."""
    return text.isascii() and text.isprintable() and "&" not in text


class Tokenizer:
    """CLIP BPE tokenizer with a per-pre-token id cache (bounded by `cache_size` entries)."""

    def __init__(self, vocab_path: str | Path | None = None, cache_size: int = 1_000_000):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        self._byte_symbols = byte_symbols()
        merges = _read_merges(path)
        # Vocabulary order: visible-byte symbols first, then the remapped ones (both in byte order),
        # the same again with the end-of-word marker, the merged symbols in rank order, specials.
        base = sorted(self._byte_symbols, key=ord)
        vocab = base + [s + _END_OF_WORD for s in base] + [a + b for a, b in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(
                f"BPE file {path}: expected {VOCAB_SIZE} distinct vocabulary entries, "
                f"got {len(self.encoder)}"
            )
        self.decoder: list[str] = vocab
        self._ranks: dict[tuple[str, str], int] = {pair: r for r, pair in enumerate(merges)}
        self._cache_size = cache_size
        self._cache: dict[str, tuple[int, ...]] = {}  # pre-token -> ids
        self._chunk_cache: dict[str, tuple[int, ...]] = {}  # plain-ASCII chunk -> ids
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._cache.clear()
        self._cache[SOT_TOKEN] = (SOT_ID,)
        self._cache[EOT_TOKEN] = (EOT_ID,)

    def _bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one pre-token, lowest-ranked adjacent pair first."""
        parts = [self._byte_symbols[b] for b in word.encode("utf-8")]
        parts[-1] += _END_OF_WORD
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if len(self._cache) >= self._cache_size:
            self._reset_cache()  # a crude bound; frequent words come straight back
        ids = tuple(self.encoder[p] for p in self._bpe(word))
        self._cache[word] = ids
        return ids

    def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
        if len(self._chunk_cache) >= self._cache_size:
            self._chunk_cache.clear()
        ids: list[int] = []
        for word in _ASCII_SPLIT_PATTERN.findall(chunk):
            word_ids = self._cache.get(word)
            ids.extend(word_ids if word_ids is not None else self._word_ids(word))
        chunk_ids = tuple(ids)
        self._chunk_cache[chunk] = chunk_ids
        return chunk_ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens."""
        ids: list[int] = []
        if _is_plain_ascii(text):
            # Cleaning is then only whitespace collapsing and lowercasing; split() does the first.
            chunk_cache = self._chunk_cache
            for chunk in text.lower().split():
                chunk_ids = chunk_cache.get(chunk)
                ids.extend(chunk_ids if chunk_ids is not None else self._chunk_ids(chunk))
            return ids
        cache = self._cache
        for word in _SPLIT_PATTERN.findall(clean_text(text)):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._word_ids(word)
            ids.extend(word_ids)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one row of ids: skips the start token, stops at the end token (or padding)."""
        byte_of = {s: b for b, s in enumerate(self._byte_symbols)}
        pieces = []
        for i in ids:
            i = int(i)
            if i == EOT_ID:
                break
            if i != SOT_ID:
                pieces.append(self.decoder[i])
        data = bytes(byte_of[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True
    ) -> np.ndarray:
        """Token ids np.int32 [N, context_length]; see the module docstring."""
        if isinstance(texts, str):
            texts = [texts]
        if (
            isinstance(context_length, bool)
            or not isinstance(context_length, (int, np.integer))
            or context_length < 2
        ):
            raise ValueError(
                f"context_length must be an int >= 2 (room for the start and end "
                f"tokens), got {context_length!r}"
            )
        keep = context_length - 2
        flat: list[int] = []
        lengths = np.empty(len(texts), np.int64)
        encode = self.encode
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be a str, got {type(text).__name__}")
            ids = encode(text)
            if len(ids) > keep:
                if not truncate:
                    raise ValueError(
                        f"texts[{row}] has {len(ids) + 2} tokens, more than "
                        f"context_length={context_length}; pass truncate=True"
                    )
                ids = ids[:keep]
            flat.append(SOT_ID)
            flat.extend(ids)
            flat.append(EOT_ID)
            lengths[row] = len(ids) + 2
        out = np.zeros((len(texts), context_length), np.int32)
        # Row-major boolean assignment puts each row's ids at its start: one vectorised scatter.
        out[np.arange(context_length) < lengths[:, None]] = flat
        return out


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read the BPE merges file {path} (expected gzipped text): {e}")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"BPE file {path}: expected a header line then {_NUM_MERGES} lines of "
            f"'first second' merge pairs"
        )
    return merges


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged vocabulary (built once per process)."""
    return Tokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = True
) -> np.ndarray:
    """CLIP token ids np.int32 [N, context_length], identical to OpenAI's `clip.tokenize`
    (with truncate=True: a too-long text keeps its first ids and ends with the end token)."""
    return default_tokenizer()(texts, context_length=context_length, truncate=truncate)


def _tokenize_bytes(texts: np.ndarray, context_length: int) -> np.ndarray:
    strings = [t.decode("utf-8", errors="replace") for t in texts.reshape(-1)]
    return tokenize(strings, context_length=context_length)


def tokenize_tf(texts, context_length: int = 77):
    """tf.data-usable tokenize: tf.string scalar or [N] -> tf.int32 [L] or [N, L] (static L).

    Runs the Python tokenizer through `tf.numpy_function`; invalid UTF-8 bytes become U+FFFD.
    Call it on batches of captions: the per-call overhead is then negligible.
    """
    import tensorflow as tf

    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    if texts.shape.rank not in (0, 1):
        raise ValueError(
            f"tokenize_tf expects a tf.string scalar or vector, got shape {texts.shape}"
        )
    batch = tf.reshape(texts, [-1])
    ids = tf.numpy_function(
        functools.partial(_tokenize_bytes, context_length=context_length),
        [batch],
        tf.int32,
        stateful=False,
        name="clip_tokenize",
    )
    if texts.shape.rank == 0:
        return tf.ensure_shape(tf.reshape(ids, [context_length]), [context_length])
    return tf.ensure_shape(ids, [texts.shape[0], context_length])
