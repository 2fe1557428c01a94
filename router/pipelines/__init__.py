"""The transport-agnostic pipeline engine: the DAG (``graph``), its executor
(``executor``) and the pure trace arithmetic (``trace``). Nothing here knows gRPC
servicers or replicas: the executor calls models through an injected
``call_node`` and reads time from an injected clock."""
from router.pipelines.executor import NodeResult, PipelineExecutor, PipelineOutcome
from router.pipelines.graph import PipelineGraph

__all__ = ["NodeResult", "PipelineExecutor", "PipelineGraph", "PipelineOutcome"]
