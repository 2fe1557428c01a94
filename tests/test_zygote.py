"""The replica fork server's preload: what a forked replica inherits.

Forking is only safe while the zygote has a single thread and has not touched
CUDA, so preloading must import the heavy libraries and the server without
starting a thread or asking for a GPU. Replicas forked
from it serve end to end in tests/test_autoscaler_e2e.py."""
import json
import subprocess
import sys

from meshtest import REPO

PROBE = r"""
import json, os, sys, threading
from autoscaler.providers.zygote import PRELOAD, preload
preload(["bert", "llama", "not_an_architecture"])
try:
    import transformers.conversion_mapping as cm
    conversions = getattr(cm, "_checkpoint_conversion_mapping_cache", None) is not None
except ImportError:
    conversions = None
print(json.dumps({
    "python_threads": threading.active_count(),
    "missing": [m for m in PRELOAD if m not in sys.modules],
    "modeling": [m for m in ("transformers.models.bert.modeling_bert",
                             "transformers.models.llama.modeling_llama") if m not in sys.modules],
    "conversions": conversions,
    "deferred": sorted(sys.modules["model_server.engines.base"]._DEFERRED),
    "cuda_initialized": sys.modules["torch"].cuda.is_initialized(),
}))
"""


def test_preload_imports_the_server_and_starts_no_thread():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["python_threads"] == 1
    assert facts["missing"] == []
    assert facts["modeling"] == []                    # every architecture of the store, once
    assert facts["conversions"] in (True, None)       # built before forking where transformers has it
    # Forked children can use CUDA only if the zygote never touched it.
    assert "tensorrt" in facts["deferred"] and not facts["cuda_initialized"]
