"""``text-classifier``: label texts with a TorchScript bag-of-hashed-features model.

The version directory holds ``model.pt`` (TorchScript: ``forward(ids, offsets)
-> probabilities [rows, n_labels]``) and ``labels.json`` (label of each
column). Featurization (``text_featurize``) happens in ``prepare`` on the
event loop: it is pure Python and bounded by ``max_chars``. A batch is then a
single EmbeddingBag call over every item's rows, whatever their lengths, since
bags need no padding; the results are cut back per item.

Outputs: ``label`` (BYTES, the argmax label), ``probabilities`` (FP32, one
column per label, in ``labels.json`` order) and ``confidence`` (FP32, the
probability of the chosen label).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from model_server.engines.base import Engine, InferItem, ItemResult, decode_texts, register
from model_server.engines.text_featurize import (DEFAULT_BUCKETS, FEATURIZER_VERSION, featurize_words,
                                                 pack, tokenize)
from model_server.engines.torch_util import inference_threads, resolve_device
from model_server.engines.torchscript import DEFAULT_FILE, load_torchscript, version_file

TEXT = "text"
LABELS_FILE = "labels.json"


def read_labels(raw: str, declared: Any, columns: int | None) -> list[str]:
    """Labels from labels.json, checked against the manifest's ``options.labels``
    and the ``probabilities`` width, so a mismatched store version fails at load
    rather than answering with shifted labels."""
    labels = json.loads(raw)
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        raise ValueError(f"{LABELS_FILE} must be a non-empty JSON list of label strings")
    if declared is not None and list(declared) != labels:
        raise ValueError(f"{LABELS_FILE} {labels} differs from the manifest's options.labels {declared}")
    if columns not in (None, -1) and columns != len(labels):
        raise ValueError(f"{LABELS_FILE} has {len(labels)} labels, output 'probabilities' "
                         f"declares {columns} columns")
    return labels


@register
class TextClassifierEngine(Engine):
    kind = "text-classifier"

    def load(self) -> None:
        import torch

        version = int(self.ctx.option("featurizer_version", FEATURIZER_VERSION))
        if version != FEATURIZER_VERSION:
            raise ValueError(f"model was trained with featurizer version {version}, this server has "
                             f"{FEATURIZER_VERSION}; rebuild it (cmesh models bootstrap --force)")
        inference_threads(self.ctx.option("torch_threads"))
        self.device = resolve_device(self.ctx.device)
        self.buckets = int(self.ctx.option("buckets", DEFAULT_BUCKETS))
        self.max_chars = int(self.ctx.option("max_chars", 2000))
        probs = next((o for o in self.outputs if o.name == "probabilities"), None)
        self.labels = read_labels((self.ctx.model_dir / LABELS_FILE).read_text(encoding="utf-8"),
                                  self.ctx.option("labels"),
                                  probs.shape[-1] if probs is not None and len(probs.shape) == 2 else None)
        self._label_bytes = np.array([label.encode("utf-8") for label in self.labels], dtype=object)
        path = version_file(self.ctx.model_dir, str(self.ctx.option("file", DEFAULT_FILE)))
        self.model = load_torchscript(path, self.device)
        self._torch = torch

    def warmup(self) -> None:
        # Both ends of the batch range: TorchScript's profiling executor
        # specialises on the first calls, so prime the sizes serving will see.
        for n in sorted({1, self.ctx.max_batch_size}):
            item = self.prepare({TEXT: np.array([b"where is my order 1042?"] * n, dtype=object)}, {})
            self.run_batch([item])

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        words = [tokenize(t) for t in decode_texts(TEXT, inputs[TEXT], max_chars=self.max_chars)]
        features = [featurize_words(w, self.buckets) for w in words]
        return InferItem(inputs=inputs, parameters=parameters, rows=rows,
                         input_tokens=sum(len(w) for w in words), prepared=features)

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        probabilities = self.classify([row for item in items for row in item.prepared])
        best = probabilities.argmax(axis=1)
        labels = self._label_bytes[best]
        confidence = probabilities[np.arange(len(best)), best]
        results, start = [], 0
        for item in items:
            end = start + item.rows
            results.append(ItemResult(outputs={"label": labels[start:end],
                                               "probabilities": probabilities[start:end],
                                               "confidence": confidence[start:end]}))
            start = end
        return results

    def classify(self, rows: list[list[int]]) -> np.ndarray:
        """Probabilities [len(rows), n_labels] for featurized rows, one model call."""
        torch = self._torch
        ids, offsets = pack(rows)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids).to(self.device), torch.from_numpy(offsets).to(self.device))
            probabilities = out.float().cpu().numpy()
        if probabilities.shape != (len(rows), len(self.labels)):
            raise RuntimeError(f"model returned shape {list(probabilities.shape)} for {len(rows)} texts "
                               f"and {len(self.labels)} labels")
        return probabilities

    def unload(self) -> None:
        self.model = None
