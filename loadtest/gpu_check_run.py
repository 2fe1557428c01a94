"""Run a GPU check prepared by ``python -m loadtest.gpu_check --prepare DIR``.

    bash DIR/run.sh                              # on the CUDA machine (calls this module)
    CMESH_GPU_CHECK_DEVICE=cpu bash DIR/run.sh   # the same steps on the CPU: a dry run

Four steps, each with its own timeout inside one overall budget (7.5 minutes):

1. install: DIR/wheels/*.whl into a target directory (``pip install --no-index
   --no-deps --no-compile --target``), put on PYTHONPATH for every later step;
   DIR/wheels/if-needed/ only where the machine's own copy does not satisfy the
   project. Skipped where every wheel is already installed at its pinned version
   (this machine's .venv), unless CMESH_GPU_CHECK_INSTALL=always. Then one import
   check that records the versions.
2. server: ``python -m model_server`` with embedder, intent-classifier and
   dialogue-llm on the device (DIR/mesh.yaml, device from CMESH_GPU_CHECK_DEVICE).
3. tests: the ``gpu``-marked tests (tests/test_gpu_path.py) against that server,
   with CMESH_GPU_TEST_DEVICE set to the device, so on the CPU they run too.
4. bench: the LLM's decode throughput through that server, then
   ``loadtest.bench_batching --device`` (offline vs served vs batch 1).

One JSON summary is written to ``$OUT/gpu_check.json`` (``$TMPDIR/cmesh-gpu-check``
when OUT is unset, so nothing is added to what travels) and printed as the last
line; the server's, the tests' and the benchmarks' logs sit beside it. Exit
status 0 when every step passed.

This module imports only the standard library at the top: it runs before the
wheels are installed and starts everything else as a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 450.0
# Longest each step may take (each also stops in time for the ones after it).
STEP_CAPS_S = {"install": 90, "server": 120, "tests": 240, "decode": 60, "bench": 150}
STEP_FLOOR_S = 20                  # left over for each later step
SERVED = "embedder,intent-classifier,dialogue-llm"
TEST_FILE = "tests/test_gpu_path.py"
PRELOAD_CHECK = r"""
import json, sys
from importlib import metadata
mods = ["pydantic", "pydantic_core", "grpc", "grpc_status", "grpc_health.v1.health", "google.protobuf",
        "redis", "yaml", "numpy", "torch", "transformers", "uvloop", "prometheus_client", "fsspec",
        "pytest", "pytest_asyncio", "pytest_timeout", "protos.inference_pb2_grpc", "model_server.server"]
import importlib
for m in mods:
    importlib.import_module(m)
import torch
dists = ["torch", "transformers", "numpy", "grpcio", "protobuf", "pydantic", "pydantic-core", "pytest",
         "pytest-asyncio", "redis", "tokenizers", "safetensors", "uvloop"]
facts = {"python": sys.version.split()[0], "versions": {d: metadata.version(d) for d in dists},
         "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
if sys.argv[1].startswith("cuda"):
    if not torch.cuda.is_available():
        raise SystemExit("device %s requested but torch.cuda.is_available() is False" % sys.argv[1])
    facts["gpu"] = torch.cuda.get_device_name(0)
    facts["gpu_count"] = torch.cuda.device_count()
print(json.dumps(facts))
"""


# -- bookkeeping ------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    ok: bool = False
    duration_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "duration_s": round(self.duration_s, 2), **self.detail}


class Budget:
    def __init__(self, total_s: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + total_s

    def timeout(self, step: str) -> float:
        later = list(STEP_CAPS_S)[list(STEP_CAPS_S).index(step) + 1:]
        left = self.deadline - time.monotonic() - STEP_FLOOR_S * len(later)
        return max(5.0, min(float(STEP_CAPS_S[step]), left))

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def log(line: str) -> None:
    print(f"[gpu-check] {line}", flush=True)


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_logged(cmd: list[str], *, env: dict, timeout: float, log_path: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group (so a timeout also ends what it started),
    stdout and stderr into ``log_path``. Returns (exit code or None on timeout, output)."""
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
    return code, log_path.read_text(errors="replace")


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- step 1: wheels ---------------------------------------------------------------------

def wheel_dist(path: Path) -> tuple[str, str, list[str], str]:
    """(distribution, version, python tags, abi) from a wheel's file name."""
    parts = path.name[:-len(".whl")].split("-")
    return parts[0].replace("_", "-").lower(), parts[1], parts[-3].split("."), parts[-2]


def wheel_fits_here(path: Path) -> bool:
    _, _, pythons, abi = wheel_dist(path)
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if "py3" in pythons or here in pythons:
        return True
    return abi == "abi3" and any(t.startswith("cp3") and int(t[3:]) <= sys.version_info.minor for t in pythons)


def installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def satisfies(version: str | None, spec: str) -> bool:
    if version is None:
        return False
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:                     # cannot tell: install the shipped copy
        return False
    return spec in ("", "*") or SpecifierSet(spec).contains(version, prereleases=True)


def plan_install(directory: Path, *, always: bool = False) -> tuple[list[Path], list[str]]:
    """The wheels to install here, and notes on the rest. Nothing where every wheel is
    installed at its pinned version already (unless ``always``); never a wheel this
    Python cannot use (the cp312 ones on this machine's 3.11) when its distribution is
    installed here anyway."""
    manifest = json.loads((directory / "manifest.json").read_text())
    specs = {w["name"]: w.get("if_needed", "") for w in manifest.get("wheels", [])}
    chosen, notes = [], []
    for path in sorted((directory / "wheels").glob("*.whl")):
        chosen.append(path)
    for path in sorted((directory / "wheels" / "if-needed").glob("*.whl")):
        dist = wheel_dist(path)[0]
        have = installed_version(dist)
        if satisfies(have, specs.get(dist, "")):
            notes.append(f"{dist} {have} already satisfies {specs.get(dist)}")
        else:
            notes.append(f"{dist} {have or 'missing'} does not satisfy {specs.get(dist)}: installing")
            chosen.append(path)
    if not always and all(installed_version(wheel_dist(p)[0]) == wheel_dist(p)[1] for p in chosen):
        return [], notes + [f"all {len(chosen)} wheels already installed at their pinned versions"]
    unfit = [p for p in chosen if not wheel_fits_here(p)]
    for path in unfit:
        dist, version, _, _ = wheel_dist(path)
        have = installed_version(dist)
        if have is None:
            raise RuntimeError(f"{path.name} does not fit Python {platform.python_version()} and "
                               f"{dist} is not installed")
        notes.append(f"{path.name} does not fit this Python: keeping {dist} {have}")
    return [p for p in chosen if p not in unfit], notes


def install_wheels(wheels: list[Path], target: Path, *, timeout: float, use_pip: bool | None = None) -> str:
    """Install into ``target`` with pip (``--target``), or unpack the wheels where this
    Python has no pip. Returns which of the two it did."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if use_pip is None:
        use_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if use_pip:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(target),
               *map(str, wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install failed: {proc.stderr[-2000:]}")
        return "pip"
    for wheel in wheels:                    # no pip: a wheel is a zip laid out for site-packages
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
        for data in target.glob("*.data"):
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    shutil.copytree(data / sub, target, dirs_exist_ok=True)
            shutil.rmtree(data)
    return "unzip"


def step_install(directory: Path, device: str, env: dict, work: Path, timeout: float) -> Step:
    step = Step("install")
    started = time.monotonic()
    try:
        wheels, notes = plan_install(directory, always=os.environ.get("CMESH_GPU_CHECK_INSTALL") == "always")
        step.detail["notes"] = notes
        if wheels:
            target = Path(os.environ.get("CMESH_GPU_CHECK_SITE", "/tmp/site" if device != "cpu"
                                         else str(work / "site")))
            step.detail["installer"] = install_wheels(wheels, target, timeout=timeout)
            step.detail.update(installed=len(wheels), target=str(target))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH", "")) if p)
        else:
            step.detail["installed"] = 0
        left = max(5.0, timeout - (time.monotonic() - started))
        proc = subprocess.run([sys.executable, "-c", PRELOAD_CHECK, device], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=left)
        if proc.returncode != 0:
            raise RuntimeError(f"import check failed: {proc.stderr.strip()[-2000:]}")
        step.detail["facts"] = last_json(proc.stdout) or {}
        step.ok = True
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        step.detail["error"] = str(exc)
    step.duration_s = time.monotonic() - started
    return step


# -- step 2: the model server -----------------------------------------------------------

class Server:
    def __init__(self, config: Path, store: Path, env: dict, log_path: Path, timeout: float) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model_server", "--config", str(config), "--models", SERVED,
             "--store", str(store), "--port", "0", "--metrics-port", "0", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO, env=env,
            start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:                  # stdout lines, then None at EOF
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.ready: dict = {}
        while not self.ready:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"model server not ready within {timeout:.0f}s") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"model server exited ({self.proc.returncode}) before it was ready: "
                                   + log_path.read_text(errors="replace")[-1500:])
            event = last_json(line) if line.startswith("{") else None
            if event and event.get("event") == "ready":
                self.ready = event
        self.address = f"127.0.0.1:{self.ready['port']}"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            _kill_group(self.proc, grace=20.0)
        self._log.close()
        return self.proc.returncode


def effective_config(directory: Path, device: str, work: Path) -> Path:
    import yaml

    data = yaml.safe_load((directory / "mesh.yaml").read_text())
    data["store"] = str((directory / "store").resolve())
    for spec in data["models"].values():
        spec.setdefault("resources", {})["device"] = device
    path = work / "mesh.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- step 3: the GPU tests --------------------------------------------------------------

def junit_counts(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": [], "skip_reasons": []}
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        kinds = {child.tag: child for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            counts["skip_reasons"].append(f"{name}: {kinds['skipped'].get('message', '')}"[:200])
        else:
            counts["passed"] += 1
    return counts


def read_report(path: Path) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            merged.setdefault(entry["section"], {}).update(entry["values"])
    return merged


def step_tests(server: Server | None, store: Path, device: str, env: dict, work: Path, out: Path,
               quick: bool, timeout: float) -> tuple[Step, dict, dict]:
    step = Step("tests")
    started = time.monotonic()
    report = work / "report.jsonl"
    test_env = {**env, "CMESH_GPU_TEST_DEVICE": device, "CMESH_GPU_TEST_STORE": str(store),
                "CMESH_GPU_TEST_REPORT": str(report), "CMESH_GPU_TEST_QUICK": "1" if quick else "0",
                # The machine's own pytest plugins may not fit the shipped pytest: load only ours.
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    if server is not None:
        test_env.update(CMESH_GPU_TEST_SERVER=server.address,
                        CMESH_GPU_TEST_METRICS_PORT=str(server.ready.get("metrics_port") or ""),
                        CMESH_GPU_TEST_SERVER_PID=str(server.proc.pid))
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", TEST_FILE, "-p", "pytest_asyncio.plugin",
           "-p", "pytest_timeout", "-p", "no:cacheprovider", f"--junitxml={junit}",
           f"--timeout={int(max(30, timeout - 10))}"]
    code, _ = run_logged(cmd, env=test_env, timeout=timeout, log_path=out / "pytest.log")
    counts = junit_counts(junit)
    step.ok = code == 0 and counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0
    step.detail["exit_code"] = code
    if code is None:
        step.detail["error"] = f"timed out after {timeout:.0f}s"
    step.duration_s = time.monotonic() - started
    return step, counts, read_report(report)


# -- step 4: benchmarks -----------------------------------------------------------------

def decode_bench(address: str, streams: int, max_tokens: int) -> dict:
    """Greedy token streams through the server: one alone, then ``streams`` at once."""
    import asyncio

    import numpy as np

    from cmesh.client import AsyncClient, build_request

    prompts = [f"Customer: question {i}: where is my order {1000 + i} and can I change the address?\nAgent:"
               for i in range(streams)]

    async def one(client: AsyncClient, i: int, n: int) -> int:
        request = build_request("dialogue-llm", {"text_input": np.array([prompts[i].encode()], dtype=object)},
                                version="a", request_id=f"decode-{i}-{n}",
                                parameters={"max_tokens": n, "temperature": 0.0})
        tokens = 0
        async for response in client.stream([request], timeout=120):
            if response.error_message:
                raise RuntimeError(response.error_message)
            params = response.infer_response.parameters
            if params["triton_final_response"].bool_param:
                tokens = params["cmesh-output-tokens"].int64_param
        return tokens

    async def main() -> dict:
        client = AsyncClient(address)
        try:
            await one(client, 0, 4)                                   # warm the stream path
            t0 = time.monotonic()
            single = await one(client, 0, max_tokens)
            single_s = time.monotonic() - t0
            t0 = time.monotonic()
            counts = await asyncio.gather(*(one(client, i, max_tokens) for i in range(streams)))
            wall = time.monotonic() - t0
        finally:
            await client.close()
        return {"decode_tokens_per_s": round(sum(counts) / wall, 1),
                "decode_tokens_per_s_single": round(single / single_s, 1),
                "streams": streams, "max_tokens": max_tokens, "tokens": sum(counts),
                "mean_tokens_per_stream": round(sum(counts) / streams, 1), "wall_s": round(wall, 3)}

    return asyncio.run(main())


def step_decode(server: Server, env: dict, out: Path, quick: bool, timeout: float) -> Step:
    step = Step("decode")
    started = time.monotonic()
    streams, tokens = (8, 32) if quick else (32, 128)
    code, text = run_logged([sys.executable, "-m", "loadtest.gpu_check_run", "--decode-bench", server.address,
                             "--streams", str(streams), "--max-tokens", str(tokens)],
                            env=env, timeout=timeout, log_path=out / "decode.log")
    result = last_json(text) if code == 0 else None
    step.ok = result is not None
    step.detail.update(result or {"error": f"exit {code}: {text.strip()[-800:]}"})
    step.duration_s = time.monotonic() - started
    return step


def step_bench(store: Path, device: str, env: dict, out: Path, quick: bool, timeout: float) -> Step:
    step = Step("bench")
    started = time.monotonic()
    args = ["--seconds", "1", "--concurrency", "16", "--max-batch", "8"] if quick else \
        ["--seconds", "5", "--concurrency", "128", "--max-batch", "64"]
    code, text = run_logged([sys.executable, "-m", "loadtest.bench_batching", "--store", str(store),
                             "--device", device, *args], env=env, timeout=timeout,
                            log_path=out / "bench.log")
    result = last_json(text) if code == 0 else None
    step.ok = result is not None and "served_over_offline" in result
    step.detail.update({"result": result} if result else {"error": f"exit {code}: {text.strip()[-800:]}"})
    step.duration_s = time.monotonic() - started
    return step


# -- the whole check --------------------------------------------------------------------

def run_check(directory: Path, device: str, out: Path, quick: bool, budget_s: float) -> dict:
    budget = Budget(budget_s)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cmesh-gpu-check-"))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    store = (directory / "store").resolve()
    steps: dict[str, Step] = {}
    counts: dict = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": []}
    report: dict = {}
    log(f"device {device}, {'quick' if quick else 'full'} run, budget {budget_s:.0f}s, logs in {out}")

    steps["install"] = step_install(directory, device, env, work, budget.timeout("install"))
    log(f"1 install: {steps['install'].as_dict()}")
    server = None
    if steps["install"].ok:
        step = steps["server"] = Step("server")
        started = time.monotonic()
        try:
            server = Server(effective_config(directory, device, work), store, env, out / "server.log",
                            budget.timeout("server"))
            step.ok = True
            step.detail.update(address=server.address, cold_start_s=server.ready.get("cold_start_s"),
                               load_s=server.ready.get("models"))
        except (RuntimeError, OSError) as exc:
            step.detail["error"] = str(exc)
        step.duration_s = time.monotonic() - started
        log(f"2 server: {step.as_dict()}")
        try:
            steps["tests"], counts, report = step_tests(server, store, device, env, work, out, quick,
                                                        budget.timeout("tests"))
            log(f"3 tests: {steps['tests'].as_dict()} {counts}")
            if server is not None and server.proc.poll() is None:
                steps["decode"] = step_decode(server, env, out, quick, budget.timeout("decode"))
                log(f"4a decode: {steps['decode'].as_dict()}")
        finally:
            if server is not None:
                steps["server"].detail["exit_code"] = server.stop()
        steps["bench"] = step_bench(store, device, env, out, quick, budget.timeout("bench"))
        log(f"4b bench_batching: {steps['bench'].as_dict()}")
    for name in STEP_CAPS_S:
        steps.setdefault(name, Step(name, detail={"skipped": "an earlier step failed"}))

    equal = report.get("cuda_equals_cpu", {})
    diffs = [v for k, v in equal.items() if k.endswith("_max_abs_diff") and isinstance(v, (int, float))]
    tokens = [v for k, v in equal.items() if k.endswith("_tokens_equal")]
    headline = {"max_abs_diff": max(diffs) if diffs else None,
                "llm_tokens_equal": all(tokens) if tokens else None}
    bench = steps["bench"].detail.get("result") or {}
    decode = steps["decode"].detail
    facts = steps["install"].detail.get("facts", {})
    summary = {
        "device": device, "dry_run": device == "cpu", "quick": quick,
        "ok": all(s.ok for s in steps.values()),
        "python": facts.get("python"), "torch": facts.get("versions", {}).get("torch"),
        "cuda_available": facts.get("cuda_available"), "gpu": facts.get("gpu"),
        "steps": {name: s.as_dict() for name, s in steps.items()},
        "tests": counts,
        "cuda_equals_cpu": {**headline, **equal},
        "batching": report.get("batching", {}),
        "forked_replica": report.get("forked_replica", {}),
        "served_over_offline": bench.get("served_over_offline"),
        "batching_gain": bench.get("batching_gain"),
        "bench_batching": bench,
        "decode_tokens_per_s": decode.get("decode_tokens_per_s"),
        "decode_tokens_per_s_single": decode.get("decode_tokens_per_s_single"),
        "total_s": round(budget.elapsed(), 1),
    }
    shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_check_run", description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="the prepared directory (what --prepare wrote)")
    p.add_argument("--device", default=os.environ.get("CMESH_GPU_CHECK_DEVICE", "cuda"),
                   help="cuda (default), cuda:N or cpu (dry run); env CMESH_GPU_CHECK_DEVICE")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="where gpu_check.json and the logs go (default $OUT, else $TMPDIR/cmesh-gpu-check)")
    p.add_argument("--quick", choices=("auto", "yes", "no"), default=os.environ.get("CMESH_GPU_CHECK_QUICK", "auto"),
                   help="short benchmarks (auto: on the CPU only)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("CMESH_GPU_CHECK_BUDGET_S", BUDGET_S)))
    p.add_argument("--decode-bench", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.decode_bench:
        print(json.dumps(decode_bench(args.decode_bench, args.streams, args.max_tokens)), flush=True)
        return 0
    if not args.dir:
        p.error("--dir is required")
    directory = Path(args.dir).resolve()
    if not (directory / "manifest.json").is_file():
        p.error(f"{directory} is not a prepared directory (run python -m loadtest.gpu_check --prepare DIR)")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    quick = args.quick == "yes" or (args.quick == "auto" and args.device == "cpu")
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "cmesh-gpu-check"
    try:
        summary = run_check(directory, args.device, out, quick, args.budget_s)
    except Exception as exc:  # noqa: BLE001 - the summary must still say what happened
        out.mkdir(parents=True, exist_ok=True)
        summary = {"device": args.device, "dry_run": args.device == "cpu", "ok": False,
                   "error": f"{type(exc).__name__}: {exc}"}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
