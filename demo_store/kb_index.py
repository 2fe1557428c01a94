"""``kb-index/1``: the support knowledge base embedded with MiniLM, for ``vector-index``.

The index is built with the very engine that serves ``minilm-l6/1`` at run time, so
document and query vectors come from the same code path (tokenisation, pooling,
normalisation) and cosine scores are comparable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from demo_store.base import DATA_DIR, Artifact, BuildContext
from cmesh.manifest import MANIFEST_FILE, Manifest, dump_manifest, parse_manifest

EMBEDDER = ("minilm-l6", "1")
DIMENSIONS = 384
KB_FILE = "kb.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
DOCS_FILE = "docs.jsonl"


def load_articles(path: Path) -> list[dict[str, str]]:
    """Parse kb.jsonl, failing loudly on a malformed line or a duplicate id."""
    articles, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        doc = json.loads(line)
        missing = [k for k in ("id", "title", "text") if not str(doc.get(k, "")).strip()]
        if missing:
            raise ValueError(f"{path}:{lineno}: article lacks {missing}")
        if doc["id"] in seen:
            raise ValueError(f"{path}:{lineno}: duplicate article id {doc['id']!r}")
        seen.add(doc["id"])
        articles.append({"id": doc["id"], "title": doc["title"], "text": doc["text"]})
    if not articles:
        raise ValueError(f"{path}: no articles")
    return articles


def document_text(article: dict[str, str]) -> str:
    # The title carries most of the intent ("How to reset your password"), so it is
    # embedded together with the body rather than the body alone.
    return f"{article['title']}. {article['text']}"


def load_embedder(model_dir: Path):
    """An HFEncoderEngine over the built MiniLM directory, ready for ``embed``."""
    from model_server.engines.base import EngineContext
    from model_server.engines.hf_encoder import HFEncoderEngine

    manifest = parse_manifest((model_dir / MANIFEST_FILE).read_text(),
                              source=str(model_dir / MANIFEST_FILE))
    engine = HFEncoderEngine(EngineContext(
        model="minilm", variant="default", model_dir=model_dir, manifest=manifest,
        max_batch_size=32, options=dict(manifest.options)))
    engine.load()
    return engine


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("an article embedded to the zero vector")
    return (matrix / norms).astype(np.float32)


def build(out: Path, ctx: BuildContext) -> None:
    articles = load_articles(ctx.data_dir / KB_FILE)
    ctx.progress(f"  embedding {len(articles)} articles with {'/'.join(EMBEDDER)}")
    engine = load_embedder(ctx.version_dir(*EMBEDDER))
    try:
        vectors = engine.embed([document_text(a) for a in articles])
    finally:
        engine.unload()
    if vectors.shape != (len(articles), DIMENSIONS):
        raise ValueError(f"embedder returned shape {vectors.shape}, expected "
                         f"({len(articles)}, {DIMENSIONS})")
    # Re-normalise even though MiniLM's manifest asks for it: the index engine's
    # dot product is a cosine only if this holds, whatever the embedder options.
    np.save(out / EMBEDDINGS_FILE, normalise_rows(vectors))
    with open(out / DOCS_FILE, "w", encoding="utf-8") as fh:
        for a in articles:
            fh.write(json.dumps(a, ensure_ascii=False) + "\n")
    manifest = Manifest(
        name="kb-index", version="1", engine="vector-index", platform="numpy",
        description="Support knowledge base: top-k cosine search over MiniLM embeddings",
        inputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, DIMENSIONS]}],
        outputs=[{"name": "ids", "datatype": "BYTES", "shape": [-1, -1]},
                 {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
                 {"name": "passages", "datatype": "BYTES", "shape": [-1, -1]}],
        batching={"max_batch_size": 64, "max_queue_delay_ms": 1},
        memory_mb=16,
        options={"top_k": 3, "max_top_k": 20, "embedder": "/".join(EMBEDDER),
                 "embeddings": EMBEDDINGS_FILE, "docs": DOCS_FILE},
        metadata={"doc_count": len(articles), "dimensions": DIMENSIONS,
                  "source": f"demo_store/data/{KB_FILE}"},
    )
    (out / MANIFEST_FILE).write_text(dump_manifest(manifest))
    ctx.progress(f"  indexed {len(articles)} articles")


def _fingerprint() -> str:
    # Recipe revision plus a digest of the shipped articles, so editing kb.jsonl
    # rebuilds existing stores without anyone remembering to bump a number.
    digest = hashlib.sha256((DATA_DIR / KB_FILE).read_bytes()).hexdigest()[:12]
    return f"1-{digest}"


ARTIFACTS = [Artifact("kb-index", "1", build, fingerprint=_fingerprint(),
                      depends=("minilm-l6/1",))]
