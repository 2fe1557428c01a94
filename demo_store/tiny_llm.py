"""Demo-store recipes for ``tiny-llm/1`` and ``tiny-llm/2``: two small GPT-2 style
causal LMs with a byte-level BPE tokenizer, trained offline on the shipped
customer-support corpus (``demo_store/data/llm_corpus.txt``) and on grounded dialogues in
the support-agent pipeline's own prompt format (``agent_corpus``: ``Knowledge: …
Order: … Customer: … Agent:``, made with the store's built embedder and kb-index),
whose answers restate the order row or paraphrase the top passage.

Both are built from scratch on the CPU in under two minutes each, seeded, so the same
store is produced on every machine and nothing is downloaded. The two variants
differ in depth, heads and seed so an A/B test between them compares genuinely
different models. They are far too small to be general assistants: they answer the
pipeline's prompt from what it contains (``python -m loadtest.eval_agent`` scores
that), and plain ``Customer: … Agent:`` prompts with support-desk text.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from demo_store import agent_corpus
from demo_store.agent_corpus import dialogue_text
from demo_store.base import Artifact, BuildContext
from cmesh.manifest import MANIFEST_FILE, Manifest, dump_manifest

CORPUS_FILE = "llm_corpus.txt"
EOS_TOKEN = "<|endoftext|>"    # also bos: GPT-2 convention, one document separator
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 1536              # an upper bound; the grounded dialogues fill it
N_POSITIONS = 512
EMBEDDER = ("minilm-l6", "1")   # the retrieval the grounded prompts are made with
KB_INDEX = ("kb-index", "1")
# One intra-op thread: at this model size a second thread saves little, and on a busy
# machine OpenMP threads that wait on each other made steps 10-50x slower (measured).
# A fixed count also keeps float reductions, hence the weights, identical everywhere.
TRAIN_THREADS = 1


@dataclass(frozen=True)
class VariantSpec:
    """Architecture and training budget of one variant."""

    version: str
    n_layer: int
    n_embd: int
    n_head: int
    steps: int                 # fixed step count, not a time budget, so builds are reproducible
    batch_size: int = 16
    block_size: int = 64       # training window in tokens (plain dialogue batches)
    lr: float = 3e-3
    plain_every: int = 8       # every n-th step trains on plain dialogues, the rest grounded
    description: str = ""


VARIANTS = (
    VariantSpec("1", n_layer=2, n_embd=64, n_head=2, steps=800, batch_size=8, lr=4e-3,
                plain_every=12,
                description="tiny GPT-2 (2 layers, 64 wide) trained on grounded support dialogues"),
    VariantSpec("2", n_layer=3, n_embd=64, n_head=2, steps=600, batch_size=8, lr=4e-3,
                plain_every=12,
                description="tiny GPT-2 (3 layers, 64 wide) trained on grounded "
                            "support dialogues"),
)


def corpus_documents(data_dir: Path) -> list[str]:
    """Dialogues of the corpus; blank lines separate them."""
    text = (data_dir / CORPUS_FILE).read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


# Grounded dialogues (demo_store/agent_corpus.py): order questions with a found row,
# with an unknown number, with no lookup; every article question comes on top.
GROUNDED_COUNTS = {"n_orders": 6000, "n_not_found": 300, "n_unlooked": 300}
# How often each kind of grounded dialogue is trained on, whatever their counts.
KIND_WEIGHTS = {"order": 0.45, "not_found": 0.05, "unlooked": 0.05, "article": 0.45}
_GROUNDED: dict[tuple, list] = {}


def grounded_dialogues(ctx: BuildContext) -> list:
    """The grounded training dialogues, from the store's built embedder and kb-index;
    made once per build (both variants train on the same ones)."""
    key = (str(ctx.store), str(ctx.data_dir), ctx.seed)
    if key not in _GROUNDED:
        retriever = agent_corpus.Retriever(ctx.version_dir(*EMBEDDER), ctx.version_dir(*KB_INDEX))
        try:
            _GROUNDED.clear()
            _GROUNDED[key] = agent_corpus.build_dialogues(
                retriever, agent_corpus.load_dialogue_data(ctx.data_dir), seed=ctx.seed,
                **GROUNDED_COUNTS)
        finally:
            retriever.close()
    return _GROUNDED[key]


def train_tokenizer(documents: list[str]):
    """A byte-level BPE tokenizer (any UTF-8 text encodes, nothing maps to <unk>),
    wrapped as a fast tokenizer transformers can save and load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False, model_max_length=N_POSITIONS)


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """All documents as one stream, each preceded by EOS (as the engine prepends it
    to prompts) so the model learns where a dialogue starts and ends."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    ids.append(eos)
    return ids


def encode_examples(tokenizer, dialogues) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Grounded dialogues by kind, as (prompt ids, answer ids): the prompt as the engine
    encodes it (EOS first), the answer with its leading space and a closing EOS."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([d.prompt for d in dialogues], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + d.answer for d in dialogues], add_special_tokens=False)["input_ids"]
    examples: dict[str, list[tuple[list[int], list[int]]]] = {}
    for d, prompt, answer in zip(dialogues, prompts, answers):
        examples.setdefault(d.kind, []).append(([eos] + prompt, answer + [eos]))
    return examples


def share_spaced_embeddings(model, tokenizer) -> int:
    """Start every space-prefixed token (" UPS") with the embedding of its bare twin
    ("UPS"), where both exist. The order row is JSON (``"carrier":"UPS"``) and the
    answer is prose (``shipped with UPS``): the two spellings are different tokens, and
    a copy from one to the other is far quicker to learn when they start alike. The
    embeddings are tied to the LM head, so this also holds for what the model writes."""
    import torch

    vocab = tokenizer.get_vocab()
    pairs = [(i, vocab[t[1:]]) for t, i in vocab.items() if t.startswith("Ġ") and t[1:] in vocab]
    if pairs:
        spaced, bare = (torch.tensor(x) for x in zip(*pairs))
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[spaced] = weight[bare]
    return len(pairs)


def train_model(spec: VariantSpec, tokenizer, ids: list[int],
                examples: dict[str, list[tuple[list[int], list[int]]]], *, seed: int, progress):
    """Train a fresh GPT-2 for ``spec.steps`` steps; returns (model, final_loss).

    Every ``spec.plain_every``-th step is a batch of windows of the plain dialogue
    stream ``ids`` (next-token loss everywhere); the others are batches of grounded
    examples (their kinds drawn by ``KIND_WEIGHTS``), each from position 0 as the
    engine feeds a prompt, with the loss on the answer tokens only: the prompt is
    given, and learning to write it would only spend the model's capacity on the
    knowledge base's text."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head,
        # No dropout: the corpus is tiny and memorising it is the point.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    share_spaced_embeddings(model, tokenizer)
    model.train()
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 10)

    def lr_at(step: int) -> float:
        # Linear warm-up then cosine decay: converges reliably in a few hundred steps.
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, spec.steps - warmup)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * frac))

    def plain_batch():
        window = spec.block_size + 1
        starts = torch.randint(0, len(data) - window, (spec.batch_size,), generator=gen)
        batch = torch.stack([data[s:s + window] for s in starts.tolist()])
        return batch[:, :-1], torch.ones_like(batch[:, 1:], dtype=torch.bool), batch[:, 1:]

    def grounded_batch():
        # Right-padded, so no real token attends to padding; the pads carry no loss.
        kinds = torch.multinomial(weights, spec.batch_size, replacement=True, generator=gen)
        picks = []
        for k in kinds.tolist():
            pool = examples[names[k]]
            picks.append(pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
        width = max(len(p) + len(a) for p, a in picks)
        batch = torch.full((len(picks), width), tokenizer.pad_token_id, dtype=torch.long)
        wanted = torch.zeros((len(picks), width), dtype=torch.bool)
        for j, (prompt, answer) in enumerate(picks):
            batch[j, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            wanted[j, len(prompt):len(prompt) + len(answer)] = True
        return batch[:, :-1], wanted[:, 1:], batch[:, 1:]

    names = sorted(examples)
    weights = torch.tensor([KIND_WEIGHTS[n] for n in names], dtype=torch.float)

    recent: list[float] = []
    for step in range(spec.steps):
        plain = not examples or step % spec.plain_every == 0
        inputs, wanted, targets = plain_batch() if plain else grounded_batch()
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        # The LM head only where there is a loss: for grounded batches that is the
        # answer, a sixth of the tokens, and the head is half this model's compute.
        hidden = model.transformer(input_ids=inputs,
                                   attention_mask=torch.ones_like(inputs)).last_hidden_state
        logits = model.lm_head(hidden[wanted])
        loss = F.cross_entropy(logits, targets[wanted])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if not plain:
            recent = (recent + [loss.item()])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == spec.steps:
            progress(f"tiny-llm/{spec.version}: step {step + 1}/{spec.steps} loss {loss.item():.3f}")
    model.eval()
    # The mean of the last grounded steps is a steadier number than the very last batch's.
    return model, sum(recent) / max(1, len(recent))


def memory_estimate_mb(spec: VariantSpec, params: int, max_batch: int) -> int:
    """Weights plus a full KV cache (every slot at max context), plus runtime slack."""
    weights = params * 4
    kv = max_batch * N_POSITIONS * spec.n_layer * 2 * spec.n_embd * 4
    slack = 48 * 1024 * 1024   # activations, tokenizer, allocator overhead
    return math.ceil((weights + kv + slack) / (1024 * 1024))


def build_variant(spec: VariantSpec, out: Path, ctx: BuildContext) -> None:
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        documents = corpus_documents(ctx.data_dir)
        grounded = grounded_dialogues(ctx)
        tokenizer = train_tokenizer(documents + [dialogue_text(d) for d in grounded])
        ctx.progress(f"tiny-llm/{spec.version}: tokenizer with {len(tokenizer)} tokens "
                     f"from {len(documents)} dialogues and {len(grounded)} grounded ones")
        ids = token_stream(tokenizer, documents)
        examples = encode_examples(tokenizer, grounded)
        # Each variant gets its own seed so the two differ in more than shape.
        model, loss = train_model(spec, tokenizer, ids, examples,
                                  seed=ctx.seed + int(spec.version), progress=ctx.progress)
    finally:
        torch.set_num_threads(threads)
    _save_quietly(model, tokenizer, out)
    params = sum(p.numel() for p in model.parameters())
    max_batch = 16
    manifest = Manifest(
        name="tiny-llm", version=spec.version, engine="hf-causal-lm", platform="pytorch",
        description=spec.description,
        inputs=[{"name": "text_input", "datatype": "BYTES", "shape": [-1]}],
        outputs=[{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
        batching={"max_batch_size": max_batch, "max_queue_delay_ms": 2},
        memory_mb=memory_estimate_mb(spec, params, max_batch),
        options={"max_tokens_default": 32, "max_tokens_limit": 256,
                 "max_prompt_chars": 4000, "max_context": N_POSITIONS},
        metadata={"architecture": "gpt2", "n_layer": spec.n_layer, "n_embd": spec.n_embd,
                  "n_head": spec.n_head, "vocab_size": len(tokenizer), "params": params,
                  "training_steps": spec.steps, "plain_tokens": len(ids),
                  "grounded_dialogues": {k: len(v) for k, v in sorted(examples.items())},
                  "final_loss": round(loss, 4), "seed": ctx.seed + int(spec.version),
                  "corpus": [CORPUS_FILE, agent_corpus.DIALOGUES_FILE], "chat_template": CHAT_TEMPLATE})
    (out / MANIFEST_FILE).write_text(dump_manifest(manifest), encoding="utf-8")
    ctx.progress(f"tiny-llm/{spec.version}: {params:,} parameters, loss {loss:.3f}, "
                 f"built in {time.monotonic() - started:.1f}s")


def _save_quietly(model, tokenizer, out: Path) -> None:
    """save_pretrained draws a progress bar per shard; the build prints its own lines."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _recipe(spec: VariantSpec):
    def build(out: Path, ctx: BuildContext) -> None:
        build_variant(spec, out, ctx)
    return build


# The dialogue format the models are trained on, as a chat template (Jinja, the
# Hugging Face convention) the OpenAI front door renders messages with.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}Customer: {{ m.content }}\n"
                 "{% elif m.role == 'assistant' %}Agent: {{ m.content }}\n"
                 "{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Agent:{% endif %}")


def _fingerprint(spec: VariantSpec) -> str:
    # Recipe revision, the variant's spec and the data the dialogues come from, so an
    # edit to any of them rebuilds existing stores.
    digest = hashlib.sha256(repr((spec, KIND_WEIGHTS, GROUNDED_COUNTS, CHAT_TEMPLATE)).encode()).hexdigest()[:8]
    return f"3-{digest}-{agent_corpus.data_digest()}"


ARTIFACTS: list[Artifact] = [
    Artifact(name="tiny-llm", version=spec.version, build=_recipe(spec),
             fingerprint=_fingerprint(spec),
             depends=("/".join(EMBEDDER), "/".join(KB_INDEX)))
    for spec in VARIANTS
]
