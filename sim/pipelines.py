"""One request over its pipeline graph, in virtual time.

The graph is the production one (``router.pipelines.graph.PipelineGraph``:
dependencies from ``after`` and from the expressions, levels, the output node),
and ``when`` conditions are evaluated by the production evaluator
(``cmesh.expr.evaluate`` / ``truthy``) on an environment like the executor's:
``request.text`` and every ancestor's outputs (None when skipped or degraded).
Node outputs are drawn from the model's profile (``outputs``: ``intent.label``
is ``order_status`` with probability p), or are the ones measured for the
request's text (``outputs_by_text``). A condition depends only on the text
and the ancestors' drawn outputs, so its value is cached per such combination.

Failure policy as the executor's: a node whose ``when`` is false is skipped; an
optional node that fails or passes its ``timeout_ms`` degrades the answer and
the run goes on; a required node's failure fails the request with that node's
reason; nodes start the moment their dependencies are done.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from cmesh.config import MeshConfig
from cmesh.expr import evaluate, truthy
from router.pipelines.graph import REQUEST, PipelineGraph
from sim.profiles import Profiles
from sim.router import Call


_UNSEEN = object()


class Outputs:
    """A model's output combinations and their cumulative probabilities, and
    the combination measured for each listed request text (``fixed``)."""

    __slots__ = ("values", "cum", "several", "fixed")

    def __init__(self, spec: dict[str, dict[str, float]],
                 by_text: dict[str, dict[str, str]] | None = None) -> None:
        combos: list[tuple[dict, float]] = [({}, 1.0)]
        for name, dist in spec.items():
            total = sum(dist.values())
            combos = [({**c, name: v}, p * q / total) for c, p in combos for v, q in dist.items()]
        self.values = [c for c, _ in combos]
        acc, self.cum = 0.0, []
        for _, p in combos:
            acc += p
            self.cum.append(acc)
        self.fixed: dict[str, int] = {}
        for text, out in (by_text or {}).items():
            if out not in self.values:
                self.values.append(dict(out))      # after the drawn ones: draw() never picks it
            self.fixed[text] = self.values.index(out)
        self.several = len(self.cum) > 1 or bool(self.fixed)

    def choose(self, text: str, rng: random.Random) -> int:
        """The measured outputs for ``text``, else a draw (no draw is spent on a listed text)."""
        got = self.fixed.get(text)
        return got if got is not None else self.draw(rng.random())

    def draw(self, u: float) -> int:
        for i, c in enumerate(self.cum):
            if u < c:
                return i
        return len(self.cum) - 1


class Request:
    __slots__ = ("flow", "kind", "target", "lc", "t0", "deadline", "text_idx", "texts", "waiting", "choice",
                 "left", "finished", "degraded", "key")

    def __init__(self, flow, kind: str, target: str, lc: str, t0: float, deadline: float, text_idx: int,
                 texts: tuple[str, ...], key: str) -> None:
        self.flow, self.kind, self.target, self.lc = flow, kind, target, lc
        self.t0, self.deadline, self.text_idx, self.texts, self.key = t0, deadline, text_idx, texts, key  # key: "kind:target|class"
        self.waiting: dict[str, int] | None = None
        self.choice: dict[str, int] = {}
        self.left = 1
        self.finished = False
        self.degraded = False


class PipelineFlow:
    """Runs requests of one pipeline (built once per config)."""

    def __init__(self, name: str, config: MeshConfig, profiles: Profiles, rng: random.Random,
                 submit: Callable[[Call], None], cancel: Callable[[Call], None], after: Callable,
                 now: Callable[[], float], done: Callable[[Request, str | None], None]) -> None:
        self.graph = g = PipelineGraph.build(name, config.pipelines[name])
        self.name = name
        self.rng = rng
        self._submit, self._cancel, self._after, self._now, self._done = submit, cancel, after, now, done
        self.order = g.order
        self.deps0 = {n: len(g.deps[n]) for n in g.order}
        self.roots = [n for n in g.order if not g.deps[n]]
        self.dependents = g.dependents
        self.model = {n: g.node(n).model for n in g.order}
        self.optional = {n: g.node(n).optional for n in g.order}
        self.timeout_s = {n: g.node(n).timeout_ms / 1000.0 for n in g.order if g.node(n).timeout_ms}
        self.ancestors = {n: tuple(sorted(g.ancestors[n])) for n in g.order}
        self.outputs: dict[str, Outputs] = {}
        for n in g.order:
            profile = profiles.for_model(self.model[n])
            self.outputs[n] = Outputs(profile.outputs, profile.outputs_by_text)
        self._when_cache: dict[tuple, bool | None] = {}
        # Per node: (model, when expression or None, timeout s or None, optional).
        self.info = {n: (self.model[n], g.when.get(n), self.timeout_s.get(n), self.optional[n]) for n in g.order}
        self.n_nodes = len(g.order)
        self.roots = tuple(self.roots)
        self.skipped = 0
        self.calls = 0

    def start(self, req: Request) -> None:
        req.waiting = dict(self.deps0)
        req.left = self.n_nodes
        self._launch(req, self.roots)

    def _when(self, req: Request, node: str, expr) -> bool:
        anc = self.ancestors[node]
        choice = req.choice
        key = (node, req.text_idx, tuple([choice.get(a, -1) for a in anc]))
        got = self._when_cache.get(key, _UNSEEN)
        if got is _UNSEEN:
            env = {REQUEST: {"text": req.texts[req.text_idx]}}
            for a in anc:
                i = choice.get(a, -1)
                env[a] = None if i < 0 else self.outputs[a].values[i]
            try:
                got = truthy(evaluate(expr, env))
            except Exception:          # the executor fails the node: INVALID_ARGUMENT
                got = None
            self._when_cache[key] = got
        if got is None:
            raise ValueError(node)
        return got

    def _launch(self, req: Request, ready) -> None:
        now = self._now()
        info = self.info
        queue = list(ready)
        i = 0
        while i < len(queue):
            node = queue[i]
            i += 1
            model, expr, timeout, _ = info[node]
            if expr is not None:
                try:
                    run = self._when(req, node, expr)
                except ValueError:
                    if not self._fail_or_degrade(req, node, "when_error"):
                        return
                    queue += self._complete(req, node, -1)
                    continue
                if not run:
                    self.skipped += 1
                    queue += self._complete(req, node, -1)
                    continue
            if now >= req.deadline:
                if not self._fail_or_degrade(req, node, "deadline"):
                    return
                queue += self._complete(req, node, -1)
                continue
            call = Call(req, node, model, req.lc, req.deadline, now)
            self.calls += 1
            if timeout is not None and now + timeout < req.deadline:
                self._after(timeout, self._timeout, call)
            self._submit(call)
            if req.finished:
                return

    def _timeout(self, call: Call) -> None:
        if call.done:
            return
        self._cancel(call)
        self.on_call(call, "node_timeout")

    def on_call(self, call: Call, reason: str | None) -> None:
        req: Request = call.req
        if req.finished:
            return
        node = call.node
        if reason is not None:
            if not self._fail_or_degrade(req, node, reason):
                return
            choice = -1
        else:
            out = self.outputs[node]
            choice = out.choose(req.texts[req.text_idx], self.rng) if out.several else 0
        ready = self._complete(req, node, choice)
        if ready:
            self._launch(req, ready)

    def _fail_or_degrade(self, req: Request, node: str, reason: str) -> bool:
        """True: degraded, go on; False: the request failed."""
        if self.optional[node]:
            req.degraded = True
            return True
        req.finished = True
        self._done(req, f"{reason}:{self.model[node]}")
        return False

    def _complete(self, req: Request, node: str, choice: int) -> list[str]:
        req.choice[node] = choice
        req.left -= 1
        if req.left == 0:
            req.finished = True
            self._done(req, None)
            return []
        ready = []
        waiting = req.waiting
        for m in self.dependents[node]:
            waiting[m] -= 1
            if waiting[m] == 0:
                ready.append(m)
        return ready


class ModelFlow:
    """Direct calls to one model (``ModelInfer``)."""

    def __init__(self, model: str, submit: Callable[[Call], None], now: Callable[[], float],
                 done: Callable[[Request, str | None], None]) -> None:
        self.model = model
        self._submit, self._now, self._done = submit, now, done
        self.calls = 0

    def start(self, req: Request) -> None:
        self.calls += 1
        self._submit(Call(req, "", self.model, req.lc, req.deadline, self._now()))

    def on_call(self, call: Call, reason: str | None) -> None:
        req = call.req
        if not req.finished:
            req.finished = True
            self._done(req, None if reason is None else f"{reason}:{self.model}")
