"""Dense reward from a verified program set (VLM-CaR step 3).

reward = (sub-tasks completed so far, in order) / (number of sub-tasks), optionally plus the sparse
task reward. Per-episode state: call reset(i) when environment i starts an episode, then call the
reward on every observation of that episode, the reset observation included (stateful programs may
record it, e.g. the drawer's initial position), so that online rewards equal what the verifier saw.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from furl_fast.rewards.code.program_set import ProgramSet
from furl_fast.rewards.code.sandbox import Sandbox, SandboxLimits

__all__ = ["CodeReward"]

log = logging.getLogger(__name__)

COST_WARNING_SHARE = 0.2


class CodeReward:
    """Stateful dense reward for `num_envs` parallel episodes; one sandbox worker per sub-task.

    A program that fails at run time (exception, time limit or budget, wrong type, dead worker) is
    disabled for the rest of the reward's life: its sub-task never completes again (a broken checker
    cannot be trusted), a warning is logged and `disabled[k]` holds the reason. The trainer never
    crashes. A warning is also logged (once) when scoring takes more than COST_WARNING_SHARE of the
    wall time since the reward was made.
    """

    def __init__(
        self,
        program_set: ProgramSet,
        num_envs: int = 1,
        limits: SandboxLimits | None = None,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.program_set = program_set
        self.num_envs = num_envs
        self._boxes = [
            Sandbox(src, limits, name=f"sub-task {k}") for k, src in enumerate(program_set.programs)
        ]
        self.disabled: list[str | None] = [box.rejection for box in self._boxes]
        for k, reason in enumerate(self.disabled):
            if reason is not None:
                log.warning("code reward: sub-task %d's program is rejected: %s", k, reason)
        self.progress = np.zeros(num_envs, dtype=np.int64)
        """(num_envs,) int64: sub-tasks completed so far in each environment's episode."""
        self._fresh = np.ones(num_envs, dtype=bool)
        self._pool = ThreadPoolExecutor(max_workers=len(self._boxes))
        self.seconds_spent = 0.0
        """Wall time spent scoring (all batch() calls)."""
        self._created = time.monotonic()
        self._cost_warned = False

    @property
    def num_subtasks(self) -> int:
        return len(self._boxes)

    def reset(self, env_index: int | Sequence[int] | None = None) -> None:
        """Start a new episode in the given environments (default: all)."""
        idx = slice(None) if env_index is None else np.atleast_1d(np.asarray(env_index))
        self.progress[idx] = 0
        self._fresh[idx] = True

    def __call__(
        self, frame: np.ndarray, state: np.ndarray, task_reward: float | None = None
    ) -> float:
        """Reward of the single environment (num_envs == 1). frame: (H, W, 3) uint8, state: (D,)
        float."""
        if self.num_envs != 1:
            raise ValueError(f"call batch() for num_envs={self.num_envs}; __call__ is for one env")
        tr = None if task_reward is None else np.asarray([task_reward], dtype=np.float32)
        return float(self.batch(np.asarray(frame)[None], np.asarray(state)[None], tr)[0])

    @property
    def reads_frames(self) -> bool:
        """False when no program reads its frame argument: callers may then skip rendering and pass
        (N, 1, 1, 3) placeholder frames."""
        return any(box.reads_frame for box in self._boxes)

    def batch(
        self,
        frames: np.ndarray,
        states: np.ndarray,
        task_rewards: np.ndarray | None = None,
        env_ids: Sequence[int] | None = None,
    ) -> np.ndarray:
        """One step of the environments env_ids (default all, in order): frames (N, H, W, 3) uint8,
        states (N, D) float32/64, task_rewards (N,) float or None, with N = len(env_ids). Returns
        (N,) float32 rewards. A vector env scores its reset observations through env_ids, since
        only the environments whose episodes ended have one."""
        states = np.asarray(states)
        if states.dtype not in (np.float32, np.float64):
            states = states.astype(np.float64)
        if env_ids is None:
            slots = np.arange(self.num_envs, dtype=np.int64)
        else:
            slots = np.asarray(env_ids, dtype=np.int64).reshape(-1)
            if len(np.unique(slots)) != len(slots) or np.any((slots < 0) | (slots >= self.num_envs)):
                raise ValueError(f"env_ids must be distinct environment indices in [0, {self.num_envs}),"
                                 f" got {slots.tolist()}")
        if len(states) != len(slots):
            raise ValueError(f"expected {len(slots)} environments' states, got {len(states)}")
        resets = self._fresh[slots]

        def run(k: int) -> np.ndarray:
            if self.disabled[k] is not None:
                return np.zeros(len(slots), dtype=bool)
            r = self._boxes[k].run(frames, states, slots, resets)
            if not r.ok:
                self.disabled[k] = r.error
                log.warning("code reward: disabling sub-task %d's program: %s", k, r.error)
                self._boxes[k].close()
                return np.zeros(len(slots), dtype=bool)
            return r.done

        start = time.monotonic()
        done = np.stack(list(self._pool.map(run, range(self.num_subtasks))), axis=1)
        self._account(time.monotonic() - start)
        self._fresh[slots] = False
        # Advance each environment's pointer through consecutive completed sub-tasks (several may
        # complete on one step), exactly as progress_from_done does offline.
        for row, i in enumerate(slots):
            while self.progress[i] < self.num_subtasks and done[row, self.progress[i]]:
                self.progress[i] += 1
        reward = (self.progress[slots] / self.num_subtasks).astype(np.float32)
        if task_rewards is not None:
            reward += np.asarray(task_rewards, dtype=np.float32).reshape(len(slots))
        return reward

    def _account(self, seconds: float) -> None:
        self.seconds_spent += seconds
        elapsed = time.monotonic() - self._created
        share = self.seconds_spent / elapsed
        if not self._cost_warned and elapsed > 60 and share > COST_WARNING_SHARE:
            self._cost_warned = True
            log.warning(
                "code reward: scoring took %.0f%% of the wall time so far (%.0f s of %.0f s); its "
                "programs slow training down", 100 * share, self.seconds_spent, elapsed,
            )

    def close(self) -> None:
        """End the worker processes."""
        for box in self._boxes:
            box.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> CodeReward:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()
