"""Gymnasium wrappers that put any furl_fast reward model into any env that renders rgb_array frames,
so other libraries' agents (Stable-Baselines3, CleanRL scripts) can train on VLM rewards.

Frames: info["vlm_frame"] when the env provides it (furl_fast's Meta-World envs render it on every
step anyway), else env.render(); in a vector env, the "frame" entry of a dict observation (what
furl_fast.envs.make_vector_env gives), else the sub-envs' renders. States (for rewards that need them,
e.g. code-as-reward): info["state"] when present (furl_fast's Meta-World envs: the state with the goal
filled in), else the observation.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np

from furl_fast.rewards.models import RewardModel

__all__ = ["VLMRewardVectorWrapper", "VLMRewardWrapper"]

_MODES = ("add", "replace")


def _check_args(reward_model: RewardModel, mode: str, scale: float) -> None:
    if not isinstance(reward_model, RewardModel):
        raise TypeError(f"VLMRewardWrapper: 'reward_model' must be a furl_fast RewardModel, got "
                        f"{type(reward_model).__name__}.")
    if mode not in _MODES:
        raise ValueError(f"VLMRewardWrapper: 'mode' must be 'add' or 'replace', got {mode!r}.")
    if not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise ValueError(f"VLMRewardWrapper: 'scale' must be a finite number, got {scale!r}.")


class VLMRewardWrapper(gym.Wrapper):
    """reward = env reward + scale * VLM reward (mode="add") or scale * VLM reward (mode="replace").

    reward_model: a single-environment model (a stateful one with num_envs=1). info gets
    "vlm_reward" (the unscaled model reward, float) and "task_reward" (the env's own reward).
    Stateful models are reset, and shown the reset frame, on every reset().
    """

    def __init__(self, env: gym.Env, reward_model: RewardModel, *,
                 mode: Literal["add", "replace"] = "add", scale: float = 1.0) -> None:
        super().__init__(env)
        _check_args(reward_model, mode, scale)
        if env.render_mode != "rgb_array":
            raise ValueError(f"VLMRewardWrapper: the env must render rgb_array frames "
                             f"(render_mode='rgb_array'), got render_mode={env.render_mode!r}.")
        self.reward_model, self.mode, self.scale = reward_model, mode, float(scale)

    def _score(self, obs: Any, info: dict[str, Any]) -> float:
        frame = info.get("vlm_frame")
        if frame is None:
            frame = self.env.render()
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"VLMRewardWrapper: the env's frame must be (H, W, 3) uint8, got "
                             f"{frame.dtype} {frame.shape}.")
        states = None
        if self.reward_model.needs_states:
            states = np.asarray(info.get("state", obs), dtype=np.float64).reshape(1, -1)
        return float(self.reward_model(frame[None], states)[0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        if self.reward_model.stateful:
            self.reward_model.reset([0])
            self._score(obs, info)  # stateful programs may record the episode's first frame
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        vlm = self._score(obs, info)
        info = dict(info, vlm_reward=vlm, task_reward=float(reward))
        total = self.scale * vlm + (float(reward) if self.mode == "add" else 0.0)
        return obs, total, terminated, truncated, info


class VLMRewardVectorWrapper(gym.vector.VectorWrapper):
    """The vector-env version: all N frames of a step are scored in one batch.

    Needs gymnasium's NEXT_STEP autoreset (make_vector_env's default): the step after an episode ends
    returns the reset observation with reward 0; the VLM reward of that step is 0 too, and stateful
    models are reset for those environments and shown their reset frame. infos get "vlm_reward" and
    "task_reward", (N,) float32.
    """

    def __init__(self, env: gym.vector.VectorEnv, reward_model: RewardModel, *,
                 mode: Literal["add", "replace"] = "add", scale: float = 1.0) -> None:
        super().__init__(env)
        _check_args(reward_model, mode, scale)
        autoreset = env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        if autoreset != gym.vector.AutoresetMode.NEXT_STEP:
            raise ValueError(f"VLMRewardVectorWrapper: needs autoreset_mode NEXT_STEP, the env has "
                             f"{autoreset}.")
        if getattr(reward_model, "num_envs", env.num_envs) != env.num_envs:
            raise ValueError(f"VLMRewardVectorWrapper: the reward model holds {reward_model.num_envs} "
                             f"episode states, the vector env has {env.num_envs} environments.")
        self.reward_model, self.mode, self.scale = reward_model, mode, float(scale)
        self._ended = np.zeros(env.num_envs, dtype=bool)

    def _frames(self, obs: Any) -> np.ndarray:
        if isinstance(obs, dict) and "frame" in obs:
            frames = obs["frame"]
        else:
            frames = self.env.render()
            if frames is None:
                raise ValueError("VLMRewardVectorWrapper: the vector env gives no 'frame' observation "
                                 "and renders nothing; make its envs with render_mode='rgb_array'.")
            frames = np.stack(frames)
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"VLMRewardVectorWrapper: frames must be (N, H, W, 3) uint8, got "
                             f"{frames.dtype} {frames.shape}.")
        return frames

    def _score(self, obs: Any, info: dict[str, Any]) -> np.ndarray:
        states = None
        if self.reward_model.needs_states:
            states = info.get("state", obs["obs"] if isinstance(obs, dict) and "obs" in obs else obs)
            states = np.asarray(states, dtype=np.float64).reshape(self.num_envs, -1)
        rewards = self.reward_model(self._frames(obs), states)
        return rewards.detach().cpu().numpy().astype(np.float32).reshape(self.num_envs)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._ended[:] = False
        if self.reward_model.stateful:
            self.reward_model.reset(None)
            self._score(obs, info)
        return obs, info

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        restarted = self._ended
        if self.reward_model.stateful and restarted.any():
            self.reward_model.reset(np.flatnonzero(restarted).tolist())
        vlm = self._score(obs, info)
        vlm[restarted] = 0.0  # autoreset steps carry reward 0 (gymnasium's NEXT_STEP convention)
        self._ended = np.logical_or(terminated, truncated)
        task = np.asarray(rewards, dtype=np.float32)
        info = dict(info, vlm_reward=vlm, task_reward=task)
        total = self.scale * vlm + (task if self.mode == "add" else 0.0)
        return obs, total.astype(np.float32), terminated, truncated, info
