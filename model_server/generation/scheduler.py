"""Iteration-level (continuous) batching policy for generative models. Pure: no
asyncio, no torch, no clock of its own.

The step loop is the one vLLM's engine core uses: ``schedule(now)`` plans one
step, the executor runs it (elsewhere), ``update(outputs)`` records what it
produced. Every step produces exactly one token for every sequence it holds:
newly admitted sequences are prefilled (their prompt goes through the model and
their first token is sampled), the others decode one token. A sequence that
arrives while others are mid-decode is admitted at the next step, so it joins
the running batch instead of waiting for it to drain.
"""
from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class QueueFull(Exception):
    """``add`` was called with the waiting queue at its limit."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"              # a stop token (EOS) was produced
    LENGTH = "length"          # max_tokens reached
    CANCELLED = "cancelled"    # the caller went away
    ERROR = "error"            # its step failed


@dataclass(frozen=True)
class TokenOutput:
    """What the executor produced for one sequence in one step."""

    token_id: int
    text: str = ""             # the text this token completes (may be empty, see the engine)
    stopped: bool = False      # the text now holds one of the request's stop strings


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request: counts and lifecycle, no tensors."""

    seq_id: int
    prompt_tokens: int
    max_tokens: int
    arrival: float
    stop_token_ids: frozenset[int] = frozenset()
    status: SequenceStatus = SequenceStatus.WAITING
    output_tokens: list[int] = field(default_factory=list)
    scheduled_at: float | None = None      # when it was admitted (end of its queue wait)
    finish_reason: FinishReason | None = None

    @property
    def prefilled(self) -> bool:
        # The first token comes out of the prefill, so any output means the prompt is cached.
        return bool(self.output_tokens)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def remaining(self) -> int:
        return max(0, self.max_tokens - len(self.output_tokens))


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step."""

    prefill: tuple[Sequence, ...] = ()     # admitted this step: run the prompt, sample token 1
    decode: tuple[Sequence, ...] = ()      # already running: one more token each

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return self.prefill + self.decode

    @property
    def size(self) -> int:
        return len(self.prefill) + len(self.decode)

    @property
    def empty(self) -> bool:
        return self.size == 0


@dataclass(frozen=True)
class SequenceUpdate:
    """One sequence's result of a step, as ``update`` recorded it."""

    seq: Sequence
    output: TokenOutput
    finished: bool


class Scheduler:
    """FIFO admission into a running set of at most ``max_batch_size`` sequences.

    ``max_prefill_tokens`` (optional) bounds the prompt tokens admitted in one
    step, so a burst of long prompts cannot stall the running decodes for a long
    step; the first waiting sequence is always admissible, so nothing starves.
    """

    def __init__(self, *, max_batch_size: int, max_queue_size: int,
                 max_prefill_tokens: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0")
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []          # in admission order
        self._by_id: dict[int, Sequence] = {}       # waiting or running

    # -- state ------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def queue_full(self) -> bool:
        return len(self._waiting) >= self.max_queue_size

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    def get(self, seq_id: int) -> Sequence | None:
        return self._by_id.get(seq_id)

    # -- lifecycle --------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if self.queue_full:
            raise QueueFull(f"{len(self._waiting)} sequences waiting (limit {self.max_queue_size})")
        if seq.seq_id in self._by_id:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        seq.status = SequenceStatus.WAITING
        self._waiting.append(seq)
        self._by_id[seq.seq_id] = seq

    def schedule(self, now: float) -> SchedulerOutput:
        """Admit waiting sequences (FIFO) into free running slots and plan one step:
        prefill for those without output yet, one decode token for the rest."""
        budget = self.max_prefill_tokens
        admitted_tokens = 0
        while self._waiting and len(self._running) < self.max_batch_size:
            head = self._waiting[0]
            if (budget is not None and admitted_tokens > 0
                    and admitted_tokens + head.prompt_tokens > budget):
                break
            self._waiting.popleft()
            head.status = SequenceStatus.RUNNING
            head.scheduled_at = now
            admitted_tokens += head.prompt_tokens
            self._running.append(head)
        prefill = tuple(s for s in self._running if not s.prefilled)
        decode = tuple(s for s in self._running if s.prefilled)
        return SchedulerOutput(prefill=prefill, decode=decode)

    def update(self, outputs: Mapping[int, TokenOutput]) -> list[SequenceUpdate]:
        """Record one step's tokens (keyed by seq_id). Outputs of sequences that are no
        longer running (cancelled while the step ran) are dropped. A sequence finishes
        on a stop token, a stop string or when it reaches ``max_tokens``; the stop token counts as
        an output token, since the model computed it."""
        updates = []
        for seq_id, out in outputs.items():
            seq = self._by_id.get(seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            seq.output_tokens.append(out.token_id)
            if out.token_id in seq.stop_token_ids or out.stopped:
                self._finish(seq, FinishReason.STOP)
            elif len(seq.output_tokens) >= seq.max_tokens:
                self._finish(seq, FinishReason.LENGTH)
            updates.append(SequenceUpdate(seq=seq, output=out, finished=seq.finished))
        return updates

    def cancel(self, seq_id: int) -> Sequence | None:
        """Withdraw a sequence, waiting or running; returns it, or None if unknown/done."""
        seq = self._by_id.get(seq_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.CANCELLED)
        return seq

    def abort(self, seq_ids: Iterable[int], reason: FinishReason = FinishReason.ERROR
              ) -> list[Sequence]:
        """Finish several sequences at once (a failed step); returns those it finished."""
        done = []
        for seq_id in seq_ids:
            seq = self._by_id.get(seq_id)
            if seq is not None:
                self._finish(seq, reason)
                done.append(seq)
        return done

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.WAITING:
            self._waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.seq_id, None)
