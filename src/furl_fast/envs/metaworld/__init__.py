"""Everything Meta-World: the raw v3 task env and its rendering (FuRL's corner2 frame and crop), task
names, MT10 prompts, scripted experts and rollouts, reference code-reward programs, the suite
(MetaWorldSuite) and the Gymnasium ids furl_fast/<task>."""

from __future__ import annotations

from furl_fast.envs.metaworld.env import MetaWorldEnv
from furl_fast.envs.metaworld.prompts import MT10_PROMPTS, task_prompt
from furl_fast.envs.metaworld.registration import register_envs
from furl_fast.envs.metaworld.rendering import VLM_CAMERA, VLM_FRAME_SIZE, FrameRenderer, furl_crop
from furl_fast.envs.metaworld.rollout import Rollout, expert_policy, expert_rollout, random_rollout
from furl_fast.envs.metaworld.suite import MetaWorldSuite, make_env, make_vector_env
from furl_fast.envs.metaworld.tasks import (
    EPISODE_STEPS,
    MT10_TASKS,
    TASKS,
    canonical_task,
    metaworld_name,
)

__all__ = [
    "EPISODE_STEPS",
    "MT10_PROMPTS",
    "MT10_TASKS",
    "TASKS",
    "VLM_CAMERA",
    "VLM_FRAME_SIZE",
    "FrameRenderer",
    "MetaWorldEnv",
    "MetaWorldSuite",
    "Rollout",
    "canonical_task",
    "expert_policy",
    "expert_rollout",
    "furl_crop",
    "make_env",
    "make_vector_env",
    "metaworld_name",
    "random_rollout",
    "register_envs",
    "task_prompt",
]
