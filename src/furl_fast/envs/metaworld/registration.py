"""The 50 tasks as Gymnasium ids: `gymnasium.make("furl_fast/drawer-open", seed=0, goal="random")`.

Registered when furl_fast.envs is imported; `gymnasium.make("furl_fast.envs:furl_fast/reach")` imports
it on the way. Keyword arguments go to the Meta-World suite's make_env; seed defaults to 0 here, so
the env checker and wrappers that rebuild an env from its spec get the same scene. Episodes truncate
by themselves after 500 simulator steps, so no TimeLimit wrapper is added (spec.max_episode_steps is
None).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from furl_fast.envs.metaworld.suite import make_env
from furl_fast.envs.metaworld.tasks import TASKS

NAMESPACE = "furl_fast"


def make_registered(task: str, seed: int = 0, **options: Any) -> gym.Env:
    """The entry point of every registered id: make_env(task, seed=seed, **options)."""
    return make_env(task, seed=seed, **options)


def register_envs() -> None:
    """Registers furl_fast/<task> for every task (again: a no-op)."""
    for task in TASKS:
        env_id = f"{NAMESPACE}/{task}"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=make_registered, kwargs={"task": task})
