"""Where torch runs: one device resolver and a thread-count context, shared by the engine and the backbones.

Decision (issue 14): one resolver for every caller. ``"auto"`` (or None) is CUDA when it is available, else
the CPU; ``"cuda"``/``"cuda:N"`` when CUDA is not available raises a :class:`~selmix_ray.errors.ConfigError`
that names the fix. That was the engine's behaviour; ``build_features(device="cuda")`` on a machine
without CUDA used to fail later, inside torch, with torch's own error, and now fails first with this one.

torch is imported inside the functions, so importing this module imports nothing heavy.
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["resolve_device", "torch_threads"]


def resolve_device(device=None):
    """``"auto"``/None -> ``torch.device("cuda")`` when CUDA is available, else ``"cpu"``; a name or a
    ``torch.device`` as given. Raises ConfigError for a CUDA device when CUDA is not available."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but CUDA is not available; use device='auto' or 'cpu'.")
    return resolved


class torch_threads:
    """Run a block with ``n`` intra-op threads (None: unchanged), restoring the previous number after.

    Small convolutions and full-batch problems lose time to threads: on this 2-core machine under load,
    a SmallCNN training step took 140 ms with 1 thread and 800 ms with 2.
    """

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.previous = torch.get_num_threads()
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.previous)
