"""furl_fast: fast VLM rewards for reinforcement learning (FuRL and friends) with a C++/CUDA core."""

from __future__ import annotations

__version__ = "0.1.0"

from furl_fast._native import build_info
from furl_fast.policy import Policy, load_actor, load_agent
from furl_fast.replay import Batch, ReplayBuffer

__all__ = ["Batch", "Policy", "ReplayBuffer", "__version__", "build_info", "load_actor", "load_agent"]
