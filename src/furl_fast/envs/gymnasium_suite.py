"""Any Gymnasium env as a task: the "gymnasium" suite takes a Gymnasium id ("CartPole-v1",
"Humanoid-v5", or "module:Id" for an id that a package registers when imported) and makes it with
render_mode="rgb_array" (MuJoCo envs at 256x256, so their VLM frame is 256x256; others at their own
size, e.g. classic control's 600x400: the encoder crops the centred square under crop="clip").

Options: goal_image, an image file: FuRL's goal image (goal_frame); success_key, a key of the env's
info whose truth is info["success"] (without one, success is always False). reward="sparse" is
success - 1 with a success_key and 0.0 without one: no task reward, the VLM reward alone, as VLM-RM
trains CartPole and Humanoid (a constant -1 would reward ending a CartPole episode early).
reward="dense" is the env's own reward. A Discrete action space (CartPole) becomes Box(-1, 1, (n,)),
the argmax choosing the action (ContinuousActions); float64 observations (MuJoCo) become float32.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from furl_fast.envs.gl import load_triton_before_gl
from furl_fast.envs.suite import Suite
from furl_fast.envs.wrappers import (
    ContinuousActions,
    Float32Observation,
    NoTaskReward,
    SparseSuccessReward,
    Wrapper,
)

# The suite renders offscreen only ("rgb_array"): pygame's (SDL's) dummy video driver, unless the user
# chose one, spares the failed look for a display and its "XDG_RUNTIME_DIR is invalid" line.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

MUJOCO_FRAME_SIZE = 256


def _spec(task: str) -> gym.envs.registration.EnvSpec:
    """The registry entry of "Id" or "module:Id" (importing the module first, as gymnasium.make does);
    ValueError when there is none."""
    module, _, env_id = task.rpartition(":") if isinstance(task, str) else ("", "", task)
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"Gymnasium id {task!r}: cannot import {module!r} ({exc}).") from None
    try:
        return gym.spec(env_id)
    except (gym.error.Error, TypeError) as exc:
        raise ValueError(f"task={task!r} is unknown to Gymnasium ({exc}).") from None


def _is_mujoco(spec: gym.envs.registration.EnvSpec) -> bool:
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    creator = spec.entry_point
    if isinstance(creator, str):
        creator = gym.envs.registration.load_env_creator(creator)
    return isinstance(creator, type) and issubclass(creator, MujocoEnv)


class GymnasiumTask(Wrapper):
    """A Gymnasium env under the suite contract: info["success"] is bool(info[success_key]) (False
    without a success_key, and on a reset whose info lacks the key: nothing has happened yet),
    info["state"] is the observation; the first reset without a seed uses `seed`.

    frame_shape: render()'s frame shape, (H, W, 3); None probes it with one render (after a reset
    with `seed`, repeated by the first real reset, so the episode is the same).
    """

    def __init__(self, env: gym.Env, *, seed: int, success_key: str | None,
                 frame_shape: tuple[int, int, int] | None) -> None:
        super().__init__(env)
        self.success_key = success_key
        self._seed: int | None = seed
        self._frame_shape = frame_shape
        self.action_space.seed(seed)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        if self._frame_shape is None:
            if self._seed is not None:  # not reset yet: rendering needs a state
                self.env.reset(seed=self._seed)
            self._frame_shape = tuple(np.shape(self.env.render()))
        return self._frame_shape

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed = self._seed
        self._seed = None
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, self._contract_info(obs, info, reset=True)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._contract_info(obs, info, reset=False)

    def render(self) -> np.ndarray:
        frame = self.env.render()
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
                and frame.shape[-1] == 3):
            raise ValueError(f"{self.env.spec.id}: render() must give an (H, W, 3) uint8 RGB frame in "
                             f"render_mode='rgb_array', got {type(frame).__name__} "
                             f"{getattr(frame, 'shape', '')}.")
        return np.ascontiguousarray(frame)  # MuJoCo's comes as a flipped (negative-stride) view

    def _contract_info(self, obs: Any, info: dict[str, Any], *, reset: bool) -> dict[str, Any]:
        info = dict(info)
        key = self.success_key
        if key is not None and key not in info and not reset:
            raise ValueError(f"{self.env.spec.id}: success_key {key!r} is not in the info of its steps "
                             f"(its keys: {', '.join(map(repr, sorted(info))) or 'none'}).")
        info["success"] = key is not None and bool(info.get(key, False))
        info["state"] = obs
        return info


class GymnasiumSuite(Suite):
    """Every registered Gymnasium id (see the module docstring). Options: goal_image, success_key."""

    name = "gymnasium"
    crop = "clip"
    random_goals = False
    options: ClassVar[tuple[str, ...]] = ("goal_image", "success_key")

    def canonical_task(self, task: str) -> str:
        module, _, _ = task.rpartition(":") if isinstance(task, str) else ("", "", "")
        spec = _spec(task)
        return f"{module}:{spec.id}" if module else spec.id

    def short_name(self, task: str) -> str:
        return _spec(task).id.replace("/", "-")

    def max_episode_steps(self, task: str, **options: Any) -> int:
        self.check_options(options)
        steps = _spec(task).max_episode_steps
        if steps is None:
            raise ValueError(f"Gymnasium id {task!r} registers no episode length (max_episode_steps), "
                             "and furl_fast's episodes end by truncation at one; register it with "
                             "gymnasium.register(..., max_episode_steps=N).")
        return steps

    def task_env(self, task: str, *, seed: int, goal: str, fast_render: bool,
                 goal_image: str | os.PathLike | None = None,
                 success_key: str | None = None) -> GymnasiumTask:
        _check_option_types(goal_image, success_key)
        self.max_episode_steps(task)  # refuses ids that never truncate
        spec = _spec(task)
        if _is_mujoco(spec):
            env = gym.make(self.canonical_task(task), render_mode="rgb_array",
                           width=MUJOCO_FRAME_SIZE, height=MUJOCO_FRAME_SIZE)
            if fast_render:  # read when the first render makes the GL context
                env.unwrapped.model.vis.quality.shadowsize = 0
                env.unwrapped.model.vis.quality.offsamples = 0
            load_triton_before_gl()
            frame_shape = (MUJOCO_FRAME_SIZE, MUJOCO_FRAME_SIZE, 3)
        else:
            env = gym.make(self.canonical_task(task), render_mode="rgb_array")
            frame_shape = None
        if isinstance(env.action_space, spaces.Discrete):  # CartPole: the agents act continuously
            env = ContinuousActions(env)
        if not isinstance(env.action_space, spaces.Box):
            raise ValueError(f"Gymnasium id {task!r}: furl_fast's agents need a Box or Discrete action "
                             f"space, it has {env.action_space}.")
        space = env.observation_space
        if not (isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.floating)):
            raise ValueError(f"Gymnasium id {task!r}: furl_fast's state agents need a float Box "
                             f"observation space, it has {space} (use --agent drq for pixels).")
        if space.dtype != np.float32:
            env = Float32Observation(env)
        return GymnasiumTask(env, seed=seed, success_key=success_key, frame_shape=frame_shape)

    def sparse_reward(self, env: gym.Env) -> gym.Env:
        return SparseSuccessReward(env) if env.success_key is not None else NoTaskReward(env)

    def goal_frame(self, task: str, *, seed: int, goal: str = "fixed", fast_render: bool = True,
                   goal_image: str | os.PathLike | None = None,
                   success_key: str | None = None) -> np.ndarray:
        """The goal_image file as (H, W, 3) uint8 RGB (an alpha channel is dropped, grey is repeated)."""
        import imageio.v3 as iio

        _check_option_types(goal_image, success_key)
        if goal_image is None:
            raise ValueError(f"the gymnasium suite has no built-in goal image for {task!r}: set its "
                             "goal_image option (--gym.goal-image FILE) to an image of the solved "
                             "task (FuRL's phase A needs one), or run without phase A "
                             "(--furl.no-phase-a).")
        try:
            image = np.asarray(iio.imread(goal_image))
        except Exception as exc:  # noqa: BLE001  (a missing file, or one no plugin can read)
            raise ValueError(f"goal_image {str(goal_image)!r}: cannot read an image there ({exc}).") \
                from None
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        elif image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"goal_image {str(goal_image)!r}: expected an 8-bit RGB image, got "
                             f"{image.dtype} of shape {image.shape}.")
        return np.ascontiguousarray(image)


def _check_option_types(goal_image: Any, success_key: Any) -> None:
    if goal_image is not None and not isinstance(goal_image, (str, os.PathLike)):
        raise ValueError(f"the gymnasium suite's goal_image must be a file path, got {goal_image!r}.")
    if success_key is not None and not isinstance(success_key, str):
        raise ValueError(f"the gymnasium suite's success_key must be a string (a key of the env's "
                         f"info), got {success_key!r}.")
