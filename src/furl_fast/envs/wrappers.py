"""The small Gymnasium wrappers every suite's env is built from (Suite.make_env stacks them):

    env = suite.task_env(task, ...)           # the raw task: info["success"], info["state"], render()
    env = SparseSuccessReward(env)            # reward="sparse": success - 1 per simulator step
    env = ActionRepeat(env, action_repeat)    # rewards summed, success if any step had it
    env = VLMFrame(env, in_info=vlm_frames)   # one render per agent step, info["vlm_frame"]
    env = PixelObservation(env, pixel_size)   # obs="pixels": (3, P, P) uint8 of that same render
    env = FrameStack(env, frame_stack)        #   ... the last k of them, (3k, P, P)

FrameInObservation (vector envs) moves the VLM frame from the info into the observation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def positive_int(name: str, value: Any) -> int:
    """value as an int; ValueError naming the make_env argument unless it is a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"make_env: {name!r} must be a positive int, got {value!r}.")
    return int(value)


class Wrapper(gym.Wrapper):
    """A gym.Wrapper whose attribute reads fall through to the env it wraps, so that a whole stack
    answers what its layers know (env.action_repeat, env.task, env.goal_position), as DrQ-v2's
    wrappers do. Gymnasium's own wrappers do not: through those, use env.get_wrapper_attr(name)."""

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails. Private names and a half-built (unpickled) wrapper
        # stop here instead of recursing.
        if name.startswith("_") or "env" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.env, name)


class ActionRepeat(Wrapper):
    """Each action is applied `action_repeat` times (fewer when the episode ends first): the rewards
    are summed (dense or sparse, as DrQ-v2's action repeat sums them), info["success"] is whether
    any of the steps succeeded, info["env_reward"] the sum of the env's own rewards (see
    SparseSuccessReward), the observation and the rest of the info are those of the last step."""

    def __init__(self, env: gym.Env, action_repeat: int) -> None:
        super().__init__(env)
        self.action_repeat = positive_int("action_repeat", action_repeat)

    def step(self, action):
        total, env_total, success = 0.0, 0.0, False
        for _ in range(self.action_repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            env_total += float(info.get("env_reward", reward))
            success = success or bool(info["success"])
            if terminated or truncated:
                break
        info = {**info, "success": success, "env_reward": env_total}
        return obs, total, terminated, truncated, info


class VLMFrame(Wrapper):
    """Renders at most once per agent step: render() returns the frame of the current step, (H, W, 3)
    uint8, rendering it on the first call only.

    in_info=True renders after every reset and step and hands the frame over as info["vlm_frame"]
    (what VLM rewards read); render() then returns that same array. in_info=False renders only when
    asked (pixel observations, videos).
    """

    def __init__(self, env: gym.Env, *, in_info: bool) -> None:
        super().__init__(env)
        self.in_info = bool(in_info)
        self._frame: np.ndarray | None = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._frame = None
        return obs, self._with_frame(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._frame = None
        return obs, reward, terminated, truncated, self._with_frame(info)

    def render(self) -> np.ndarray:
        if self._frame is None:
            self._frame = self.env.render()
        return self._frame

    def _with_frame(self, info: dict[str, Any]) -> dict[str, Any]:
        if self.in_info:
            info["vlm_frame"] = self.render()
        return info


class PixelObservation(Wrapper):
    """The observation becomes (3, size, size) uint8, channel-first RGB: the whole frame of
    env.render() resized (antialiased bilinear; a non-square frame is squeezed to the square).

    Wrap a VLMFrame, so that the pixels and the VLM frame come from one render. The fused op yields
    floats, so it runs with mean 0 and std 1/255 (output = the resized pixel value in [0, 255]) and the
    result is rounded back to uint8 (within 1 LSB of the exact resize). Single-threaded: env workers
    are the parallelism.
    """

    def __init__(self, env: gym.Env, size: int) -> None:
        super().__init__(env)
        self.pixel_size = positive_int("pixel_size", size)
        self.observation_space = spaces.Box(0, 255, (3, self.pixel_size, self.pixel_size), np.uint8)

    def reset(self, **kwargs):
        _, info = self.env.reset(**kwargs)
        return self._pixels(), info

    def step(self, action):
        _, reward, terminated, truncated, info = self.env.step(action)
        return self._pixels(), reward, terminated, truncated, info

    def _pixels(self) -> np.ndarray:
        import torch

        from furl_fast.ops import preprocess_frames

        frame = torch.from_numpy(self.env.render())[None]
        x = preprocess_frames(frame, size=self.pixel_size, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3,
                              num_threads=1)
        return x[0].round_().clamp_(0, 255).to(torch.uint8).numpy()


class FrameStack(Wrapper):
    """The last `frame_stack` observations concatenated along the first (channel) axis, oldest first;
    a reset fills the stack with the reset observation (DrQ's input)."""

    def __init__(self, env: gym.Env, frame_stack: int) -> None:
        super().__init__(env)
        self.frame_stack = positive_int("frame_stack", frame_stack)
        space = env.observation_space
        self.observation_space = spaces.Box(np.concatenate([space.low] * self.frame_stack),
                                            np.concatenate([space.high] * self.frame_stack),
                                            dtype=space.dtype)
        self._stack: list[np.ndarray] = []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._stack = [obs] * self.frame_stack
        return np.concatenate(self._stack, axis=0), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._stack = [*self._stack[1:], obs]
        return np.concatenate(self._stack, axis=0), reward, terminated, truncated, info


class SparseSuccessReward(Wrapper):
    """reward = info["success"] - 1: -1.0 until the task is solved, 0.0 while it is (FuRL's sparse
    reward). It wraps the raw task, so under action repeat the agent step's reward is the sum over
    its simulator steps, like the dense reward's. The env's own reward stays in
    info["env_reward"]."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float(info["success"]) - 1.0, terminated, truncated, \
            {**info, "env_reward": float(reward)}


class NoTaskReward(Wrapper):
    """reward = 0.0: no task reward at all, so that a VLM reward added on top is the only signal (as
    VLM-RM trains CartPole and Humanoid). The env's own reward stays in info["env_reward"]."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, 0.0, terminated, truncated, {**info, "env_reward": float(reward)}


class FrameInObservation(Wrapper):
    """Moves info["vlm_frame"] into the observation: {"obs": the env's observation, "frame": (H, W, 3)
    uint8}. In a vector env the frames then travel through shared memory instead of pickled infos.
    The frame shape comes from the raw task's `frame_shape`."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = spaces.Dict({
            "obs": env.observation_space,
            "frame": spaces.Box(0, 255, tuple(env.get_wrapper_attr("frame_shape")), dtype=np.uint8),
        })

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return {"obs": obs, "frame": info.pop("vlm_frame")}, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return {"obs": obs, "frame": info.pop("vlm_frame")}, reward, terminated, truncated, info


class ContinuousActions(Wrapper):
    """A Discrete(n) action space as Box(-1, 1, (n,)) for the continuous-control agents: the action
    taken is the argmax of the n scores (ties: the first). The agent learns one score per action."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if not isinstance(env.action_space, spaces.Discrete):
            raise ValueError(f"ContinuousActions wraps a Discrete action space, got {env.action_space}.")
        self._start = int(env.action_space.start)
        self.action_space = spaces.Box(-1.0, 1.0, (int(env.action_space.n),), dtype=np.float32)

    def step(self, action):
        scores = np.asarray(action, dtype=np.float32).reshape(-1)
        if scores.shape != self.action_space.shape:
            raise ValueError(f"ContinuousActions: the action must have shape {self.action_space.shape}, "
                             f"got {np.shape(action)}.")
        return self.env.step(self._start + int(np.argmax(scores)))


class Float32Observation(Wrapper):
    """Box observations of another float dtype (MuJoCo's float64) as float32, the agents' dtype."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        self.observation_space = spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32),
                                            space.shape, dtype=np.float32)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return np.asarray(obs, np.float32), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return np.asarray(obs, np.float32), reward, terminated, truncated, info
