"""Device and thread settings shared by the torch-based engines."""
from __future__ import annotations


def resolve_device(device: str) -> str:
    """'cpu' stays; 'cuda[:N]' is used only where CUDA is really there."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        return device
    return "cpu"


def inference_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads when configured; by default torch uses every core,
    which on small machines competes with the gRPC event loop."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def quiet_transformers() -> None:
    """No progress bars in server logs: weights load from local files in milliseconds."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
