"""One Meta-World v3 task as a raw Gymnasium env with FuRL's conventions (../shared/spec/furl.md):
500-step episodes that only truncate, the 39-d state, and the upright 256x256 "corner2" frame the VLM
embeds. Sparse reward, action repeat, pixels and frame stacks are the generic wrappers that
MetaWorldSuite.make_env puts on top (furl_fast.envs.wrappers).

The paper ran Meta-World's v2 tasks; furl_fast uses the v3 tasks of the current release (metaworld 3.x,
gymnasium 1.x API).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from furl_fast.envs.metaworld.rendering import VLM_CAMERA, VLM_FRAME_SIZE, FrameRenderer
from furl_fast.envs.metaworld.tasks import EPISODE_STEPS, canonical_task, metaworld_name
from furl_fast.envs.wrappers import positive_int


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task, raw: build the full env with make_env (furl_fast.envs.metaworld).

    Observation: the 39-d state, float32 (goal xyz zeroed for goal="fixed").
    info["state"]: the 39-d state with the goal xyz always filled in, also when the observation hides
    it (goal="fixed"): reward functions such as the code reward's checker programs may know the goal,
    as Meta-World's own reward does; the policy sees only the observation.
    Reward: Meta-World's own shaped reward (0..10 per simulator step). info["success"] (bool): the
    task's success flag.
    Episodes never terminate; they truncate after max_episode_steps simulator steps.
    render(): the upright (frame_size, frame_size, 3) uint8 frame of `camera`, rendered on each call.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task: str,
        *,
        seed: int,
        goal: Literal["fixed", "random"] = "fixed",
        fast_render: bool = True,
        frame_size: int = VLM_FRAME_SIZE,
        camera: str = VLM_CAMERA,
        max_episode_steps: int = EPISODE_STEPS,
        render_mode: str = "rgb_array",
    ) -> None:
        """Arguments (make_env takes them as the Meta-World suite's options, beside its own):

        task: a plain name ("drawer-open") or "-v3" name; unknown names raise ValueError listing
          all 50.
        seed: for goal="fixed" it picks the one scene (object and goal positions) every reset
          shows, and the goal is hidden from the state; for goal="random" it seeds the sampler
          that draws a new scene on every reset, and the goal xyz is in the state. Scenes are
          drawn by the env's own seeded generator, so a seed's scene is not the one Meta-World's
          "Meta-World/goal_hidden" id (numpy's global RNG) gives for that seed.
        fast_render: no shadows, no multisampling (about 6x faster in software rendering); False
          keeps Meta-World's visuals.
        frame_size, camera: the rendered view (FuRL: 256, "corner2").
        max_episode_steps: simulator steps per episode.
        render_mode: "rgb_array", the one mode (accepted so gymnasium.make can pass it).
        """
        self.task = canonical_task(task)
        if goal not in ("fixed", "random"):
            raise ValueError(f"make_env: 'goal' must be 'fixed' or 'random', got {goal!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"make_env: 'seed' must be an int, got {type(seed).__name__}.")
        self.frame_size = positive_int("frame_size", frame_size)
        self.max_episode_steps = positive_int("max_episode_steps", max_episode_steps)
        if render_mode != "rgb_array":
            raise ValueError(f"make_env: render_mode must be 'rgb_array' (the only one it has: it "
                             f"renders its camera frame), got {render_mode!r}.")
        self.goal, self.fast_render, self.camera, self.render_mode = goal, fast_render, camera, render_mode

        raw = ALL_V3_ENVIRONMENTS[metaworld_name(self.task)]()
        raw.max_path_length = max_episode_steps
        raw._set_task_called = True  # we choose the scene ourselves instead of through Task objects
        raw._partially_observable = goal == "fixed"  # fixed goal: the goal xyz is hidden (zeros)
        raw.__dict__.pop("sawyer_observation_space", None)  # cached with the old observability
        raw.seeded_rand_vec = True  # scenes come from the env's seeded RNG, not numpy's global one
        raw._freeze_rand_vec = False
        raw.seed(int(seed))
        if goal == "fixed":
            raw.reset()  # draw this seed's scene once, then keep it for every reset
            raw._freeze_rand_vec = True
        self._raw = raw
        self._renderer: FrameRenderer | None = None

        self.observation_space = _state_space(raw)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self._steps: int | None = None  # simulator steps this episode; None before the first reset

    # --- public helpers -------------------------------------------------------------------------
    @property
    def goal_position(self) -> np.ndarray:
        """The goal xyz of the current scene (3,) float64, even when hidden from the state."""
        return np.array(self._raw._get_pos_goal(), dtype=np.float64)

    @property
    def elapsed_steps(self) -> int:
        """Simulator steps taken in this episode."""
        return self._steps or 0

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """The shape of render()'s frames."""
        return (self.frame_size, self.frame_size, 3)

    # --- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """seed re-seeds the scene sampler for goal="random"; a fixed-goal env keeps its scene (chosen
        by make_env's seed) on every reset, like its task."""
        super().reset(seed=seed)
        if seed is not None:
            self._raw.seed(int(seed))
            self.action_space.seed(int(seed))
        state, _ = self._raw.reset()
        self._steps = 0
        state = self._to_state(state)
        return state, self._info(False, state)

    def step(self, action: np.ndarray):
        if self._steps is None:
            raise RuntimeError("MetaWorldEnv.step: call reset() before the first step().")
        if self._steps >= self.max_episode_steps:
            raise RuntimeError("MetaWorldEnv.step: the episode was truncated; call reset() first.")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (4,):
            raise ValueError(f"MetaWorldEnv.step: 'action' must have shape (4,), got {action.shape}.")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"MetaWorldEnv.step: 'action' must be finite, got {action}.")
        state, reward, _, _, raw_info = self._raw.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        state = self._to_state(state)
        truncated = self._steps >= self.max_episode_steps
        return state, float(reward), False, truncated, self._info(bool(raw_info["success"]), state)

    def render(self) -> np.ndarray:
        """The upright frame of the current scene, (frame_size, frame_size, 3) uint8."""
        if self._renderer is None:  # lazily: a GL context per process, made where the env steps
            self._renderer = FrameRenderer(self._raw.model, self._raw.data, camera=self.camera,
                                           size=self.frame_size, fast=self.fast_render)
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._raw.close()

    # --- internals ------------------------------------------------------------------------------
    def _to_state(self, state: np.ndarray) -> np.ndarray:
        # Meta-World clips step() states to its bounds but not reset() ones; clip both alike.
        return np.clip(state, self.observation_space.low, self.observation_space.high).astype(np.float32)

    def _info(self, success: bool, state: np.ndarray) -> dict[str, Any]:
        full = state.copy()
        full[-3:] = self._raw._get_pos_goal()  # zeros in a fixed-goal observation
        return {"success": success, "state": full}


def _state_space(raw) -> spaces.Box:
    """The 39-d state's bounds, float32: Meta-World's own (hand xyz, gripper, goal) plus those it
    leaves at +-inf although they are bounded. The state holds, twice (now and the previous step),
    hand xyz, gripper opening and 14 object slots: per object its xyz (unbounded: objects can be
    pushed anywhere) and a unit quaternion (each component in [-1, 1]); the slots past the task's
    objects are always 0."""
    sawyer = raw.sawyer_observation_space
    low, high = sawyer.low.astype(np.float32), sawyer.high.astype(np.float32)
    objects = len(raw._get_pos_objects()) // 3
    slots = raw._obs_obj_max_len
    obj_low = np.zeros(slots, np.float32)
    obj_high = np.zeros(slots, np.float32)
    for k in range(objects):
        obj_low[7 * k : 7 * k + 3], obj_high[7 * k : 7 * k + 3] = -np.inf, np.inf
        obj_low[7 * k + 3 : 7 * k + 7], obj_high[7 * k + 3 : 7 * k + 7] = -1.0, 1.0
    for start in (4, 4 + slots + 4):  # after hand xyz + gripper, in both halves
        low[start : start + slots], high[start : start + slots] = obj_low, obj_high
    return spaces.Box(low, high, dtype=np.float32)
