"""Demo-store recipes for ``tiny-llm/1`` and ``tiny-llm/2``: two small GPT-2 style
causal LMs with a byte-level BPE tokenizer, trained offline on the shipped
customer-support corpus (``cmesh/data/llm_corpus.txt``).

Both are built from scratch on the CPU in a few seconds, seeded, so the same
store is produced on every machine and nothing is downloaded. The two variants
differ in depth and width so an A/B test between them compares genuinely
different models. They are far too small to be useful assistants; they only
need to produce text-like output so streaming, batching and metering can be
exercised end to end with a real tokenizer and a real KV cache.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from cmesh.bootstrap.base import Artifact, BuildContext
from cmesh.manifest import MANIFEST_FILE, Manifest, dump_manifest

CORPUS_FILE = "llm_corpus.txt"
EOS_TOKEN = "<|endoftext|>"    # also bos: GPT-2 convention, one document separator
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 1536              # an upper bound; min_frequency leaves it near 1.2k
N_POSITIONS = 512
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
    block_size: int = 64       # training window in tokens
    lr: float = 3e-3
    description: str = ""


VARIANTS = (
    VariantSpec("1", n_layer=2, n_embd=64, n_head=2, steps=400,
                description="tiny GPT-2 (2 layers, 64 wide) trained on support dialogues"),
    VariantSpec("2", n_layer=3, n_embd=96, n_head=4, steps=300,
                description="tiny GPT-2 (3 layers, 96 wide) trained on support dialogues"),
)


def corpus_documents(data_dir: Path) -> list[str]:
    """Dialogues of the corpus; blank lines separate them."""
    text = (data_dir / CORPUS_FILE).read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


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


def train_model(spec: VariantSpec, tokenizer, ids: list[int], *, seed: int, progress):
    """Train a fresh GPT-2 for ``spec.steps`` steps; returns (model, final_loss)."""
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

    window = spec.block_size + 1
    recent: list[float] = []
    for step in range(spec.steps):
        starts = torch.randint(0, len(data) - window, (spec.batch_size,), generator=gen)
        batch = torch.stack([data[s:s + window] for s in starts.tolist()])
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == spec.steps:
            progress(f"tiny-llm/{spec.version}: step {step + 1}/{spec.steps} loss {loss.item():.3f}")
    model.eval()
    # The mean of the last steps is a steadier number than the very last batch's.
    return model, sum(recent) / len(recent)


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
        tokenizer = train_tokenizer(documents)
        ctx.progress(f"tiny-llm/{spec.version}: tokenizer with {len(tokenizer)} tokens "
                     f"from {len(documents)} dialogues")
        ids = token_stream(tokenizer, documents)
        # Each variant gets its own seed so the two differ in more than shape.
        model, loss = train_model(spec, tokenizer, ids, seed=ctx.seed + int(spec.version),
                                  progress=ctx.progress)
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
                  "training_steps": spec.steps, "training_tokens": len(ids),
                  "final_loss": round(loss, 4), "seed": ctx.seed + int(spec.version),
                  "corpus": CORPUS_FILE})
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


ARTIFACTS: list[Artifact] = [
    Artifact(name="tiny-llm", version=spec.version, build=_recipe(spec), fingerprint="1")
    for spec in VARIANTS
]
