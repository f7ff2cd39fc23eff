"""N Meta-World environments in worker processes, each rendering its own VLM frames."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from furl_fast.envs.meta_world import _LIVE_RENDERERS, make_env, resolve_task


class FrameInObservation(gym.Wrapper):
    """Moves info["vlm_frame"] into the observation: {"obs": the env's observation, "frame": (H, W, 3)
    uint8}. In a vector env the frames then travel through shared memory instead of pickled infos."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        size = env.unwrapped.frame_size
        self.observation_space = spaces.Dict({
            "obs": env.observation_space,
            "frame": spaces.Box(0, 255, (size, size, 3), dtype=np.uint8),
        })

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return {"obs": obs, "frame": info.pop("vlm_frame")}, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return {"obs": obs, "frame": info.pop("vlm_frame")}, reward, terminated, truncated, info


def _make_worker_env(task: str, seed: int, env_kwargs: dict[str, Any]) -> gym.Env:
    env = make_env(task, seed=seed, **env_kwargs)
    return FrameInObservation(env) if env.vlm_frames else env


def make_vector_env(
    task: str,
    num_envs: int,
    *,
    seed: int,
    goal: Literal["fixed", "random"] = "fixed",
    context: str | None = "forkserver",
    autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    asynchronous: bool = True,
    **env_kwargs: Any,
) -> gym.vector.VectorEnv:
    """num_envs copies of make_env(task, goal=goal, **env_kwargs), one per worker process
    (asynchronous=False: all in this process, gymnasium's SyncVectorEnv; same observations).

    Observations are batched: with vlm_frames=True (the default) a dict {"obs": (N, *obs_shape),
    "frame": (N, 256, 256, 3) uint8}, else the plain (N, *obs_shape) array; info["success"] is (N,)
    bool. goal="fixed": every worker shows the one scene of `seed` (one task, one goal image);
    goal="random": worker i draws its scenes from seed + i (reset(seed=s) re-seeds them from s + i).
    context: the multiprocessing start method. "forkserver" starts workers from a clean process: forked
    workers hang on their first render when the caller already made a GL context (seen with EGL +
    llvmpipe), and CUDA state does not survive fork either. Like "spawn", it re-imports the main
    module in the workers, so scripts need the `if __name__ == "__main__":` guard.
    autoreset_mode: gymnasium's (NEXT_STEP: the step after a truncation returns the reset
    observation, with reward 0).
    """
    resolve_task(task)  # fail here, not in N workers
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"make_vector_env: 'num_envs' must be a positive int, got {num_envs!r}.")
    if context == "fork" and _LIVE_RENDERERS:
        raise RuntimeError("make_vector_env: context='fork' after this process made a GL context "
                           "(a rendered env) makes the workers hang; use 'forkserver' or 'spawn'.")
    seeds = [seed if goal == "fixed" else seed + i for i in range(num_envs)]
    fns = [partial(_make_worker_env, task, s, dict(env_kwargs, goal=goal)) for s in seeds]
    if not asynchronous:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=autoreset_mode)
    return gym.vector.AsyncVectorEnv(fns, context=context, autoreset_mode=autoreset_mode)
