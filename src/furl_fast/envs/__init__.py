"""Environments for VLM-reward RL, as suites behind one interface (envs.suite: the env contract):
"metaworld" (envs.metaworld: FuRL's Meta-World v3 tasks, experts, prompts, programs, Gymnasium ids
furl_fast/<task>) and "gymnasium" (any Gymnasium id), built from the small wrappers of envs.wrappers.
get_suite(name) gives one. TASKS, make_env, make_vector_env and the rollouts exported here are the
Meta-World suite's (furl_fast.envs.metaworld has them all).

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
from furl_fast.envs.metaworld import (
    TASKS,
    Rollout,
    expert_policy,
    expert_rollout,
    make_env,
    make_vector_env,
    random_rollout,
    register_envs,
)
from furl_fast.envs.registry import SUITES, get_suite
from furl_fast.envs.suite import Suite

register_envs()  # gymnasium.make("furl_fast/<task>")

__all__ = [
    "SUITES",
    "TASKS",
    "Rollout",
    "Suite",
    "expert_policy",
    "expert_rollout",
    "get_suite",
    "make_env",
    "make_vector_env",
    "random_rollout",
]
