"""Verify a program set on expert and random rollouts (VLM-CaR step 2).

Accept only if, on at least `expert_min_rate` (default 100%) of the expert rollouts, every sub-task
completes in order, on at most `random_max_rate` (default 10%) of the random rollouts every sub-task
completes, and no program failed (crash, time limit, wrong return type, forbidden operation) anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from furl_fast.rewards.code.program_set import ProgramSet, progress_from_done
from furl_fast.rewards.code.sandbox import Sandbox, SandboxLimits

__all__ = [
    "EpisodeLike",
    "ProgramReport",
    "VerificationReport",
    "VerifierConfig",
    "evaluate_programs",
    "verify",
]


class EpisodeLike(Protocol):
    """Anything with a rollout's observations, e.g. furl_fast.envs' Rollout.

    states: (T+1, obs_dim) float32/float64, frames: (T+1, H, W, 3) uint8 (tiny dummy frames are fine
    for programs that only read the state).
    """

    states: np.ndarray
    frames: np.ndarray


@dataclass(frozen=True)
class VerifierConfig:
    """Acceptance thresholds and sandbox limits."""

    expert_min_rate: float = 1.0
    """Fraction of expert rollouts on which all sub-tasks must complete in order (paper: 100%)."""
    random_max_rate: float = 0.1
    """Largest fraction of random rollouts on which all sub-tasks may complete (paper: 10%)."""
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    """Limits for the program workers."""


@dataclass
class ProgramReport:
    """How one sub-task's program did. Rates are fractions of rollouts."""

    index: int
    description: str
    expert_rate: float
    """Sub-task completed in order (after all earlier sub-tasks) on this fraction of expert rollouts."""
    random_rate: float
    """Same on random rollouts."""
    expert_any_rate: float
    """done() returned True at least once, in order or not, on this fraction of expert rollouts."""
    random_any_rate: float
    errors: list[str] = field(default_factory=list)
    """Failures with reasons: '<expert|random> rollout i, step t: reason'."""
    missed_expert: list[int] = field(default_factory=list)
    """Expert rollouts on which the sub-task did not complete in order."""


@dataclass
class VerificationReport:
    task: str
    accepted: bool
    expert_rate: float
    """Fraction of expert rollouts on which all sub-tasks completed in order."""
    random_rate: float
    """Fraction of random rollouts on which all sub-tasks completed in order."""
    num_expert: int
    num_random: int
    programs: list[ProgramReport]
    reasons: list[str]
    """Why the set was rejected (empty when accepted)."""

    def summary(self) -> str:
        """Plain-text report; also what the generation client sends back to the VLM."""
        verdict = "ACCEPTED" if self.accepted else "REJECTED"
        lines = [
            (
                f"Verification of {len(self.programs)} sub-task program(s) for task {self.task!r}: "
                f"{verdict}"
            ),
            (
                f"All sub-tasks completed in order on {self.expert_rate:.0%} of {self.num_expert} expert "
                f"rollouts and on {self.random_rate:.0%} of {self.num_random} random rollouts."
            ),
        ]
        lines += [f"- {r}" for r in self.reasons]
        for p in self.programs:
            lines.append(
                f"Sub-task {p.index + 1} ({p.description}): completed in order on "
                f"{p.expert_rate:.0%} of expert and {p.random_rate:.0%} of random rollouts; "
                f"done() was ever True on {p.expert_any_rate:.0%} of expert and "
                f"{p.random_any_rate:.0%} of random rollouts."
            )
            if p.missed_expert:
                lines.append(f"  not completed on expert rollouts {p.missed_expert[:20]}")
            lines += [f"  failure: {e}" for e in p.errors[:10]]
            if len(p.errors) > 10:
                lines.append(f"  ... and {len(p.errors) - 10} more failures")
        return "\n".join(lines)


def evaluate_programs(
    programs: Sequence[str],
    episodes: Sequence[EpisodeLike],
    limits: SandboxLimits | None = None,
) -> tuple[list[np.ndarray], list[list[tuple[int, str] | None]]]:
    """Run every program on every episode, each program in its own worker (in parallel).

    Returns (done, errors): done[e] is (T_e + 1, K) bool; errors[k][e] is None or (step, reason).
    Each episode starts a fresh program instance (per-episode state).
    """
    limits = limits or SandboxLimits()

    def run_one(k: int) -> tuple[list[np.ndarray], list[tuple[int, str] | None]]:
        columns, errs = [], []
        with Sandbox(programs[k], limits, name=f"sub-task {k}") as box:
            for ep in episodes:
                r = box.run_episode(ep.frames, ep.states)
                columns.append(r.done)
                errs.append(
                    None if r.ok else (-1 if r.error_index is None else r.error_index, r.error)
                )
        return columns, errs

    with ThreadPoolExecutor(max_workers=max(1, len(programs))) as pool:
        per_program = list(pool.map(run_one, range(len(programs))))
    done = [
        np.stack([per_program[k][0][e] for k in range(len(programs))], axis=1)
        for e in range(len(episodes))
    ]
    return done, [per_program[k][1] for k in range(len(programs))]


def verify(
    program_set: ProgramSet,
    expert: Sequence[EpisodeLike],
    random: Sequence[EpisodeLike],
    config: VerifierConfig | None = None,
) -> VerificationReport:
    """Verify a program set; see the module docstring for the acceptance rule."""
    config = config or VerifierConfig()
    if not expert or not random:
        raise ValueError("verification needs at least one expert and one random rollout")
    k_total = len(program_set)
    groups = {"expert": list(expert), "random": list(random)}
    done, errors = evaluate_programs(
        program_set.programs, groups["expert"] + groups["random"], config.limits
    )
    n_exp = len(groups["expert"])
    progress = np.array([progress_from_done(d)[-1] if len(d) else 0 for d in done])
    any_true = np.array([d.any(axis=0) for d in done]).reshape(len(done), k_total)
    exp_prog, rnd_prog = progress[:n_exp], progress[n_exp:]

    reports = []
    for k in range(k_total):
        errs = []
        for e, err in enumerate(errors[k]):
            if err is not None:
                group, idx = ("expert", e) if e < n_exp else ("random", e - n_exp)
                where = "" if err[0] < 0 else f", step {err[0]}"
                errs.append(f"{group} rollout {idx}{where}: {err[1]}")
        reports.append(
            ProgramReport(
                index=k,
                description=program_set.subtasks[k],
                expert_rate=float(np.mean(exp_prog > k)),
                random_rate=float(np.mean(rnd_prog > k)),
                expert_any_rate=float(np.mean(any_true[:n_exp, k])),
                random_any_rate=float(np.mean(any_true[n_exp:, k])),
                errors=errs,
                missed_expert=[int(i) for i in np.flatnonzero(exp_prog <= k)],
            )
        )
    expert_rate = float(np.mean(exp_prog == k_total))
    random_rate = float(np.mean(rnd_prog == k_total))
    reasons = []
    failed = [r.index + 1 for r in reports if r.errors]
    if failed:
        reasons.append(f"program(s) of sub-task(s) {failed} failed to run (see failures below)")
    if expert_rate < config.expert_min_rate:
        reasons.append(
            f"all sub-tasks completed in order on only {expert_rate:.0%} of expert rollouts "
            f"(required: {config.expert_min_rate:.0%})"
        )
    if random_rate > config.random_max_rate:
        reasons.append(
            f"all sub-tasks completed on {random_rate:.0%} of random rollouts (allowed at most "
            f"{config.random_max_rate:.0%}): the programs do not tell success from chance"
        )
    return VerificationReport(
        task=program_set.task,
        accepted=not reasons,
        expert_rate=expert_rate,
        random_rate=random_rate,
        num_expert=n_exp,
        num_random=len(groups["random"]),
        programs=reports,
        reasons=reasons,
    )
