"""furl_fast: fast VLM rewards for reinforcement learning (FuRL and friends) with a C++/CUDA core."""

from __future__ import annotations

__version__ = "0.1.0"

from furl_fast._native import build_info

__all__ = ["Batch", "Policy", "ReplayBuffer", "__version__", "build_info", "load_actor", "load_agent"]

# These load torch (seconds): imported on first use, so that a command line with a mistake is
# refused without loading it.
_LAZY = {"Batch": "furl_fast.replay", "ReplayBuffer": "furl_fast.replay", "Policy": "furl_fast.policy",
         "load_actor": "furl_fast.policy", "load_agent": "furl_fast.policy"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'furl_fast' has no attribute {name!r}")
