"""Grounding score of the support agent: does its answer use the order row and the
retrieved article?

    python -m loadtest.eval_agent [--store .cmesh/store] [--questions loadtest/data/agent_eval.yaml]

Starts a model server (the demo store's support-agent models) and a router on
127.0.0.1, both from compose/mesh.yaml, and runs the held-out questions through the
real ``support-agent`` pipeline (intent, embedder, kb-index, the orders lookup, the
dialogue LLM): once as configured, the A/B test choosing each question's variant by
its session, and once with each variant pinned (copies of the pipeline whose answer
node names one variant), so both variants are scored on every question. An answer
is grounded when it contains every expected phrase of its question
(case-insensitive). Bounded: one pass over the questions per run, then everything
stops. Prints one JSON object last: questions, grounded, grounding_score (the
configured A/B run), by_kind, by_variant (pinned), split (answers per variant in
the configured run) and elapsed_s.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import time
from pathlib import Path

import yaml

from cmesh.proc import spawn_service
from loadtest.common import REPO, ServerProc, emit, write_temp_config

QUESTIONS = REPO / "loadtest" / "data" / "agent_eval.yaml"
PIPELINE = "support-agent"
LLM = "dialogue-llm"


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    questions = yaml.safe_load(path.read_text(encoding="utf-8"))["questions"]
    for i, q in enumerate(questions):
        if not q.get("text") or not q.get("expect") or not q.get("kind"):
            raise ValueError(f"{path}: question {i} needs text, kind and expect")
    return questions


def grounded(answer: str, expect: list[str]) -> bool:
    """Every expected phrase occurs in the answer, ignoring case."""
    text = answer.lower()
    return all(str(phrase).lower() in text for phrase in expect)


def variants_of(mesh: dict) -> dict[str, str]:
    """The dialogue LLM's A/B variants: name -> store source."""
    spec = mesh["models"][LLM]
    return {name: v["source"] for name, v in spec["variants"].items()}


def eval_config(store: Path, backend: str | None) -> dict:
    """compose/mesh.yaml on a private store, without auth, tenants or scaling; plus one
    model per LLM variant and a copy of the pipeline answering with each."""
    mesh = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    data = {"store": str(store), "models": {}, "pipelines": {PIPELINE: mesh["pipelines"][PIPELINE]}}
    wanted = {n["model"] for n in mesh["pipelines"][PIPELINE]["nodes"].values()}
    for name in sorted(wanted):
        spec = {k: v for k, v in mesh["models"][name].items() if k not in ("deployment", "price")}
        data["models"][name] = spec
    for variant, source in variants_of(mesh).items():
        spec = {k: v for k, v in data["models"][LLM].items() if k != "variants"}
        data["models"][f"{LLM}-{variant}"] = {**spec, "source": source}
        pinned = copy.deepcopy(mesh["pipelines"][PIPELINE])
        pinned["nodes"]["answer"]["model"] = f"{LLM}-{variant}"
        data["pipelines"][f"{PIPELINE}-{variant}"] = pinned
    if backend:
        for spec in data["models"].values():
            spec["endpoints"] = [backend]
    return data


def run_questions(address: str, pipeline: str, questions: list[dict], *, session_prefix: str,
                  timeout_s: float = 60) -> list[dict]:
    """One Pipelines.Run per question, in order; each answer with its variant."""
    import grpc

    from protos import mesh_pb2, mesh_pb2_grpc

    results = []
    with grpc.insecure_channel(address) as channel:
        stub = mesh_pb2_grpc.PipelinesStub(channel)
        for i, q in enumerate(questions):
            response = stub.Run(mesh_pb2.RunRequest(pipeline=pipeline, inputs={"text": q["text"]},
                                                    session=f"{session_prefix}-{i}"),
                                timeout=timeout_s)
            variant = next((n.variant for n in response.trace.nodes if n.node == "answer"), "")
            results.append({"text": q["text"], "kind": q["kind"], "answer": response.answer,
                            "variant": variant, "grounded": grounded(response.answer, q["expect"])})
    return results


def summarise(results: list[dict]) -> dict:
    by_kind: dict[str, dict] = {}
    for r in results:
        k = by_kind.setdefault(r["kind"], {"questions": 0, "grounded": 0})
        k["questions"] += 1
        k["grounded"] += r["grounded"]
    for k in by_kind.values():
        k["score"] = round(k["grounded"] / k["questions"], 3)
    n = sum(r["grounded"] for r in results)
    return {"questions": len(results), "grounded": n,
            "grounding_score": round(n / len(results), 3) if results else 0.0, "by_kind": by_kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.eval_agent", description=__doc__.splitlines()[0])
    p.add_argument("--store", default=".cmesh/store", help="demo model store (bootstrapped if needed)")
    p.add_argument("--questions", default=str(QUESTIONS), help="held-out questions (YAML)")
    p.add_argument("--show", action="store_true", help="print every question and answer")
    args = p.parse_args(argv)
    from demo_store import bootstrap

    started = time.monotonic()
    store = Path(args.store).resolve()
    bootstrap(store, progress=lambda line: print(line, flush=True))
    questions = load_questions(Path(args.questions))
    models = list(eval_config(store, None)["models"])
    backend_cfg = write_temp_config(eval_config(store, None))
    backend = ServerProc(backend_cfg, models)
    router_cfg = write_temp_config(eval_config(store, backend.address))
    router = None
    try:
        router, ready = spawn_service(["-m", "router", "--config", str(router_cfg), "--port", "0",
                                       "--log-level", "WARNING"], stderr=subprocess.DEVNULL, cwd=REPO)
        address = f"127.0.0.1:{ready['port']}"
        configured = run_questions(address, PIPELINE, questions, session_prefix="eval")
        pinned = {v: run_questions(address, f"{PIPELINE}-{v}", questions, session_prefix=f"eval-{v}")
                  for v in variants_of(yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text()))}
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=30)
        backend.stop()
        backend_cfg.unlink()
        router_cfg.unlink()
    if args.show:
        for r in configured:
            mark = "ok  " if r["grounded"] else "MISS"
            print(f"{mark} [{r['kind']}/{r['variant']}] {r['text']!r} -> {r['answer']!r}", flush=True)
    for variant, results in pinned.items():
        summary = summarise(results)
        print(f"variant {variant}: grounding score {summary['grounding_score']} "
              f"({summary['grounded']}/{summary['questions']})", flush=True)
    split: dict[str, int] = {}
    for r in configured:
        split[r["variant"]] = split.get(r["variant"], 0) + 1
    emit({**summarise(configured),
          "by_variant": {v: {k: s[k] for k in ("grounded", "grounding_score", "by_kind")}
                         for v, s in ((v, summarise(rs)) for v, rs in pinned.items())},
          "split": split, "elapsed_s": round(time.monotonic() - started, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
