"""``intent-classifier/1``: a fastText-style intent classifier trained at bootstrap.

The model is an ``EmbeddingBag(mean)`` over hashed word/bigram/char-trigram
features (``model_server.engines.text_featurize``, the same code the serving
engine uses) followed by one linear layer: tiny, CPU-fast, and trainable in a
few seconds from the labelled set shipped in ``demo_store/data/intents.jsonl``.

Training is seeded and single-process deterministic (fixed epochs, seeded init
and shuffling, two threads), so two bootstraps of the same data produce the
same model. A stratified held-out split measures it; the shipped model is the
one trained on the train split, so the accuracy in its manifest is the honest
accuracy of that very model.
"""
from __future__ import annotations

import json
import random
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from demo_store.base import DATA_DIR, Artifact, BuildContext
from cmesh.manifest import Manifest, dump_manifest
from model_server.engines.text_featurize import FEATURIZER_VERSION, featurize, pack

NAME = "intent-classifier"
DATA_FILE = "intents.jsonl"
MODEL_FILE = "model.pt"
LABELS_FILE = "labels.json"
_RECIPE_VERSION = "1"


@dataclass(frozen=True)
class TrainConfig:
    buckets: int = 1 << 15        # hash space; collisions are rare at this data size
    dim: int = 48                 # embedding width
    epochs: int = 15              # fixed, not time-based, so results are reproducible
    batch_size: int = 16
    lr: float = 0.02
    held_out: float = 0.2         # fraction of each class kept for evaluation
    threads: int = 2
    seed: int = 0


# -- pure logic -------------------------------------------------------------------

def load_examples(path: Path) -> list[tuple[str, str]]:
    """(text, label) pairs from a JSONL file; errors name the line."""
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{\"text\": ..., \"label\": ...}} ({exc})") from None
        if not (isinstance(text, str) and text.strip() and isinstance(label, str) and label):
            raise ValueError(f"{path}:{n}: text and label must be non-empty strings")
        examples.append((text, label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, held_out): ``fraction`` of every class held out (at least one
    example per class of two or more), chosen by a seeded shuffle."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train, held = [], []
    for label in sorted(by_class):
        idx = by_class[label][:]
        rng.shuffle(idx)
        k = round(len(idx) * fraction)
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(held)


def evaluate(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support."""
    per_class = {}
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        fp = sum(t != label and p == label for t, p in zip(y_true, y_pred))
        fn = sum(t == label and p != label for t, p in zip(y_true, y_pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": round(precision, 4), "recall": round(recall, 4),
                            "f1": round(f1, 4), "support": tp + fn}
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    return {
        "accuracy": correct / len(y_true) if y_true else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels) if labels else 0.0,
        "per_class": per_class,
    }


def data_digest(path: Path) -> str:
    """Short content hash of the training data, part of the artifact fingerprint so
    editing intents.jsonl rebuilds the model on the next bootstrap."""
    try:
        return f"{zlib.crc32(path.read_bytes()):08x}"
    except OSError:
        return "missing"


# -- torch ------------------------------------------------------------------------

def _model_class():
    # Defined lazily so importing the bootstrap registry does not import torch.
    import torch
    from torch import nn

    class FastTextClassifier(nn.Module):
        """Mean of hashed-feature embeddings -> linear -> softmax."""

        def __init__(self, buckets: int, dim: int, n_labels: int) -> None:
            super().__init__()
            self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean", sparse=True)
            self.linear = nn.Linear(dim, n_labels)
            # fastText's init: small uniform embeddings, zero classifier, so an
            # unseen feature contributes almost nothing.
            nn.init.uniform_(self.embedding.weight, -1.0 / dim, 1.0 / dim)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

        def logits(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.linear(self.embedding(ids, offsets))

        def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.logits(ids, offsets), dim=-1)

    return FastTextClassifier


def train(rows: list[list[int]], targets: list[int], n_labels: int, config: TrainConfig):
    """Train on featurized rows; returns the model in eval mode. Leaves torch's
    global RNG and thread count as it found them."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = _model_class()(config.buckets, config.dim, n_labels)
            # Sparse updates for the embedding: a step touches only the buckets its
            # batch used, which keeps training in seconds however wide the hash space.
            optimizers = [torch.optim.SparseAdam(list(model.embedding.parameters()), lr=config.lr),
                          torch.optim.Adam(model.linear.parameters(), lr=config.lr)]
            order = torch.Generator().manual_seed(config.seed)
            y = torch.tensor(targets, dtype=torch.int64)
            model.train()
            for _ in range(config.epochs):
                perm = torch.randperm(len(rows), generator=order).tolist()
                for start in range(0, len(perm), config.batch_size):
                    batch = perm[start:start + config.batch_size]
                    ids, offsets = pack([rows[i] for i in batch])
                    loss = torch.nn.functional.cross_entropy(
                        model.logits(torch.from_numpy(ids), torch.from_numpy(offsets)), y[batch])
                    for opt in optimizers:
                        opt.zero_grad()
                    loss.backward()
                    for opt in optimizers:
                        opt.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads_before)


def predict(model, rows: list[list[int]]) -> list[int]:
    import torch

    ids, offsets = pack(rows)
    with torch.inference_mode():
        return model(torch.from_numpy(ids), torch.from_numpy(offsets)).argmax(dim=1).tolist()


def save_torchscript(model, path: Path) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but is exactly the self-contained,
        # Python-free format the `torch` engines load; the warning is noise here.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        torch.jit.script(model).save(str(path))


# -- the artifact -------------------------------------------------------------------

def build(out: Path, ctx: BuildContext, config: TrainConfig | None = None) -> None:
    config = config or TrainConfig(seed=ctx.seed)
    examples = load_examples(ctx.data_dir / DATA_FILE)
    texts = [t for t, _ in examples]
    labels = sorted({label for _, label in examples})
    index = {label: i for i, label in enumerate(labels)}
    targets = [index[label] for _, label in examples]
    rows = [featurize(t, config.buckets) for t in texts]

    train_idx, held_idx = stratified_split([label for _, label in examples], config.held_out, config.seed)
    ctx.progress(f"  training on {len(train_idx)} examples, {len(labels)} intents "
                 f"({len(held_idx)} held out)")
    started = time.monotonic()
    model = train([rows[i] for i in train_idx], [targets[i] for i in train_idx], len(labels), config)
    seconds = time.monotonic() - started

    predicted = predict(model, [rows[i] for i in held_idx])
    report = evaluate([labels[targets[i]] for i in held_idx], [labels[p] for p in predicted], labels)
    ctx.progress(f"  held-out accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
                 f"on {len(held_idx)} examples; trained in {seconds:.1f}s")

    save_torchscript(model, out / MODEL_FILE)
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n")

    train_counts = Counter(labels[targets[i]] for i in train_idx)
    held_counts = Counter(labels[targets[i]] for i in held_idx)
    params = config.buckets * config.dim + (config.dim + 1) * len(labels)
    manifest = Manifest(
        name=NAME, version="1", engine="text-classifier",
        description="intent classifier: mean of hashed word/bigram/char-trigram embeddings -> linear",
        inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        outputs=[{"name": "label", "datatype": "BYTES", "shape": [-1]},
                 {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]},
                 {"name": "confidence", "datatype": "FP32", "shape": [-1]}],
        batching={"max_batch_size": 128, "max_queue_delay_ms": 2},
        # weights twice (file + loaded) plus the TorchScript runtime's own overhead
        memory_mb=int(params * 4 * 2 / 2**20) + 32,
        options={"buckets": config.buckets, "max_chars": 2000, "labels": labels,
                 "featurizer_version": FEATURIZER_VERSION},
        metadata={
            "held_out_accuracy": round(report["accuracy"], 4),
            "held_out_macro_f1": round(report["macro_f1"], 4),
            "train_examples": len(train_idx),
            "held_out_examples": len(held_idx),
            "per_class": {label: {"train": train_counts[label], "held_out": held_counts[label],
                                  **report["per_class"][label]} for label in labels},
            "training_seconds": round(seconds, 2),
            "train_config": asdict(config),
            "data": DATA_FILE,
            "data_crc32": data_digest(ctx.data_dir / DATA_FILE),
        },
    )
    (out / "model.yaml").write_text(dump_manifest(manifest))


def fingerprint() -> str:
    """Recipe, featurizer, hyper-parameters and data: a change to any rebuilds the model."""
    config = f"{zlib.crc32(json.dumps(asdict(TrainConfig()), sort_keys=True).encode()):08x}"
    return f"{_RECIPE_VERSION}.f{FEATURIZER_VERSION}.{config}.{data_digest(DATA_DIR / DATA_FILE)}"


ARTIFACTS = [Artifact(NAME, "1", build, fingerprint=fingerprint())]
