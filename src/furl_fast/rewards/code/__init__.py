"""Code as reward (VLM-CaR, Venuto et al., ICML 2024).

A VLM writes one checker program per sub-task of a task, `done(frame) -> bool` (the camera image
alone, as in the paper) or `done(frame, state) -> bool` (also the simulator's privileged state)
(client.py; the command python -m furl_fast.generate_programs); the programs run in a sandboxed
worker process (sandbox.py); a program set is accepted only if it completes on all expert rollouts
and not on random ones (verifier.py); the accepted set gives a dense, per-episode stateful reward
(reward.py). Hand-written reference sets for a few Meta-World tasks
(furl_fast.envs.metaworld.programs, also importable from here; no VLM wrote them, and they read the
privileged state) make the path usable and testable without any VLM service.
"""

from __future__ import annotations

from furl_fast.rewards.code.client import (
    GenerationError,
    GenerationResult,
    VLMClient,
    VLMConfig,
    encode_png,
    generate_program_set,
    parse_program_set,
)
from furl_fast.rewards.code.program_set import (
    INPUTS,
    ProgramSet,
    load_program_set,
    progress_from_done,
)
from furl_fast.rewards.code.reward import CodeReward
from furl_fast.rewards.code.sandbox import (
    RunResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    check_isolation,
    check_source,
    sanitize_error,
)
from furl_fast.rewards.code.verifier import (
    ProgramReport,
    RolloutSettings,
    VerificationReport,
    VerifierConfig,
    evaluate_programs,
    verify,
    verify_on_suite,
)


def __getattr__(name: str):
    # The reference sets live with the Meta-World suite and import ProgramSet from this package:
    # loaded on first use, so that neither module needs the other to have finished importing.
    if name in ("REFERENCE_PROGRAM_SETS", "reference_program_set"):
        from furl_fast.envs.metaworld import programs

        return getattr(programs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INPUTS",
    "REFERENCE_PROGRAM_SETS",
    "CodeReward",
    "GenerationError",
    "GenerationResult",
    "ProgramReport",
    "ProgramSet",
    "RolloutSettings",
    "RunResult",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailable",
    "VLMClient",
    "VLMConfig",
    "VerificationReport",
    "VerifierConfig",
    "check_isolation",
    "check_source",
    "encode_png",
    "evaluate_programs",
    "generate_program_set",
    "load_program_set",
    "parse_program_set",
    "progress_from_done",
    "reference_program_set",
    "sanitize_error",
    "verify",
    "verify_on_suite",
]
