"""One step of a vector env as the trainer consumes it: gymnasium's SAME_STEP autoreset unpacked."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Transition:
    """One vector step, with autoreset already unpacked. N = num_envs."""

    next_obs: np.ndarray  # (N, *obs_shape): what each step returned (final obs for ended episodes)
    next_frames: np.ndarray | None  # (N, H, W, 3) uint8 matching next_obs
    reward: np.ndarray  # (N,) the env's reward (sparse or dense)
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    success: np.ndarray  # (N,) bool
    done: np.ndarray  # (N,) bool: terminated or truncated
    reset_obs: np.ndarray  # (N, *obs_shape): the observations to act on next
    reset_frames: np.ndarray | None
    next_states: np.ndarray  # (N, S) info["state"] of next_obs (the env contract's full state)
    reset_states: np.ndarray  # (N, S) info["state"] of reset_obs
    env_reward: np.ndarray  # (N,) the env's own reward (info["env_reward"]; reward when dense)


def env_states(obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The env states of a vector step for rewards that read them: info["state"] (e.g. Meta-World's
    state with the goal xyz, even when the observation hides it), else the observation itself."""
    return np.asarray(info["state"]) if "state" in info else obs


def split_obs(obs: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Vector-env observation -> (observations, frames or None)."""
    if isinstance(obs, dict):
        return np.asarray(obs["obs"]), np.asarray(obs["frame"])
    return np.asarray(obs), None


def vector_step(envs, actions: np.ndarray) -> Transition:
    """envs.step with gymnasium's SAME_STEP autoreset: ended envs report their final observation and
    info under final_obs / final_info, and return the reset observation."""
    obs, reward, terminated, truncated, info = envs.step(actions)
    states, frames = split_obs(obs)
    done = np.logical_or(terminated, truncated)
    success = np.asarray(info["success"], dtype=bool).copy()
    env_reward = np.array(info.get("env_reward", reward), np.float32)
    reset_env_states = env_states(states, info)
    next_obs, next_frames = states.copy(), None if frames is None else frames.copy()
    next_env_states = reset_env_states.copy()
    for i in np.flatnonzero(done):
        final_states, final_frames = split_obs(info["final_obs"][i])
        next_obs[i] = final_states
        if next_frames is not None:
            next_frames[i] = final_frames
        final_info = info["final_info"]
        next_env_states[i] = final_info["state"][i] if "state" in final_info else final_states
        success[i] = bool(final_info["success"][i])
        if "env_reward" in final_info:
            env_reward[i] = final_info["env_reward"][i]
    return Transition(next_obs, next_frames, np.asarray(reward, np.float32), np.asarray(terminated),
                      np.asarray(truncated), success, done, states, frames, next_env_states,
                      reset_env_states, env_reward)
