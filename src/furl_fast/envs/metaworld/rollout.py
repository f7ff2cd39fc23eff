"""Whole-episode rollouts: Meta-World's scripted expert (FuRL's goal image, code-as-reward checks,
reward evaluation) and uniform random actions (negatives, baselines)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from furl_fast.envs.metaworld.suite import make_env
from furl_fast.envs.metaworld.tasks import EPISODE_STEPS, metaworld_name


@dataclass
class Rollout:
    """One episode, index-aligned: step t takes states[t] and frames[t] to states[t + 1] and
    frames[t + 1] with actions[t]; successes[t] is info["success"] after that step."""

    states: np.ndarray
    """(T + 1, obs_dim) float32: the reset state, then the state after each step."""
    actions: np.ndarray
    """(T, act_dim) float32, in [-1, 1]."""
    frames: np.ndarray | None
    """(T + 1, H, W, 3) uint8 upright VLM frames matching states (None when rendered without frames)."""
    successes: np.ndarray
    """(T,) bool."""
    env_states: np.ndarray | None = None
    """(T + 1, 39) float32 info["state"]: the full state with the goal xyz filled in, what the code
    reward's programs read in training (states hide the goal under a fixed goal)."""

    def first_success(self) -> int | None:
        """Index into states/frames of the first successful state (FuRL's goal image), or None."""
        hits = np.flatnonzero(self.successes)
        return int(hits[0]) + 1 if hits.size else None


def _rollout(env: gym.Env, act: Callable[[np.ndarray], np.ndarray], max_steps: int,
             stop_on_success: bool) -> Rollout:
    state, info = env.reset()
    states, actions, frames, successes = [state], [], [info.get("vlm_frame")], []
    env_states = [info["state"]]
    for _ in range(max_steps):
        action = np.clip(np.asarray(act(state), dtype=np.float32), -1.0, 1.0)
        state, _, _, truncated, info = env.step(action)
        states.append(state)
        actions.append(action)
        frames.append(info.get("vlm_frame"))
        env_states.append(info["state"])
        successes.append(info["success"])
        if truncated or (stop_on_success and info["success"]):
            break
    return Rollout(
        states=np.stack(states).astype(np.float32),
        actions=np.stack(actions).astype(np.float32).reshape(len(actions), -1),
        frames=None if frames[0] is None else np.stack(frames),
        successes=np.asarray(successes, dtype=bool),
        env_states=np.stack(env_states).astype(np.float32),
    )


def expert_policy(env: gym.Env) -> Callable[[np.ndarray], np.ndarray]:
    """Meta-World's scripted policy for env's task (a make_env env, or the raw MetaWorldEnv) as state
    (39,) float32 -> action (4,) float32 in [-1, 1]. The scripts read the goal xyz from the last 3
    state entries, so the env's goal is put there even when the state hides it (fixed goal)."""
    raw = env.unwrapped
    policy = ENV_POLICY_MAP[metaworld_name(raw.task)]()

    def act(state: np.ndarray) -> np.ndarray:
        full = np.asarray(state, dtype=np.float64).copy()
        full[-3:] = raw.goal_position
        with warnings.catch_warnings():  # the scripts warn whenever their P-gain saturates
            warnings.simplefilter("ignore")
            return np.clip(policy.get_action(full), -1.0, 1.0).astype(np.float32)

    return act


def expert_rollout(
    task: str,
    seed: int,
    *,
    goal: Literal["fixed", "random"] = "fixed",
    max_steps: int = EPISODE_STEPS,
    render: bool = True,
    fast_render: bool = True,
    stop_on_success: bool = False,
    **options: Any,
) -> Rollout:
    """One episode of Meta-World's scripted policy for `task` in make_env(task, seed=seed, goal=goal,
    **options) (options: the suite's, e.g. frame_size).

    The policy sees the goal xyz even when the env hides it from the state (see expert_policy);
    Rollout.states hold the env's own states. render=False skips
    rendering (much faster) and leaves frames None. stop_on_success ends the episode at the first
    success.
    """
    env = make_env(task, seed=seed, goal=goal, vlm_frames=render, fast_render=fast_render, **options)
    act = expert_policy(env)
    try:
        return _rollout(env, act, max_steps, stop_on_success)
    finally:
        env.close()


def random_rollout(
    task: str,
    seed: int,
    *,
    goal: Literal["fixed", "random"] = "fixed",
    max_steps: int = EPISODE_STEPS,
    render: bool = True,
    fast_render: bool = True,
    **options: Any,
) -> Rollout:
    """One episode of uniform random actions in [-1, 1]^4 (drawn from a generator seeded by seed) in
    make_env(task, seed=seed, goal=goal, **options). render=False leaves frames None."""
    rng = np.random.default_rng(seed)
    env = make_env(task, seed=seed, goal=goal, vlm_frames=render, fast_render=fast_render, **options)
    try:
        return _rollout(env, lambda _: rng.uniform(-1.0, 1.0, size=4), max_steps, False)
    finally:
        env.close()
