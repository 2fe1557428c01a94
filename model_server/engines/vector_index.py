"""``vector-index``: exact top-k cosine search over a small, in-memory document index.

The store version holds ``embeddings.npy`` (float32 [N, D], rows L2-normalised) and
``docs.jsonl`` (id, title, text per row, same order). Queries are normalised here,
so a dot product is a cosine. A batch is one matrix product: every item's rows are
stacked, scored once with the largest ``top_k`` any item asked for, and each item
keeps the first ``top_k`` columns of its own rows (a prefix of a sorted top-k is
the smaller top-k).
"""
from __future__ import annotations

import json
import numbers
from typing import Any

import numpy as np

from cmesh.errors import InvalidInput
from model_server.engines.base import Engine, InferItem, ItemResult, register

EMBEDDING = "embedding"
TOP_K = "top_k"


# -- pure logic -------------------------------------------------------------------

def parse_top_k(value: Any, default: int, maximum: int) -> int:
    """The ``top_k`` request parameter as an int in 1..maximum, else InvalidInput."""
    if value is None:
        return default
    # bool is an int subclass; "top_k": true is a client bug, not k=1.
    if isinstance(value, bool):
        raise InvalidInput(TOP_K, f"must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)  # numpy integers too
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        # OIP string parameters: some clients send every parameter as a string.
        value = int(value.strip())
    if not isinstance(value, int):
        raise InvalidInput(TOP_K, f"must be an integer, got {value!r}")
    if not 1 <= value <= maximum:
        raise InvalidInput(TOP_K, f"must be between 1 and {maximum}, got {value}")
    return value


def normalise_queries(array: np.ndarray) -> np.ndarray:
    """Finite, non-zero query rows scaled to unit length (float32), else InvalidInput."""
    matrix = np.asarray(array, dtype=np.float32)
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise InvalidInput(EMBEDDING, f"row {int(np.argmax(bad))} holds NaN or infinite values")
    # Norms in float64: a tiny-but-valid float32 vector must not square to zero.
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    zero = ~(norms > 0)
    if zero.any():
        raise InvalidInput(EMBEDDING, f"row {int(np.argmax(zero))} is the zero vector; "
                                      "cosine similarity is undefined for it")
    return (matrix / norms[:, None]).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices and scores of the ``k`` best columns, best first.
    Ties break by lower index, so results are deterministic."""
    k = min(k, scores.shape[1])
    # A stable full sort, not argpartition: argpartition picks an arbitrary member of
    # a tie at the k-th place. At knowledge-base sizes the sort costs microseconds.
    indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(scores, indices, axis=1)


# -- engine -------------------------------------------------------------------------

@register
class VectorIndexEngine(Engine):
    kind = "vector-index"

    def load(self) -> None:
        model_dir = self.ctx.model_dir
        embeddings = np.load(model_dir / self.ctx.option("embeddings", "embeddings.npy"))
        docs_path = model_dir / self.ctx.option("docs", "docs.jsonl")
        docs = [json.loads(line) for line in docs_path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        if embeddings.ndim != 2 or embeddings.shape[0] != len(docs) or not docs:
            raise ValueError(f"{model_dir}: embeddings shape {embeddings.shape} does not match "
                             f"{len(docs)} documents")
        spec_dim = self.ctx.manifest.input(EMBEDDING).shape[-1]
        if spec_dim != -1 and spec_dim != embeddings.shape[1]:
            raise ValueError(f"{model_dir}: embeddings have {embeddings.shape[1]} dimensions, "
                             f"the manifest declares {spec_dim}")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.ids = np.array([d["id"].encode() for d in docs], dtype=object)
        self.passages = np.array([f"{d['title']}: {d['text']}".encode() for d in docs],
                                 dtype=object)
        self.max_top_k = int(self.ctx.option("max_top_k", 20))
        self.default_top_k = int(self.ctx.option("top_k", 3))
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise ValueError(f"option top_k={self.default_top_k} must be in 1..max_top_k="
                             f"{self.max_top_k}")

    def warmup(self) -> None:
        item = self.prepare({EMBEDDING: self.embeddings[:1].copy()}, {})
        self.run_batch([item])

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        if inputs[EMBEDDING].shape[1] != self.embeddings.shape[1]:
            raise InvalidInput(EMBEDDING, f"has {inputs[EMBEDDING].shape[1]} dimensions, the "
                                          f"index has {self.embeddings.shape[1]}")
        k = parse_top_k(parameters.get(TOP_K), self.default_top_k, self.max_top_k)
        queries = normalise_queries(inputs[EMBEDDING])
        return InferItem(inputs=inputs, parameters=parameters, rows=rows,
                         prepared=(queries, k))

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        queries = np.concatenate([item.prepared[0] for item in items], axis=0)
        k_max = max(item.prepared[1] for item in items)
        indices, scores = top_k(queries @ self.embeddings.T, k_max)
        results, start = [], 0
        for item in items:
            k = item.prepared[1]
            idx = indices[start:start + item.rows, :k]
            results.append(ItemResult(outputs={
                "ids": self.ids[idx],
                "scores": np.ascontiguousarray(scores[start:start + item.rows, :k],
                                               dtype=np.float32),
                "passages": self.passages[idx],
            }))
            start += item.rows
        return results

    def memory_bytes(self) -> int:
        embeddings = getattr(self, "embeddings", None)
        if embeddings is None:
            return super().memory_bytes()
        return int(embeddings.nbytes + sum(len(p) for p in self.passages))

    def unload(self) -> None:
        self.embeddings = None
