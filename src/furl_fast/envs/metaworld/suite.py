"""The Meta-World suite: the 50 v3 tasks with FuRL's conventions (sparse reward, fixed or random
goals, the corner2 frame and FuRL's crop of it, MT10 prompts, the scripted expert's goal image,
reference code-reward programs)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import gymnasium as gym
import numpy as np

from furl_fast.envs.metaworld.env import MetaWorldEnv
from furl_fast.envs.metaworld.prompts import MT10_PROMPTS
from furl_fast.envs.metaworld.rendering import furl_crop, holds_gl_context
from furl_fast.envs.metaworld.tasks import EPISODE_STEPS, TASKS, canonical_task, metaworld_name
from furl_fast.envs.suite import Suite
from furl_fast.envs.wrappers import positive_int

if TYPE_CHECKING:
    from furl_fast.rewards.code.program_set import ProgramSet


class MetaWorldSuite(Suite):
    """Meta-World v3 (furl_fast.envs.metaworld). Options: frame_size (256), camera ("corner2"),
    max_episode_steps (500), render_mode ("rgb_array", the one mode); see MetaWorldEnv."""

    name = "metaworld"
    crop = staticmethod(furl_crop)
    random_goals = True
    options: ClassVar[tuple[str, ...]] = ("frame_size", "camera", "max_episode_steps", "render_mode")

    def canonical_task(self, task: str) -> str:
        return canonical_task(task)

    def task_names(self) -> list[str]:
        return list(TASKS)

    def max_episode_steps(self, task: str, **options: Any) -> int:
        canonical_task(task)
        self.check_options(options)
        return positive_int("max_episode_steps", options.get("max_episode_steps", EPISODE_STEPS))

    def task_env(self, task: str, *, seed: int, goal: str, fast_render: bool,
                 **options: Any) -> MetaWorldEnv:
        return MetaWorldEnv(task, seed=seed, goal=goal, fast_render=fast_render, **options)

    def prompt(self, task: str) -> str | None:
        return MT10_PROMPTS.get(canonical_task(task))

    def goal_frame(self, task: str, *, seed: int, goal: str = "fixed", fast_render: bool = True,
                   **options: Any) -> np.ndarray:
        """The scripted expert's first success frame in make_env(task, seed=seed, goal=goal,
        fast_render=fast_render, **options): the same scene, render settings and frame size as
        training."""
        from furl_fast.envs.metaworld import rollout

        self.check_options(options)
        episode = rollout.expert_rollout(task, seed, goal=goal, stop_on_success=True,
                                         fast_render=fast_render, **options)
        index = episode.first_success()
        if index is None:
            raise ValueError(f"the scripted expert did not solve {task} with seed {seed}, so FuRL has "
                             "no goal image; try another seed.")
        return episode.frames[index]

    def reference_programs(self, task: str) -> ProgramSet | None:
        from furl_fast.envs.metaworld.programs import REFERENCE_PROGRAM_SETS

        return REFERENCE_PROGRAM_SETS.get(metaworld_name(task))

    def rollout(self, task: str, seed: int, policy: Literal["expert", "random"], *, goal: str,
                max_steps: int, render: bool, fast_render: bool = True, **options: Any):
        from furl_fast.envs.metaworld import rollout

        self.check_options(options)
        run = {"expert": rollout.expert_rollout, "random": rollout.random_rollout}[policy]
        episode = run(task, seed, goal=goal, max_steps=max_steps, render=render,
                      fast_render=fast_render, **options)
        # Programs read info["state"] in training (the goal filled in), not the observation.
        return dataclasses.replace(episode, states=episode.env_states)

    def negative_prompts(self, task: str) -> list[str]:
        """The other MT10 tasks' prompts."""
        own = MT10_PROMPTS.get(canonical_task(task))
        return [p for p in MT10_PROMPTS.values() if p != own]

    def worker_seed(self, seed: int, index: int, goal: str) -> int:
        # A fixed goal: every worker shows the one scene of `seed` (one task, one goal image).
        return seed if goal == "fixed" else seed + index

    def make_vector_env(self, task: str, num_envs: int, *, seed: int,
                        goal: Literal["fixed", "random"] = "fixed",
                        context: str | None = "forkserver", **kwargs: Any) -> gym.vector.VectorEnv:
        """Suite.make_vector_env; goal="random": worker i draws its scenes from seed + i (reset(seed=s)
        re-seeds them from s + i)."""
        if context == "fork" and holds_gl_context():
            raise RuntimeError("make_vector_env: context='fork' after this process made a GL context "
                               "(a rendered env) makes the workers hang; use 'forkserver' or 'spawn'.")
        return super().make_vector_env(task, num_envs, seed=seed, goal=goal, context=context, **kwargs)


_SUITE = MetaWorldSuite()
make_env = _SUITE.make_env
make_vector_env = _SUITE.make_vector_env
