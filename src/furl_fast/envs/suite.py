"""Environment suites: a family of tasks behind one interface, so that the trainer runs any of them.

The env contract. suite.make_env(task, ...) returns a Gymnasium env whose
- info["success"] is a bool on every reset and step: whether the task's success flag held after any
  of the step's repeated actions (False where the suite has no notion of success);
- info["vlm_frame"] is the (H, W, 3) uint8 upright RGB frame of the step, rendered once per agent step,
  when vlm_frames=True (render() returns the same array; without vlm_frames it renders on demand);
- info["state"] is the full state the code reward's programs read: Meta-World's 39-d state with the
  goal xyz filled in (also when the observation hides it); the observation for other suites;
- episodes truncate after max_episode_steps(task) simulator steps (max_episode_steps // action_repeat
  agent steps); Meta-World's never terminate, other suites' may;
- reward="sparse" is success - 1 (a suite without success gives 0.0: the VLM reward alone);
  reward="dense" is the task's own reward; both per simulator step, summed over the repeated
  actions (with action repeat 2 the sparse reward of an agent step is -2, -1 or 0).
FuRL's phase A also needs a goal image: suite.goal_frame(task, ...) (Meta-World: the scripted expert's
first success frame; Gymnasium: an image file the user names).

Adding a suite: subclass Suite, fill in the hooks marked "a suite defines" (canonical_task,
max_episode_steps, task_env and, where the suite has them, task_names, prompt, goal_frame,
reference_programs, negative_prompts, crop, random_goals, options), and add one line to SUITES in
envs/registry.py.
task_env returns the raw task (info["success"], info["state"], render() in "rgb_array" mode, its own
truncation, and a `frame_shape` attribute (H, W, 3)); make_env stacks the wrappers of envs/wrappers.py
on it, the same for every suite.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import gymnasium as gym
import numpy as np

from furl_fast.envs.wrappers import (
    ActionRepeat,
    FrameInObservation,
    FrameStack,
    PixelObservation,
    SparseSuccessReward,
    VLMFrame,
    positive_int,
)

if TYPE_CHECKING:
    from furl_fast.rewards.code.program_set import ProgramSet

CropBox = Callable[[int, int], tuple[int, int, int, int]]
"""(frame height, frame width) -> the crop box (top, left, height, width) the VLM sees."""


def did_you_mean(name: str, known: Collection[str]) -> str:
    """" (did you mean 'x'?)" for the closest of `known`, or ""."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Suite:
    """A family of tasks (Meta-World, any Gymnasium id, ...) and what the trainer needs to know about
    them; see the module docstring for the env contract. Suites hold no state: one instance serves
    every task and process."""

    name: ClassVar[str]
    """The registry name (SUITES)."""
    crop: ClassVar[str | CropBox] = "clip"
    """What the VLM encoder crops (load_encoder's crop): "clip", open_clip's centred square, or a
    crop-box function (Meta-World: FuRL's box)."""
    random_goals: ClassVar[bool] = False
    """Whether goal="random" means something here (a new scene and goal on every reset)."""
    options: ClassVar[tuple[str, ...]] = ()
    """The suite's own keyword options of make_env, goal_frame and max_episode_steps."""

    # --- a suite defines ---------------------------------------------------------------------------
    def canonical_task(self, task: str) -> str:
        """The suite's one name for `task`; ValueError (with the closest known name) if unknown."""
        raise NotImplementedError

    def task_names(self) -> list[str] | None:
        """Every task, or None for an open-ended suite."""
        return None

    def max_episode_steps(self, task: str, **options: Any) -> int:
        """Simulator steps per episode (the episode truncates there)."""
        raise NotImplementedError

    def task_env(self, task: str, *, seed: int, goal: str, fast_render: bool, **options: Any) -> gym.Env:
        """The raw task (see the module docstring): its reward is the dense one, per simulator step."""
        raise NotImplementedError

    def prompt(self, task: str) -> str | None:
        """The built-in text goal for the VLM, or None: the user must give one."""
        return None

    def goal_frame(self, task: str, *, seed: int, goal: str = "fixed", fast_render: bool = True,
                   **options: Any) -> np.ndarray:
        """FuRL's goal image, (H, W, 3) uint8; ValueError saying what to give when there is none."""
        raise ValueError(f"the {self.name} suite has no goal image for {task!r}.")

    def reference_programs(self, task: str) -> ProgramSet | None:
        """A hand-written reference program set for the code reward of `task`, or None."""
        return None

    def rollout(self, task: str, seed: int, policy: Literal["expert", "random"], *, goal: str,
                max_steps: int, render: bool, fast_render: bool = True, **options: Any):
        """One episode of the suite's scripted expert or of uniform random actions, with states
        (T + 1, S) and frames (T + 1, H, W, 3) uint8 or None (render=False), as code-reward
        programs see them; the code reward verifies program sets on these. ValueError where the
        suite has no scripted expert."""
        raise ValueError(f"the {self.name} suite has no scripted expert to verify code-reward "
                         "programs on")

    def negative_prompts(self, task: str) -> list[str] | None:
        """Texts of other goals in the same scenes (the binary reward's default negatives), or None:
        the user must give them."""
        return None

    def short_name(self, task: str) -> str:
        """The task's name for run directories (no path separators)."""
        return self.canonical_task(task).replace("/", "-").replace(":", "-")

    def sparse_reward(self, env: gym.Env) -> gym.Env:
        """reward="sparse" on the raw task: success - 1 per simulator step."""
        return SparseSuccessReward(env)

    def worker_seed(self, seed: int, index: int, goal: str) -> int:
        """The construction seed of vector env worker `index`."""
        return seed + index

    # --- the same for every suite ------------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"the {self.name} suite has no option {', '.join(map(repr, unknown))} "
                             f"(its options: {known}).")

    def make_env(
        self,
        task: str,
        *,
        seed: int,
        goal: Literal["fixed", "random"] = "fixed",
        obs: Literal["state", "pixels"] = "state",
        pixel_size: int = 84,
        frame_stack: int = 3,
        action_repeat: int | None = None,
        vlm_frames: bool = True,
        reward: Literal["sparse", "dense"] = "sparse",
        fast_render: bool = True,
        **options: Any,
    ) -> gym.Env:
        """The task as a Gymnasium env under the contract of the module docstring.

        seed: an int; it seeds the task's scenes (Meta-World goal="fixed": picks the one scene).
        goal: "fixed" or, where the suite has it (random_goals), "random": a new goal every reset.
        obs: "state" (the task's observation) or "pixels" (DrQ: (3 * frame_stack, pixel_size,
          pixel_size) uint8 channel-first, oldest frame first: the VLM frame of the same render,
          resized).
        action_repeat: simulator steps per agent step; default 2 for pixels, 1 for state.
        vlm_frames: info["vlm_frame"] on every reset and step.
        reward: "sparse" (success - 1) or "dense" (the task's own reward); either summed over the
          repeats.
        fast_render: no shadows, no multisampling (about 6x faster in software rendering, MuJoCo).
        options: the suite's own (Suite.options).
        """
        if goal not in ("fixed", "random"):
            raise ValueError(f"make_env: 'goal' must be 'fixed' or 'random', got {goal!r}.")
        if goal == "random" and not self.random_goals:
            raise ValueError(f"make_env: the {self.name} suite has no goal randomisation, so "
                             "goal='random' means nothing here; use goal='fixed'.")
        if obs not in ("state", "pixels"):
            raise ValueError(f"make_env: 'obs' must be 'state' or 'pixels', got {obs!r}.")
        if reward not in ("sparse", "dense"):
            raise ValueError(f"make_env: 'reward' must be 'sparse' or 'dense', got {reward!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"make_env: 'seed' must be an int, got {type(seed).__name__}.")
        action_repeat = (2 if obs == "pixels" else 1) if action_repeat is None else action_repeat
        for name, value in (("pixel_size", pixel_size), ("frame_stack", frame_stack),
                            ("action_repeat", action_repeat)):
            positive_int(name, value)
        self.check_options(options)

        env = self.task_env(task, seed=int(seed), goal=goal, fast_render=fast_render, **options)
        if reward == "sparse":
            env = self.sparse_reward(env)
        env = ActionRepeat(env, action_repeat)
        env = VLMFrame(env, in_info=vlm_frames)
        if obs == "pixels":
            env = FrameStack(PixelObservation(env, pixel_size), frame_stack)
        return env

    def make_vector_env(
        self,
        task: str,
        num_envs: int,
        *,
        seed: int,
        goal: Literal["fixed", "random"] = "fixed",
        asynchronous: bool = True,
        autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
        context: str | None = "forkserver",
        **env_kwargs: Any,
    ) -> gym.vector.VectorEnv:
        """num_envs copies of make_env(task, goal=goal, **env_kwargs), one per worker process
        (asynchronous=False: all in this process, gymnasium's SyncVectorEnv; same observations).

        Observations are batched: with vlm_frames=True (the default) a dict {"obs": (N, *obs_shape),
        "frame": (N, H, W, 3) uint8}, else the plain (N, *obs_shape) array; info["success"] is (N,)
        bool. Worker i is built with worker_seed(seed, i, goal) (Meta-World goal="fixed": all with
        `seed`, the one scene; otherwise seed + i).
        context: the multiprocessing start method. "forkserver" starts workers from a clean process:
        forked workers hang on their first render when the caller already made a GL context (seen with
        EGL + llvmpipe), and CUDA state does not survive fork either. Like "spawn", it re-imports the
        main module in the workers, so scripts need the `if __name__ == "__main__":` guard.
        autoreset_mode: gymnasium's (NEXT_STEP: the step after an episode ends returns the reset
        observation, with reward 0).
        """
        task = self.canonical_task(task)  # fail here, not in N workers
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"make_vector_env: 'num_envs' must be a positive int, got {num_envs!r}.")
        fns = [partial(_worker_env, self, task, self.worker_seed(seed, i, goal),
                       dict(env_kwargs, goal=goal)) for i in range(num_envs)]
        if not asynchronous:
            return gym.vector.SyncVectorEnv(fns, autoreset_mode=autoreset_mode)
        return gym.vector.AsyncVectorEnv(fns, context=context, autoreset_mode=autoreset_mode)


def _worker_env(suite: Suite, task: str, seed: int, env_kwargs: dict[str, Any]) -> gym.Env:
    env = suite.make_env(task, seed=seed, **env_kwargs)
    return FrameInObservation(env) if env_kwargs.get("vlm_frames", True) else env
