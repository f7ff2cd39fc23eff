"""Verify a program set on expert and random rollouts (VLM-CaR step 2).

Accept only if, on at least `expert_min_rate` (default 100%) of the expert rollouts, every sub-task
completes in order, on at most `random_max_rate` (default 10%) of the random rollouts every sub-task
completes, and no program failed (crash, time limit, wrong return type, forbidden operation) anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from furl_fast.rewards.code._worker import reads_frame
from furl_fast.rewards.code.program_set import ProgramSet, progress_from_done
from furl_fast.rewards.code.sandbox import Sandbox, SandboxLimits

__all__ = [
    "EpisodeLike",
    "ProgramReport",
    "RolloutSettings",
    "VerificationReport",
    "VerifierConfig",
    "evaluate_programs",
    "verify",
    "verify_on_suite",
]

log = logging.getLogger(__name__)


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
    rollouts: dict = field(default_factory=dict)
    """Which rollouts it was verified on (RolloutSettings as a dict: seeds, episode length, suite
    options), when verify_on_suite collected them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VerificationReport:
        data = dict(data)
        data["programs"] = [ProgramReport(**p) for p in data["programs"]]
        return cls(**data)

    def one_line(self) -> str:
        """The verdict and the numbers in one line (per sub-task: expert / random in-order rates)."""
        rates = ", ".join(
            f"sub-task {p.index + 1} {p.expert_rate:.0%}/{p.random_rate:.0%}" for p in self.programs
        )
        why = "; ".join(self.reasons) if self.reasons else "accepted"
        return (
            f"{why} (in-order completion on {self.num_expert} expert / {self.num_random} random "
            f"rollouts: {rates})"
        )

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
    episodes: Iterable[EpisodeLike],
    limits: SandboxLimits | None = None,
) -> tuple[list[np.ndarray], list[list[tuple[int, str] | None]]]:
    """Run every program (a worker source, `done(frame, state)`; see ProgramSet.worker_programs) on
    every episode, the programs in parallel, one worker each. episodes may be any iterable: one
    episode is held at a time, so a generator of rendered rollouts stays small in memory. An
    episode's frames may be None (programs that read only the state get 1x1 stand-ins).

    Returns (done, errors): done[e] is (T_e + 1, K) bool; errors[k][e] is None or (step, reason),
    the reason being the sandbox's RunResult.error. Each episode starts a fresh program instance.
    """
    limits = limits or SandboxLimits()
    boxes = [Sandbox(src, limits, name=f"sub-task {k}") for k, src in enumerate(programs)]
    done: list[np.ndarray] = []
    errors: list[list[tuple[int, str] | None]] = [[] for _ in boxes]
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(boxes))) as pool:
            for ep in episodes:
                states = np.asarray(ep.states)
                frames = ep.frames if ep.frames is not None else np.zeros(
                    (len(states), 1, 1, 3), np.uint8)
                results = list(pool.map(lambda box, f=frames, s=states: box.run_episode(f, s), boxes))
                done.append(np.stack([r.done for r in results], axis=1).reshape(len(states), -1))
                for k, r in enumerate(results):
                    errors[k].append(
                        None if r.ok else (-1 if r.error_index is None else r.error_index, r.error)
                    )
    finally:
        for box in boxes:
            box.close()
    return done, errors


def verify(
    program_set: ProgramSet,
    expert: Iterable[EpisodeLike],
    random: Iterable[EpisodeLike],
    config: VerifierConfig | None = None,
) -> VerificationReport:
    """Verify a program set on expert and random episodes (any iterables, e.g. generators); see the
    module docstring for the acceptance rule."""
    config = config or VerifierConfig()
    k_total = len(program_set)
    kinds: list[str] = []

    def tagged() -> Iterator[EpisodeLike]:
        for kind, episodes in (("expert", expert), ("random", random)):
            for ep in episodes:
                kinds.append(kind)
                yield ep

    done, errors = evaluate_programs(program_set.worker_programs, tagged(), config.limits)
    n_exp = kinds.count("expert")
    if n_exp == 0 or n_exp == len(kinds):
        raise ValueError("verification needs at least one expert and one random rollout")
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
        num_random=len(kinds) - n_exp,
        programs=reports,
        reasons=reasons,
    )


@dataclass(frozen=True)
class RolloutSettings:
    """The rollouts a set is verified on in a suite. Expert rollout i and random rollout i run in the
    scene of seed + i (the random one draws its actions from a generator seeded with seed + i)."""

    num_expert: int = 10
    """Episodes of the suite's scripted expert."""
    num_random: int = 20
    """Episodes of uniform random actions (at 10% allowed, 20 episodes allow 2 chance successes)."""
    seed: int = 0
    goal: str = "fixed"
    """The suite's goal mode (Meta-World: fixed or random)."""
    max_steps: int | None = None
    """Episode length; None is the suite's full episode, as in training."""
    fast_render: bool = True
    """Render settings of the frames (only rendered when a program reads them)."""
    options: tuple[tuple[str, object], ...] = ()
    """The suite's options (e.g. Meta-World's frame_size), as sorted (name, value) pairs."""

    def __post_init__(self) -> None:
        if self.num_expert < 1 or self.num_random < 1:
            raise ValueError(f"verification needs at least one expert and one random rollout, got "
                             f"{self.num_expert} and {self.num_random}")


def verify_on_suite(
    program_set: ProgramSet,
    suite,
    task: str,
    settings: RolloutSettings | None = None,
    config: VerifierConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VerificationReport:
    """Verify a set on `suite`'s expert and random rollouts of `task` (suite.rollout; ValueError if
    the suite has no scripted expert). Rollouts are generated one at a time and rendered only when a
    program reads its frame. With cache_dir, the report is kept there under a hash of the set's
    content, the task, the settings and the thresholds, and reused: a resumed run or a sweep does
    not verify the same set twice."""
    settings = settings or RolloutSettings()
    config = config or VerifierConfig()
    described = dataclasses.asdict(settings)
    described["max_steps"] = settings.max_steps or suite.max_episode_steps(task, **dict(settings.options))
    described["options"] = dict(settings.options)
    described["suite"] = suite.name
    described["task"] = task
    path = None
    if cache_dir is not None:
        key = json.dumps({"set": program_set.content_hash(), "rollouts": described,
                          "expert_min_rate": config.expert_min_rate,
                          "random_max_rate": config.random_max_rate}, sort_keys=True, default=str)
        path = Path(cache_dir) / "code-verification" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        try:
            return VerificationReport.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass  # not cached yet (or an unreadable entry): verify again
    render = any(reads_frame(src) for src in program_set.worker_programs)

    def episodes(policy: str, count: int) -> Iterator[EpisodeLike]:
        for i in range(count):
            log.debug("verification: %s rollout %d of %d", policy, i + 1, count)
            yield suite.rollout(task, settings.seed + i, policy, goal=settings.goal,
                                max_steps=described["max_steps"], render=render,
                                fast_render=settings.fast_render, **dict(settings.options))

    report = verify(program_set, episodes("expert", settings.num_expert),
                    episodes("random", settings.num_random), config)
    report.rollouts = described
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
        os.replace(tmp, path)
    return report
