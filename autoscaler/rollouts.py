"""The canary driver: every model with a ``rollout`` is moved through its steps by
the pure policy (``autoscaler.canary``) on the figures routers report per
variant, and each move is published as a config of its own (source "rollout"
in the history), so routers re-weight from the stream like for any apply and the
history shows every step and every rollback.

Runs on the leader. The declared weights a rollout shares out among the baseline
variants are those of the config in force when it started. Each rollout's step and
state are kept in ``state_path`` (beside the config history), so a restarted
autoscaler resumes a rollout at its step, with a fresh interval, instead of
starting it over.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from autoscaler.canary import (PROGRESSING, PROMOTED, ROLLED_BACK, CanaryState, Figures, advance, fingerprint,
                               observe, split, start, weights)
from autoscaler.live import LiveConfig
from cmesh.config import MeshConfig
from cmesh.validation import load_plain_yaml
from protos import mesh_pb2

log = logging.getLogger(__name__)
STATE_VALUE = {PROGRESSING: 0, PROMOTED: 1, ROLLED_BACK: -1}


class RolloutDriver:
    def __init__(self, live: LiveConfig, metrics=None, clock: Callable[[], float] = time.monotonic,
                 state_path: Path | None = None) -> None:
        self.live = live
        self.metrics = metrics
        self._now = clock
        self.state_path = state_path
        self.states: dict[str, CanaryState] = {}
        self.declared: dict[str, dict[str, float]] = {}
        self.config_ids: dict[str, str] = {}
        self._pending: dict[str, dict[str, Figures]] = {}
        self._load()

    def _load(self) -> None:
        if self.state_path is None:
            return
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        now = self._now()
        for model, s in saved.items() if isinstance(saved, dict) else ():
            try:
                self.states[model] = CanaryState(str(s["fingerprint"]), int(s["step"]), str(s["state"]), now,
                                                 Figures(), Figures(), reason=f"resumed: {s.get('reason', '')}")
                self.declared[model] = {str(k): float(v) for k, v in s["declared"].items()}
                self.config_ids[model] = str(s.get("config_id", ""))
            except (KeyError, TypeError, ValueError):
                continue

    def _save(self) -> None:
        if self.state_path is None:
            return
        body = {m: {"fingerprint": s.fingerprint, "step": s.step, "state": s.state, "reason": s.reason,
                    "declared": self.declared.get(m, {}), "config_id": self.config_ids.get(m, "")}
                for m, s in self.states.items()}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.state_path)

    # -- inputs -----------------------------------------------------------------------

    def on_report(self, report: mesh_pb2.LoadReport) -> None:
        """Per-variant figures of models under a rollout (validated by the servicer)."""
        models = self.live.config.models
        for load in report.models:
            spec = models.get(load.model)
            if not load.variant or spec is None or spec.rollout is None or not load.answered:
                continue
            by_variant = self._pending.setdefault(load.model, {})
            by_variant[load.variant] = by_variant.get(load.variant, Figures()) + \
                Figures.of(load.answered, load.failed, load.latency_counts)

    # -- the loop ---------------------------------------------------------------------

    async def run(self, period_s: float) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a failed tick must not end rollouts
                log.exception("rollout tick failed")
            await asyncio.sleep(period_s)         # the control period

    async def tick(self) -> None:
        config, now = self.live.config, self._now()
        pending, self._pending = self._pending, {}
        moves: dict[str, dict[str, float]] = {}
        for model, spec in config.models.items():
            rollout = spec.rollout
            if rollout is None:
                self._forget(model)
                continue
            fp = fingerprint(spec)
            state = self.states.get(model)
            if state is None or state.fingerprint != fp:
                state = start(rollout, fp, now)
                self.declared[model] = {v: s.weight for v, s in spec.variant_sources().items()}
                log.info("%s: rollout of variant %s started (%s)", model, rollout.canary, state.reason)
            canary, baseline = split(rollout, pending.get(model, {}))
            state = advance(rollout, observe(state, canary, baseline), now)
            self.states[model] = state
            wanted = weights(rollout, state, self.declared[model])
            if state.moved or _differs(wanted, spec.variant_sources()):
                moves[model] = wanted
            self._observe(model, state, wanted)
        if moves:
            await self._publish(config, moves)

    async def _publish(self, config: MeshConfig, moves: dict[str, dict[str, float]]) -> None:
        """One derived config for every move of this tick: the config in force with
        the new weights, recorded and sent to routers like any apply."""
        current = self.live.current
        if current is None:
            return
        data = load_plain_yaml(self.live.history.text(current.id), "config in force")
        notes = []
        for model, wanted in moves.items():
            variants = data["models"][model]["variants"]
            for variant, weight in wanted.items():
                variants[variant]["weight"] = round(weight, 6)
            state = self.states[model]
            notes.append(f"rollout {model}: {state.state} at step {state.step} "
                         f"({wanted[config.models[model].rollout.canary]:g} %): {state.reason}")
        applied = await self.live.apply(yaml.safe_dump(data, sort_keys=False), applied_by="rollout",
                                        source="rollout", note="; ".join(notes)[:1000])
        for model in moves:
            self.config_ids[model] = applied.record.id if applied.record else ""
            log.info("%s", notes.pop(0))
        self._save()

    # -- views ------------------------------------------------------------------------

    def status(self, model: str = "") -> mesh_pb2.RolloutStatusResponse:
        resp = mesh_pb2.RolloutStatusResponse()
        config, now = self.live.config, self._now()
        for name, state in sorted(self.states.items()):
            spec = config.models.get(name)
            if (model and name != model) or spec is None or spec.rollout is None:
                continue
            rollout = spec.rollout
            wanted = weights(rollout, state, self.declared.get(name, {}))
            resp.rollouts.add(model=name, canary=rollout.canary, state=state.state, step=state.step,
                              weight=wanted.get(rollout.canary, 0.0), steps=list(rollout.steps),
                              step_age_s=now - state.step_started_at, reason=state.reason,
                              config_id=self.config_ids.get(name, ""),
                              canary_figures=_figures(rollout.canary, state.canary),
                              baseline_figures=_figures("baseline", state.baseline))
        return resp

    def _observe(self, model: str, state: CanaryState, wanted: dict[str, float]) -> None:
        if self.metrics is None:
            return
        self.metrics.rollout_state.labels(model).set(STATE_VALUE[state.state])
        self.metrics.rollout_step.labels(model).set(state.step)
        for variant, weight in wanted.items():
            self.metrics.rollout_weight.labels(model, variant).set(weight)

    def _forget(self, model: str) -> None:
        if model in self.states:
            for table in (self.states, self.declared, self.config_ids, self._pending):
                table.pop(model, None)
            self._save()


def _differs(wanted: dict[str, float], variants) -> bool:
    return any(abs(variants[v].weight - w) > 1e-6 for v, w in wanted.items() if v in variants)


def _figures(name: str, figures: Figures) -> mesh_pb2.VariantFigures:
    return mesh_pb2.VariantFigures(variant=name, answered=figures.answered, failed=figures.failed,
                                   error_rate=figures.error_rate, p95_ms=figures.p95_ms or 0.0)
