"""``hf-encoder``: mean-pooled, L2-normalised sentence embeddings (MiniLM et al.)."""
from __future__ import annotations

from typing import Any

import numpy as np

from model_server.engines.base import Engine, InferItem, ItemResult, decode_texts, register
from model_server.engines.torch_util import inference_threads, quiet_transformers, resolve_device


@register
class HFEncoderEngine(Engine):
    kind = "hf-encoder"

    def load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        inference_threads(self.ctx.option("torch_threads"))
        quiet_transformers()
        self.device = resolve_device(self.ctx.device)
        self.max_seq_len = int(self.ctx.option("max_seq_len", 256))
        self.max_chars = int(self.ctx.option("max_chars", 8192))
        self.normalize = bool(self.ctx.option("normalize", True))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.ctx.model_dir))
        self.model = AutoModel.from_pretrained(str(self.ctx.model_dir)).to(self.device).eval()
        self._torch = torch

    def warmup(self) -> None:
        # Two shapes so both the small-batch and the full-batch kernels are primed.
        for n in (1, self.ctx.max_batch_size):
            item = self.prepare({"text": np.array([b"warm up the encoder"] * n, dtype=object)}, {})
            self.run_batch([item])

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        texts = decode_texts("text", inputs["text"], max_chars=self.max_chars)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_seq_len,
                             add_special_tokens=True)["input_ids"]
        lengths = [len(x) for x in ids]
        return InferItem(inputs=inputs, parameters=parameters, rows=rows, length=max(lengths),
                         input_tokens=sum(lengths), prepared=ids)

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        torch = self._torch
        ids = [seq for item in items for seq in item.prepared]
        width = max(len(seq) for seq in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, seq in enumerate(ids):
            input_ids[i, :len(seq)] = seq
            mask[i, :len(seq)] = 1
        with torch.inference_mode():
            t_ids = torch.from_numpy(input_ids).to(self.device)
            t_mask = torch.from_numpy(mask).to(self.device)
            hidden = self.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            weights = t_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            embeddings = pooled.float().cpu().numpy()
        results, start = [], 0
        for item in items:
            results.append(ItemResult(outputs={"embedding": embeddings[start:start + item.rows]}))
            start += item.rows
        return results

    def embed(self, texts: list[str]) -> np.ndarray:
        """Convenience for offline use (bootstrap, tests): embeddings of texts."""
        out = []
        for i in range(0, len(texts), self.ctx.max_batch_size):
            chunk = np.array([t.encode() for t in texts[i:i + self.ctx.max_batch_size]], dtype=object)
            out.append(self.run_batch([self.prepare({"text": chunk}, {})])[0].outputs["embedding"])
        return np.concatenate(out, axis=0)

    def unload(self) -> None:
        self.model = None
