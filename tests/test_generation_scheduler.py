"""The continuous-batching policy with hand-made step outputs: no model, no loop."""
from __future__ import annotations

import pytest

from model_server.generation.scheduler import (
    FinishReason,
    QueueFull,
    Scheduler,
    Sequence,
    SequenceStatus,
    TokenOutput,
)

EOS = 0


def seq(seq_id: int, *, prompt: int = 4, max_tokens: int = 8, arrival: float = 0.0) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_tokens=prompt, max_tokens=max_tokens, arrival=arrival,
                    stop_token_ids=frozenset({EOS}))


def tokens(plan, token: int = 7) -> dict[int, TokenOutput]:
    """One (non-stop) token for every sequence in the plan, as the executor would."""
    return {s.seq_id: TokenOutput(token_id=token, text="x") for s in plan.sequences}


def ids(sequences) -> list[int]:
    return [s.seq_id for s in sequences]


def test_admits_fifo_up_to_max_batch_size():
    sched = Scheduler(max_batch_size=2, max_queue_size=10)
    for i in (1, 2, 3):
        sched.add(seq(i, arrival=float(i)))
    plan = sched.schedule(now=5.0)
    assert ids(plan.prefill) == [1, 2] and plan.decode == ()
    assert ids(sched.waiting) == [3]
    assert [s.scheduled_at for s in plan.prefill] == [5.0, 5.0]
    assert all(s.status is SequenceStatus.RUNNING for s in plan.prefill)


def test_prefilled_sequences_decode_and_newcomers_join_the_running_batch():
    sched = Scheduler(max_batch_size=4, max_queue_size=10)
    sched.add(seq(1))
    plan = sched.schedule(now=0.0)
    sched.update(tokens(plan))
    # Arrives mid-generation: admitted at the very next step, next to the running one.
    sched.add(seq(2))
    plan = sched.schedule(now=1.0)
    assert ids(plan.decode) == [1]
    assert ids(plan.prefill) == [2]
    assert plan.size == 2
    sched.update(tokens(plan))
    plan = sched.schedule(now=2.0)
    assert ids(plan.decode) == [1, 2] and plan.prefill == ()


def test_waiting_sequence_takes_the_slot_a_finished_one_frees():
    sched = Scheduler(max_batch_size=1, max_queue_size=10)
    sched.add(seq(1, max_tokens=2))
    sched.add(seq(2))
    plan = sched.schedule(0.0)
    assert ids(plan.prefill) == [1]
    sched.update(tokens(plan))
    plan = sched.schedule(1.0)
    assert ids(plan.decode) == [1] and plan.prefill == ()
    (update,) = sched.update(tokens(plan))
    assert update.finished and update.seq.finish_reason is FinishReason.LENGTH
    plan = sched.schedule(2.0)
    assert ids(plan.prefill) == [2]


def test_finishes_at_max_tokens():
    sched = Scheduler(max_batch_size=4, max_queue_size=10)
    sched.add(seq(1, max_tokens=3))
    for step in range(3):
        plan = sched.schedule(float(step))
        (update,) = sched.update(tokens(plan))
        assert update.finished is (step == 2)
    s = update.seq
    assert s.output_tokens == [7, 7, 7]
    assert s.finish_reason is FinishReason.LENGTH and s.status is SequenceStatus.FINISHED
    assert not sched.has_work


def test_finishes_at_stop_token_and_counts_it():
    sched = Scheduler(max_batch_size=4, max_queue_size=10)
    sched.add(seq(1, max_tokens=10))
    sched.add(seq(2, max_tokens=10))
    plan = sched.schedule(0.0)
    updates = sched.update({1: TokenOutput(EOS), 2: TokenOutput(5)})
    assert [(u.seq.seq_id, u.finished) for u in updates] == [(1, True), (2, False)]
    assert updates[0].seq.finish_reason is FinishReason.STOP
    assert updates[0].seq.output_tokens == [EOS]
    plan = sched.schedule(1.0)
    assert ids(plan.decode) == [2]


def test_cancel_waiting_and_running():
    sched = Scheduler(max_batch_size=1, max_queue_size=10)
    sched.add(seq(1))
    sched.add(seq(2))
    sched.add(seq(3))
    plan = sched.schedule(0.0)
    assert ids(plan.prefill) == [1]
    # Cancelled while its step runs: the step's output for it is then dropped.
    assert sched.cancel(1).finish_reason is FinishReason.CANCELLED
    assert sched.update(tokens(plan)) == []
    assert sched.cancel(2) is not None          # still waiting
    assert sched.cancel(2) is None              # already gone
    plan = sched.schedule(1.0)
    assert ids(plan.prefill) == [3]
    assert sched.num_waiting == 0 and sched.num_running == 1


def test_queue_limit_counts_waiting_only():
    sched = Scheduler(max_batch_size=1, max_queue_size=1)
    sched.add(seq(1))
    assert sched.queue_full
    with pytest.raises(QueueFull):
        sched.add(seq(2))
    sched.schedule(0.0)                          # 1 moves to running: the queue has room
    assert not sched.queue_full
    sched.add(seq(2))


def test_abort_fails_every_sequence_of_a_step():
    sched = Scheduler(max_batch_size=4, max_queue_size=10)
    for i in (1, 2, 3):
        sched.add(seq(i))
    plan = sched.schedule(0.0)
    failed = sched.abort(ids(plan.sequences[:2]))
    assert [s.finish_reason for s in failed] == [FinishReason.ERROR] * 2
    assert ids(sched.running) == [3]


def test_prefill_token_budget_spreads_admission_but_never_starves():
    sched = Scheduler(max_batch_size=8, max_queue_size=10, max_prefill_tokens=10)
    sched.add(seq(1, prompt=50))                 # larger than the budget: admitted alone
    sched.add(seq(2, prompt=6))
    sched.add(seq(3, prompt=6))
    plan = sched.schedule(0.0)
    assert ids(plan.prefill) == [1]
    sched.update(tokens(plan))
    plan = sched.schedule(1.0)
    assert ids(plan.prefill) == [2] and ids(plan.decode) == [1]
    sched.update(tokens(plan))
    plan = sched.schedule(2.0)
    assert ids(plan.prefill) == [3] and ids(plan.decode) == [1, 2]


def test_empty_scheduler_plans_nothing():
    sched = Scheduler(max_batch_size=2, max_queue_size=2)
    assert not sched.has_work
    assert sched.schedule(0.0).empty
