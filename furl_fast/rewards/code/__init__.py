"""Code as reward (VLM-CaR, Venuto et al., ICML 2024): checker programs, their sandbox, the verifier,
the dense reward, reference program sets and the VLM generation client."""

from __future__ import annotations

from furl_fast.rewards.code.sandbox import RunResult, Sandbox, SandboxLimits, check_source

__all__ = ["RunResult", "Sandbox", "SandboxLimits", "check_source"]
