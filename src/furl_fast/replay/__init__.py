"""Replay buffer for pixel and state RL with VLM embeddings: one stored frame per environment step,
frame stacks and n-step returns built by index at sample time, DrQ random shift fused into the gather.

The core is C++ (csrc/replay/); this package allocates its storage as torch tensors, validates
arguments, and returns batches as torch tensors. Modules: buffer (the ReplayBuffer facade and
Batch), layout (the validated Layout and the storage columns it implies), inputs (argument
conversion), sampling (a sample's outputs, GPU mode's gather), file_format (save / load).

Adding data. An episode is `start_episode(first_obs)` followed by one `add(next_obs, action, reward,
terminated, truncated)` per step, where next_obs is the observation that step returned. The step
that ends the episode (terminated or truncated) carries its final observation, so the last
transition's next_obs is always stored; the next episode needs a new start_episode(), and add()
without an open episode raises. Every observation is stored exactly once. (The argument order of
add() follows what env.step() returns first: the observation, then the rest.)

    buf.start_episode(obs)
    while True:
        action = policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        buf.add(obs, action, reward, terminated, truncated, success=info["success"])
        if terminated or truncated:
            break

Vector envs: num_envs=N, then start_episode(obs_e, env=e) per env, and add_batch() with (N, ...)
arrays per step; pass reset_obs (the observations after the automatic reset) to start the next
episodes of the envs that ended in the same call.
"""

from __future__ import annotations

from furl_fast.replay.buffer import Batch, ReplayBuffer
from furl_fast.replay.sampling import packed as _packed  # noqa: F401 (python_tests/test_cuda_paths.py)

__all__ = ["Batch", "ReplayBuffer"]
