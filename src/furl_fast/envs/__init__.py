"""Meta-World environments for VLM-reward RL: sparse reward, headless VLM frames, vectorised workers,
scripted-expert and random rollouts; Gymnasium ids furl_fast/<task> (envs.registration).

Importing this package selects headless EGL rendering (MUJOCO_GL=egl) unless the user chose a backend:
MuJoCo reads the variable once, when it is first imported, so it must be set before metaworld/mujoco
load. With no display and the variable unset, every render fails.
"""

from __future__ import annotations

import os
import sys
import warnings

if "MUJOCO_GL" not in os.environ and "mujoco" in sys.modules:
    warnings.warn(
        "furl_fast.envs: mujoco was imported before furl_fast.envs with MUJOCO_GL unset, so MuJoCo "
        "picked its windowed GL backend and headless rendering will fail. Set MUJOCO_GL=egl in the "
        "environment, or import furl_fast.envs before mujoco/metaworld.",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ.setdefault("MUJOCO_GL", "egl")

# MUJOCO_GL must be set before these import mujoco.
from furl_fast.envs.meta_world import (
    MT10_TASKS,
    TASKS,
    MetaWorldEnv,
    make_env,
    resolve_task,
)
from furl_fast.envs.registration import register_envs
from furl_fast.envs.rollout import Rollout, expert_policy, expert_rollout, random_rollout
from furl_fast.envs.vector import make_vector_env

register_envs()  # gymnasium.make("furl_fast/<task>")

__all__ = [
    "MT10_TASKS",
    "TASKS",
    "MetaWorldEnv",
    "Rollout",
    "expert_policy",
    "expert_rollout",
    "make_env",
    "make_vector_env",
    "random_rollout",
    "register_envs",
    "resolve_task",
]
