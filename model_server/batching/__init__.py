from model_server.batching.batcher import DynamicBatcher
from model_server.batching.policy import BatchPolicy, Decision, Pending, decide

__all__ = ["BatchPolicy", "Decision", "DynamicBatcher", "Pending", "decide"]
