"""Iteration-level (continuous) batching for generative engines: a pure scheduler
(``scheduler``) and the asyncio step loop that drives an engine with it (``runner``)."""
from model_server.generation.scheduler import (
    FinishReason,
    QueueFull,
    Scheduler,
    SchedulerOutput,
    Sequence,
    SequenceUpdate,
    TokenOutput,
)

__all__ = ["FinishReason", "GenerationRunner", "QueueFull", "Scheduler", "SchedulerOutput",
           "Sequence", "SequenceUpdate", "TokenOutput"]


def __getattr__(name: str):
    # The runner pulls in asyncio and the engine contract; import it only when asked,
    # so engines can use the scheduler's types without a cycle.
    if name == "GenerationRunner":
        from model_server.generation.runner import GenerationRunner
        return GenerationRunner
    raise AttributeError(name)
