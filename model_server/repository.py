"""The models one replica hosts: load (with warm-up), unload, look-up, state.

A model is loaded as all of its variants (or the ones named); each variant gets
its own engine and its own runner (dynamic batcher or generation runner).
Loading runs off the event loop, so a replica keeps answering health and other
models' requests while a model loads.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from cmesh.config import MeshConfig, ModelConfig
from cmesh.errors import InvalidInput, NotFound, Unavailable, quote
from cmesh.manifest import Manifest
from cmesh.store import ModelStore
from model_server.batching import BatchPolicy, DynamicBatcher
from model_server.engines.base import Engine, EngineContext, engine_class
from model_server.metrics import ModelMetrics, ServerMetrics
from model_server.runner import Runner

log = logging.getLogger(__name__)


@dataclass
class Variant:
    model: str
    name: str
    engine: Engine
    runner: Runner
    manifest: Manifest
    load_seconds: float
    source: str
    metrics: ModelMetrics


@dataclass
class ModelEntry:
    name: str
    config: ModelConfig
    state: str = "UNAVAILABLE"          # LOADING, READY, UNLOADING, UNAVAILABLE
    reason: str = ""
    variants: dict[str, Variant] = field(default_factory=dict)
    default_variant: str = ""


class ModelRepository:
    def __init__(self, config: MeshConfig, store: ModelStore, metrics: ServerMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self._models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- queries ------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        return list(self._models.values())

    def variant(self, model: str, version: str = "") -> Variant:
        entry = self._models.get(model)
        if entry is None:
            if model in self.config.models:
                raise Unavailable(f"model {quote(model)} is not loaded on this replica", component=model)
            raise NotFound(f"unknown model {quote(model)}", component=model)
        if entry.state != "READY":
            state = "not loaded on this replica" if entry.state == "UNAVAILABLE" else entry.state.lower()
            reason = f" ({entry.reason})" if entry.reason else ""
            raise Unavailable(f"model {quote(model)} is {state}{reason}", component=model)
        name = version or entry.default_variant
        try:
            return entry.variants[name]
        except KeyError:
            raise NotFound(f"model {quote(model)} has no version {quote(version)}; "
                           f"versions: {sorted(entry.variants)}", component=model) from None

    def is_ready(self, model: str, version: str = "") -> bool:
        try:
            self.variant(model, version)
            return True
        except (NotFound, Unavailable):
            return False

    # -- load / unload ------------------------------------------------------------

    async def load(self, model: str, variants: list[str] | None = None) -> ModelEntry:
        config = self.config.model(model)
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            old = self._models.get(model)
            entry = ModelEntry(name=model, config=config, state="LOADING")
            self._models[model] = entry
            sources = config.variant_sources()
            wanted = variants or list(sources)
            for v in wanted:
                if v not in sources:
                    raise InvalidInput("model_name", f"model {model!r} has no variant {v!r}")
            try:
                for v in wanted:
                    entry.variants[v] = await self._load_variant(model, v, config)
            except Exception as exc:
                entry.state, entry.reason = "UNAVAILABLE", f"load failed: {exc}"
                for loaded in entry.variants.values():
                    await self._release(loaded)
                entry.variants.clear()
                raise
            default = config.default_variant()
            entry.default_variant = default if default in entry.variants else wanted[0]
            entry.state, entry.reason = "READY", ""
            if old is not None:      # reload: retire the previous engines after the switch
                for previous in old.variants.values():
                    await self._release(previous)
            return entry

    async def _load_variant(self, model: str, variant: str, config: ModelConfig) -> Variant:
        spec = config.variant_sources()[variant]
        started = time.monotonic()
        version = await asyncio.to_thread(self.store.open, spec.source)
        manifest = version.manifest
        kind = config.engine or manifest.engine
        batching = config.batching
        max_batch = batching.max_batch_size or manifest.batching.max_batch_size
        delay_ms = batching.max_queue_delay_ms if batching.max_queue_delay_ms is not None \
            else manifest.batching.max_queue_delay_ms
        options = {**manifest.options, **config.options, **spec.options}
        if config.resources.torch_threads:
            options.setdefault("torch_threads", config.resources.torch_threads)
        ctx = EngineContext(model=model, variant=variant, model_dir=version.local_dir,
                            manifest=manifest, device=config.resources.device,
                            options=options, max_batch_size=max_batch)
        engine = engine_class(kind)(ctx)

        def load_and_warm() -> None:
            engine.load()
            engine.warmup()

        await asyncio.to_thread(load_and_warm)
        metrics = self.metrics.model(model, variant)
        runner = self._make_runner(engine, max_batch, delay_ms, batching, metrics)
        await runner.start()
        seconds = time.monotonic() - started
        metrics.load_seconds.set(seconds)
        log.info("loaded %s:%s (%s) in %.2fs", model, variant, kind, seconds)
        return Variant(model=model, name=variant, engine=engine, runner=runner, manifest=manifest,
                       load_seconds=seconds, source=spec.source, metrics=metrics)

    @staticmethod
    def _make_runner(engine: Engine, max_batch: int, delay_ms: float, batching, metrics) -> Runner:
        if engine.generative:
            from model_server.generation import GenerationRunner

            return GenerationRunner(engine, max_batch_size=max_batch,
                                    max_queue_size=batching.max_queue_size, metrics=metrics)
        policy = BatchPolicy(max_batch_size=max_batch, max_queue_delay_s=delay_ms / 1000.0,
                             buckets=tuple(batching.seq_buckets))
        return DynamicBatcher(engine, policy, max_queue_size=batching.max_queue_size, metrics=metrics)

    async def unload(self, model: str) -> None:
        entry = self._models.get(model)
        if entry is None:
            raise NotFound(f"model {model!r} is not loaded", component=model)
        async with self._locks.setdefault(model, asyncio.Lock()):
            entry.state = "UNLOADING"
            for variant in entry.variants.values():
                await self._release(variant)
            entry.variants.clear()
            entry.state, entry.reason = "UNAVAILABLE", "unloaded"

    async def _release(self, variant: Variant) -> None:
        await variant.runner.stop()              # finishes what it accepted
        await asyncio.to_thread(variant.engine.unload)

    async def close(self) -> None:
        for entry in list(self._models.values()):
            if entry.state == "READY":
                await self.unload(entry.name)
