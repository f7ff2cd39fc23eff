"""furl_fast: fast VLM rewards for reinforcement learning (FuRL and friends) with a C++/CUDA core."""

from __future__ import annotations

__version__ = "0.1.0"

from furl_fast._native import build_info

__all__ = ["Batch", "ReplayBuffer", "__version__", "build_info"]


def __getattr__(name: str):
    # Batch and ReplayBuffer load torch (seconds): imported on first use, so that a command line
    # with a mistake is refused without loading it.
    if name in ("Batch", "ReplayBuffer"):
        from furl_fast import replay

        return getattr(replay, name)
    raise AttributeError(f"module 'furl_fast' has no attribute {name!r}")
