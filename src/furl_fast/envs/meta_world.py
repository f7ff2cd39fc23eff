"""Meta-World v3 tasks as Gymnasium environments with FuRL's conventions (../shared/spec/furl.md):
sparse reward success - 1, 500-step episodes that only truncate, and the upright 256x256 "corner2"
frame the VLM embeds, rendered once per step.

The paper ran Meta-World's v2 tasks; furl_fast uses the v3 tasks of the current release (metaworld 3.x,
gymnasium 1.x API) under their plain names ("drawer-open" for "drawer-open-v3").
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections import deque
from typing import Any, ClassVar, Literal

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco's first import; see furl_fast/envs/__init__.py

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from furl_fast.config import describe_unknown_task

TASKS: tuple[str, ...] = tuple(sorted(name.removesuffix("-v3") for name in ALL_V3_ENVIRONMENTS))
"""The 50 Meta-World v3 task names, without the "-v3" suffix."""

MT10_TASKS: tuple[str, ...] = (
    "reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
    "button-press-topdown", "peg-insert-side", "window-open", "window-close",
)
"""The ten MT10 tasks FuRL reports on."""

EPISODE_STEPS = 500  # Meta-World's max_path_length; FuRL's episodes only truncate, at this length.
VLM_CAMERA = "corner2"  # FuRL's camera (Meta-World camera id 2)
VLM_FRAME_SIZE = 256  # FuRL renders 256x256 and crops 32:224 before the VLM


def resolve_task(task: str) -> str:
    """The plain task name ("drawer-open") for a plain or "-v3" name; ValueError listing all otherwise."""
    name = task.removesuffix("-v3") if isinstance(task, str) else task
    if name not in TASKS:
        raise ValueError(f"Unknown Meta-World task {task!r}{describe_unknown_task(str(task), TASKS)}")
    return name


_LIVE_RENDERERS: weakref.WeakSet[FrameRenderer] = weakref.WeakSet()


def _close_live_renderers() -> None:
    # GL contexts freed during interpreter teardown raise noisy EGL errors; free them first.
    for renderer in list(_LIVE_RENDERERS):
        renderer.close()


class FrameRenderer:
    """Renders one camera of a MuJoCo model into upright (H, W, 3) uint8 frames.

    fast=True turns off shadows (shadow map size 0 and the scene's shadow flag) and multisampling
    (offsamples 0): about 6x faster under software rendering (llvmpipe), at the cost of hard edges
    and no cast shadows. fast=False keeps Meta-World's visuals (4096 shadow map, 4x MSAA).
    """

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, *, camera: str, size: int,
                 fast: bool) -> None:
        if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
            raise ValueError(f"FrameRenderer: the model has no camera named {camera!r}.")
        # The GL context reads these when it is made, so they must be set before the Renderer exists.
        if fast:
            model.vis.quality.shadowsize = 0
            model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        self._data = data
        self._camera = camera
        # Software rendering (Mesa's llvmpipe) brings libLLVM into the process's global symbol
        # scope with the first GL context. Triton, which torch._dynamo imports (and through it
        # torchvision, so open_clip), links its own LLVM statically: loaded after that, its static
        # initialisers bind to Mesa's LLVM and the process dies with a segfault. Loaded first, it
        # keeps its LLVM to itself.
        try:
            import triton  # noqa: F401
        except ImportError:  # torch builds without triton (CPU-only wheels) are not affected
            pass
        try:
            self._renderer = mujoco.Renderer(model, size, size)
        except Exception as exc:
            raise RuntimeError(
                f"FrameRenderer: MuJoCo could not make an offscreen GL context ({exc}). Headless "
                "machines need MUJOCO_GL=egl (set by furl_fast.envs when it is imported before mujoco) "
                "and EGL: on Debian/Ubuntu `apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri "
                "libgbm1`."
            ) from exc
        if fast:
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._raw = np.empty((size, size, 3), dtype=np.uint8)
        if not _LIVE_RENDERERS:
            # Registered after mujoco.egl's own exit hook (made with the first context), so it runs
            # before that hook terminates the EGL display.
            atexit.unregister(_close_live_renderers)
            atexit.register(_close_live_renderers)
        _LIVE_RENDERERS.add(self)

    def render(self) -> np.ndarray:
        """The current scene as a new (size, size, 3) uint8 array, top row first."""
        self._renderer.update_scene(self._data, camera=self._camera)
        self._renderer.render(out=self._raw)
        return self._raw[::-1].copy()  # OpenGL reads bottom-up: flip to the upright image

    def close(self) -> None:
        self._renderer.close()
        _LIVE_RENDERERS.discard(self)


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task with FuRL's conventions. Build it with make_env().

    Observations: obs="state" gives the 39-d state, float32 (goal xyz zeroed for goal="fixed");
    obs="pixels" gives (3 * frame_stack, pixel_size, pixel_size) uint8 channel-first RGB frames, stacked
    oldest first (DrQ's input).
    info["state"]: the 39-d state with the goal xyz always filled in, also when the observation hides
    it (goal="fixed"): reward functions such as the code reward's checker programs may know the goal,
    as Meta-World's own reward does; the policy sees only the observation.
    Reward: reward="sparse" (FuRL's setting) gives success - 1 (-1.0 or 0.0) after the last repeated
    action; reward="dense" gives Meta-World's own shaped reward (0..10 per simulator step), summed over
    the repeated actions: the "ground-truth reward" upper bound of VLM-reward papers. info["success"]
    (bool) is the success flag after the last repeated action in both cases.
    Episodes never terminate; they truncate after 500 simulator steps (500 / action_repeat agent steps).
    info["vlm_frame"]: the upright (frame_size, frame_size, 3) uint8 camera frame after the step, on reset
    and every step when vlm_frames=True; render() returns the same array without rendering again.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task: str,
        *,
        seed: int,
        goal: Literal["fixed", "random"] = "fixed",
        obs: Literal["state", "pixels"] = "state",
        reward: Literal["sparse", "dense"] = "sparse",
        fast_render: bool = True,
        vlm_frames: bool = True,
        frame_size: int = VLM_FRAME_SIZE,
        camera: str = VLM_CAMERA,
        pixel_size: int = 84,
        frame_stack: int = 3,
        action_repeat: int | None = None,
        max_episode_steps: int = EPISODE_STEPS,
        render_mode: str = "rgb_array",
    ) -> None:
        """Arguments (build it with make_env(task, **these)):

        task: a plain name ("drawer-open") or "-v3" name; unknown names raise ValueError listing
          all 50.
        seed: for goal="fixed" it picks the one scene (object and goal positions) every reset
          shows, and the goal is hidden from the state; for goal="random" it seeds the sampler
          that draws a new scene on every reset, and the goal xyz is in the state. Scenes are
          drawn by the env's own seeded generator, so a seed's scene is not the one Meta-World's
          "Meta-World/goal_hidden" id (numpy's global RNG) gives for that seed.
        obs: "state" (39-d float32) or "pixels" (DrQ: (3 * frame_stack, pixel_size, pixel_size)
          uint8, action_repeat 2 by default; 1 for state). The pixels are the whole VLM frame of
          the same render resized (antialiased bilinear, fused op, rounded to uint8), not a second
          render.
        reward: "sparse" (success - 1) or "dense" (Meta-World's shaped reward, summed over the
          repeated actions).
        fast_render: no shadows, no multisampling (about 6x faster in software rendering); False
          keeps Meta-World's visuals.
        vlm_frames: render the upright frame_size^2 frame of `camera` on every step into
          info["vlm_frame"]. Turn off for state-only runs that need no VLM (frames then render
          only on render()).
        render_mode: "rgb_array", the one mode (accepted so gymnasium.make can pass it).
        """
        self.task = resolve_task(task)
        if goal not in ("fixed", "random"):
            raise ValueError(f"make_env: 'goal' must be 'fixed' or 'random', got {goal!r}.")
        if obs not in ("state", "pixels"):
            raise ValueError(f"make_env: 'obs' must be 'state' or 'pixels', got {obs!r}.")
        if reward not in ("sparse", "dense"):
            raise ValueError(f"make_env: 'reward' must be 'sparse' or 'dense', got {reward!r}.")
        if not isinstance(seed, (int, np.integer)):
            raise TypeError(f"make_env: 'seed' must be an int, got {type(seed).__name__}.")
        action_repeat = (2 if obs == "pixels" else 1) if action_repeat is None else action_repeat
        for name, value in (("frame_size", frame_size), ("pixel_size", pixel_size),
                            ("frame_stack", frame_stack), ("action_repeat", action_repeat),
                            ("max_episode_steps", max_episode_steps)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"make_env: {name!r} must be a positive int, got {value!r}.")
        self.goal, self.obs_mode, self.reward_mode, self.fast_render = goal, obs, reward, fast_render
        self.vlm_frames, self.frame_size, self.camera = vlm_frames, frame_size, camera
        self.pixel_size, self.frame_stack, self.action_repeat = pixel_size, frame_stack, action_repeat
        self.max_episode_steps = max_episode_steps
        if render_mode != "rgb_array":
            raise ValueError(f"make_env: render_mode must be 'rgb_array' (the only one it has: it "
                             f"renders its camera frame), got {render_mode!r}.")
        self.render_mode = render_mode

        raw = ALL_V3_ENVIRONMENTS[self.task + "-v3"]()
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

        state_space = _state_space(raw)
        self._state_space = state_space
        if obs == "state":
            self.observation_space = state_space
        else:
            shape = (3 * frame_stack, pixel_size, pixel_size)
            self.observation_space = spaces.Box(0, 255, shape, dtype=np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self._stack: deque[np.ndarray] = deque(maxlen=frame_stack)
        self._frame: np.ndarray | None = None
        self._steps: int | None = None  # simulator steps this episode; None before the first reset

    # --- public helpers -------------------------------------------------------------------------
    @property
    def goal_position(self) -> np.ndarray:
        """The goal xyz of the current scene (3,) float64, even when hidden from the state."""
        return np.array(self._raw._get_pos_goal(), dtype=np.float64)

    @property
    def elapsed_steps(self) -> int:
        """Simulator steps taken in this episode (each agent step is action_repeat of them)."""
        return self._steps or 0

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
        frame = self._render_if_needed()
        if self.obs_mode == "pixels":
            pixels = self._pixels(frame)
            for _ in range(self.frame_stack):
                self._stack.append(pixels)
        return self._observation(state), self._info(False, state, frame)

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
        action = np.clip(action, -1.0, 1.0)
        dense = 0.0
        for _ in range(self.action_repeat):
            state, raw_reward, _, _, raw_info = self._raw.step(action)
            dense += float(raw_reward)
            self._steps += 1
            if self._steps >= self.max_episode_steps:
                break
        success = bool(raw_info["success"])
        state = self._to_state(state)
        frame = self._render_if_needed()  # only after the last repeat: the agent sees no other frame
        if self.obs_mode == "pixels":
            self._stack.append(self._pixels(frame))
        truncated = self._steps >= self.max_episode_steps
        reward = dense if self.reward_mode == "dense" else float(success) - 1.0
        return self._observation(state), reward, False, truncated, self._info(success, state, frame)

    def render(self) -> np.ndarray:
        """The upright VLM frame of the current step (H, W, 3) uint8; rendered now only if the step did
        not render it already (vlm_frames=False)."""
        if self._frame is None:
            self._frame = self._get_renderer().render()
        return self._frame

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._raw.close()

    # --- internals ------------------------------------------------------------------------------
    def _to_state(self, state: np.ndarray) -> np.ndarray:
        # Meta-World clips step() states to its bounds but not reset() ones; clip both alike.
        return np.clip(state, self._state_space.low, self._state_space.high).astype(np.float32)

    def _get_renderer(self) -> FrameRenderer:
        if self._renderer is None:  # lazily: a GL context per process, made where the env steps
            self._renderer = FrameRenderer(self._raw.model, self._raw.data, camera=self.camera,
                                           size=self.frame_size, fast=self.fast_render)
        return self._renderer

    def _render_if_needed(self) -> np.ndarray | None:
        self._frame = None
        if self.vlm_frames or self.obs_mode == "pixels":
            self._frame = self._get_renderer().render()
        return self._frame

    def _pixels(self, frame: np.ndarray) -> np.ndarray:
        """DrQ's (3, P, P) uint8 view of the VLM frame: the whole frame, antialiased bilinear resize.

        One render feeds both outputs. The fused op yields floats, so it runs with mean 0 and std 1/255
        (output = the resized pixel value in [0, 255]) and the result is rounded back to uint8 (within
        1 LSB of the exact resize). Single-threaded: env workers are the parallelism.
        """
        import torch

        from furl_fast.ops import preprocess_frames

        x = preprocess_frames(torch.from_numpy(frame)[None], size=self.pixel_size,
                              mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, num_threads=1)
        return x[0].round_().clamp_(0, 255).to(torch.uint8).numpy()

    def _observation(self, state: np.ndarray) -> np.ndarray:
        if self.obs_mode == "state":
            return state
        return np.concatenate(list(self._stack), axis=0)

    def _info(self, success: bool, state: np.ndarray, frame: np.ndarray | None) -> dict[str, Any]:
        info: dict[str, Any] = {"success": success}
        if self.vlm_frames:
            info["vlm_frame"] = frame
        full = state.copy()
        full[-3:] = self._raw._get_pos_goal()  # zeros in a fixed-goal observation
        info["state"] = full
        return info


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


def make_env(task: str, **options: Any) -> MetaWorldEnv:
    """A Meta-World v3 task as a Gymnasium env with FuRL's conventions: MetaWorldEnv(task, **options),
    with the options (seed is required) documented there."""
    return MetaWorldEnv(task, **options)
