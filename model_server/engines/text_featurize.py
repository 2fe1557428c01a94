"""Hashed n-gram features for the fastText-style text classifier.

Training (``demo_store/classifier.py``) and serving (``text_classifier``)
import this one module, so the features a model learned from are, by
construction, the features it is served with. It is pure Python + numpy (no
torch) and fully deterministic: the hash is ``zlib.crc32``, never Python's
``hash()``, whose per-process salt would make a model trained in one process
meaningless in the next.

Features of a text: word unigrams, word bigrams and the character 3-grams of
each word (with ``<``/``>`` boundary marks, as fastText does), each prefixed by
its kind so a word and a trigram that spell the same never share a bucket on
purpose. Digit runs become one ``0`` so "order 1042" and "order 88123" look
alike: the number's value carries no intent. Character n-grams are what make
typos ("pasword", "wher is my ordr") land near the right words.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

# Bump when the feature recipe changes: models record it and the engine checks
# it, so a model is never served with features it was not trained on.
FEATURIZER_VERSION = 1
DEFAULT_BUCKETS = 1 << 15

# Letters/digits runs, keeping in-word apostrophes ("don't", "what's").
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_DIGITS = re.compile(r"\d+")
_CHAR_N = 3


def tokenize(text: str) -> list[str]:
    """Lowercased words with every digit run folded to ``0``."""
    lowered = text.lower().replace("\u2019", "'")  # curly apostrophe from phones
    return [_DIGITS.sub("0", w) for w in _WORD.findall(lowered)]


def feature_strings(text: str) -> list[str]:
    """The feature strings of one text, in a stable order (duplicates kept:
    a repeated word weighs more in the mean, as in fastText)."""
    return word_features(tokenize(text))


def word_features(words: Sequence[str]) -> list[str]:
    """Feature strings of already-tokenized words."""
    feats = [f"w:{w}" for w in words]
    feats.extend(f"b:{a} {b}" for a, b in zip(words, words[1:]))
    for w in words:
        padded = f"<{w}>"
        feats.extend(f"c:{padded[i:i + _CHAR_N]}" for i in range(len(padded) - _CHAR_N + 1))
    return feats


def bucket_of(feature: str, buckets: int) -> int:
    return zlib.crc32(feature.encode("utf-8")) % buckets


def featurize(text: str, buckets: int = DEFAULT_BUCKETS) -> list[int]:
    """Bucket ids of one text. May be empty (a text of punctuation only); the
    model's EmbeddingBag then yields a zero vector and the bias decides."""
    return featurize_words(tokenize(text), buckets)


def featurize_words(words: Sequence[str], buckets: int = DEFAULT_BUCKETS) -> list[int]:
    """Bucket ids of already-tokenized words (callers that also count words)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return [bucket_of(f, buckets) for f in word_features(words)]


def pack(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-text bucket ids -> (flat ids, offsets), the int64 pair that
    ``torch.nn.EmbeddingBag(mode="mean")`` takes: row i is
    ``ids[offsets[i]:offsets[i + 1]]``."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows), dtype=np.int64)
    if len(rows) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(lengths.sum()))
    return flat, offsets


def featurize_batch(texts: Sequence[str], buckets: int = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, offsets) for a list of texts."""
    return pack([featurize(t, buckets) for t in texts])
