"""Grounded training dialogues for the tiny LLMs, in the support-agent pipeline's own
prompt format.

The ``answer`` node of ``support-agent`` (compose/mesh.yaml) prompts the LLM with
``Knowledge: <top passages>\\nOrder: <order rows or none>\\nCustomer: <question>\\nAgent:``.
This module writes seeded dialogues whose prompts are produced the way the pipeline
produces them — the same template evaluated by :mod:`cmesh.expr`, passages from the real
retrieval (the built MiniLM embedder and the built ``kb-index``, top 3), order rows
serialised by the SQL engine's own :func:`rows_json` — and whose answers use them:

* an order question with a found row: the answer restates that row's number, item,
  status, carrier, tracking number and date (``agent_dialogues.yaml``'s templates);
  the rows are synthetic, with many numbers and varied values, so the model learns to
  copy from the prompt rather than to remember the demo database;
* an order question whose number matches nothing (``Order: []``): "could not find";
* anything else (``Order: none``): a paraphrase of the top retrieved passage.

Order numbers 1000-1099 (the demo database has 1001-1060) and the evaluation's phrasings
(``loadtest/data/agent_eval.yaml``) never occur in training.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from demo_store.base import DATA_DIR

DIALOGUES_FILE = "agent_dialogues.yaml"
# The support-agent answer node's input, exactly as compose/mesh.yaml spells it
# (tests/test_agent_grounding.py checks that they agree).
PROMPT_EXPR = (r"""f'Knowledge: {truncate(join(retrieve.passages, " "), 600)}\nOrder: """
               r"""{default(orders.rows, "none")}\nCustomer: {request.text}\nAgent:'""")
# The orders node's columns, in its SELECT's order.
ORDER_COLUMNS = ("order_id", "status", "item", "carrier", "tracking_number", "eta")
TOP_K = 3
RESERVED_IDS = range(1000, 1100)   # the demo database's orders (1001-1060) and the
                                   # evaluation's unknown numbers: never trained on
CARRIERS = ("UPS", "FedEx", "DHL", "USPS")
STATUSES = ("shipped", "delivered", "processing", "cancelled", "returned")
ITEMS = ("Webcam 1080p", "USB-C charger 65W", "Laptop stand", "Smart watch", "Bluetooth speaker",
         "Mechanical keyboard", "Portable SSD 1TB", "Desk lamp", "Wireless earbuds",
         "Fitness tracker", "Phone case", "Ergonomic mouse", "Noise-cancelling headphones",
         "4K monitor 27in", "E-reader", "Gaming headset", "Tablet 10in", "Power bank 20000mAh",
         "HDMI cable 2m", "Office chair", "Coffee grinder", "Electric kettle", "Backpack",
         "Running shoes", "Yoga mat", "Water bottle", "Action camera", "Microphone",
         "Wi-Fi router", "Smart plug", "Graphics tablet", "Monitor arm")


@dataclass(frozen=True)
class Dialogue:
    prompt: str        # what the pipeline sends the LLM
    answer: str        # what the agent should say (without the leading space)
    kind: str          # "order", "not_found", "article" or "unlooked" (an order
                       # question whose lookup did not run: answered like "article")


def load_dialogue_data(data_dir: Path = DATA_DIR) -> dict:
    return yaml.safe_load((data_dir / DIALOGUES_FILE).read_text(encoding="utf-8"))


def data_digest(data_dir: Path = DATA_DIR) -> str:
    """Digest of the data the dialogues come from, for the LLM recipes' fingerprints."""
    h = hashlib.sha256()
    for name in (DIALOGUES_FILE, "kb.jsonl", "llm_corpus.txt"):
        h.update((data_dir / name).read_bytes())
    return h.hexdigest()[:12]


# -- prompts (pure) -----------------------------------------------------------------------

def render_prompt(question: str, passages: list[str], rows: str | None) -> str:
    """The answer node's prompt for ``question``: ``rows`` is the orders node's ``rows``
    output (a JSON array), or None when the node was skipped or failed."""
    from cmesh.expr import evaluate

    env = {"request": {"text": question}, "retrieve": {"passages": list(passages)},
           "orders": None if rows is None else {"rows": rows}}
    return evaluate(PROMPT_EXPR, env)


def rows_text(order: dict | None) -> str:
    """The orders node's output for a lookup by id: a one-row or empty JSON array,
    serialised by the SQL engine itself."""
    from model_server.engines.sql_sqlite import rows_json

    rows = [] if order is None else [tuple(order[c] for c in ORDER_COLUMNS)]
    return rows_json(list(ORDER_COLUMNS), rows).decode("utf-8")


def order_answer(templates: dict[str, str], order: dict) -> str:
    return templates[order["status"]].format(
        id=order["order_id"], item=order["item"], carrier=order["carrier"],
        tracking=order["tracking_number"], eta=order["eta"])


# -- synthetic orders (seeded) ---------------------------------------------------------

def tracking_number(rng: random.Random, carrier: str) -> str:
    """Numbers shaped like the demo database's (UPS 1Z…, DHL JD…, FedEx 12 digits, USPS 94…)."""
    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))
    if carrier == "UPS":
        return "1Z" + rng.choice(["0000", "999A", "4F2X", "0000"]) + digits(12)
    if carrier == "DHL":
        return "JD" + digits(18)
    if carrier == "FedEx":
        return str(rng.randint(1, 9)) + digits(11)
    return "9400" + digits(18)


def synthetic_order(rng: random.Random, order_id: int) -> dict:
    status = rng.choice(STATUSES)
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    eta = f"{rng.choice((2024, 2025, 2026))}-{month:02d}-{day:02d}"
    carrier = rng.choice(CARRIERS) if status in ("shipped", "delivered", "returned") else None
    return {"order_id": order_id, "status": status, "item": rng.choice(ITEMS),
            "carrier": carrier, "tracking_number": tracking_number(rng, carrier) if carrier else None,
            "eta": None if status == "cancelled" else eta}


def training_order_id(rng: random.Random, exclude: set[int]) -> int:
    while True:
        order_id = rng.randint(1000, 9999) if rng.random() < 0.8 else rng.randint(100, 99999)
        if order_id not in RESERVED_IDS and order_id not in exclude:
            return order_id


# -- the dialogues ------------------------------------------------------------------------

class Retriever:
    """The pipeline's retrieval, offline: the built embedder and kb-index engines."""

    def __init__(self, embedder_dir: Path, index_dir: Path) -> None:
        from demo_store.kb_index import load_embedder
        from cmesh.manifest import MANIFEST_FILE, parse_manifest
        from model_server.engines.base import EngineContext
        from model_server.engines.vector_index import VectorIndexEngine

        self.embedder = load_embedder(embedder_dir)
        manifest = parse_manifest((index_dir / MANIFEST_FILE).read_text(),
                                  source=str(index_dir / MANIFEST_FILE))
        self.index = VectorIndexEngine(EngineContext(
            model="kb-index", variant="default", model_dir=index_dir, manifest=manifest,
            max_batch_size=64, options=dict(manifest.options)))
        self.index.load()

    def top(self, questions: list[str], k: int = TOP_K) -> list[tuple[list[str], list[str]]]:
        """Per question: (article ids, passages) of the top ``k``, best first."""
        vectors = self.embedder.embed(questions)
        step = self.index.ctx.max_batch_size
        items = [self.index.prepare({"embedding": vectors[i:i + step]}, {"top_k": k})
                 for i in range(0, len(vectors), step)]
        found = []
        for result in self.index.run_batch(items):
            found.extend(([i.decode() for i in ids], [p.decode() for p in passages])
                         for ids, passages in zip(result.outputs["ids"], result.outputs["passages"]))
        return found

    def close(self) -> None:
        self.embedder.unload()
        self.index.unload()


def build_dialogues(retriever: Retriever, data: dict, *, seed: int, n_orders: int,
                    n_not_found: int, n_unlooked: int, probes: int = 6) -> list[Dialogue]:
    """Every article question once, ``n_orders`` order questions with a found
    (synthetic) row, ``n_not_found`` whose number matches nothing, and ``n_unlooked``
    order questions whose lookup did not run (``Order: none``: answered from the
    passage, as when the classifier took them for something else).

    Embedding every order question would cost the build ~20 ms each, so each order
    phrasing (as written and in lower case) is retrieved for ``probes`` random numbers,
    and an order question takes the passages of one of its phrasing's probes: the
    number moves the ranking a little, and so do the probes."""
    rng = random.Random(seed)
    articles = data["articles"]
    templates = data["orders"]["answers"]
    shapes = [(ask, lower) for ask in data["orders"]["asks"] for lower in (False, True)]

    def phrase(shape: tuple[str, bool], order_id: int) -> str:
        question = shape[0].format(id=order_id)
        return question.lower() if shape[1] else question

    used: set[int] = set()

    def new_id() -> int:
        order_id = training_order_id(rng, used)
        used.add(order_id)
        return order_id

    article_questions = [q for a in articles.values() for q in a["asks"]]
    probe_questions = [(i, phrase(shape, new_id())) for i, shape in enumerate(shapes)
                       for _ in range(probes)]
    hits = retriever.top(article_questions + [q for _, q in probe_questions])
    probe_hits: dict[int, list[tuple[list[str], list[str]]]] = {}
    for (shape, _), hit in zip(probe_questions, hits[len(article_questions):]):
        probe_hits.setdefault(shape, []).append(hit)

    dialogues = []
    for question, (ids, passages) in zip(article_questions, hits):
        dialogues.append(Dialogue(render_prompt(question, passages, None),
                                  articles[ids[0]]["answer"], "article"))
    for kind, count in (("order", n_orders), ("not_found", n_not_found), ("unlooked", n_unlooked)):
        for _ in range(count):
            order = synthetic_order(rng, new_id())
            shape = rng.randrange(len(shapes))
            question = phrase(shapes[shape], order["order_id"])
            ids, passages = rng.choice(probe_hits[shape])
            if kind == "order":
                dialogues.append(Dialogue(render_prompt(question, passages, rows_text(order)),
                                          order_answer(templates, order), kind))
            elif kind == "not_found":
                dialogues.append(Dialogue(
                    render_prompt(question, passages, rows_text(None)),
                    data["orders"]["not_found"].format(id=order["order_id"]), kind))
            else:                   # the answer paraphrases the top passage
                dialogues.append(Dialogue(render_prompt(question, passages, None),
                                          articles[ids[0]]["answer"], "unlooked"))
    rng.shuffle(dialogues)
    return dialogues


def dialogue_text(d: Dialogue) -> str:
    return f"{d.prompt} {d.answer}"


def dump(dialogues: list[Dialogue]) -> str:
    """JSON lines, for looking at what was trained on."""
    return "".join(json.dumps({"kind": d.kind, "prompt": d.prompt, "answer": d.answer},
                              ensure_ascii=False) + "\n" for d in dialogues)
