"""Meta-World's frames for the VLM: FuRL's upright 256x256 "corner2" view, rendered headless, and
FuRL's crop of it."""

from __future__ import annotations

import atexit
import weakref

import mujoco
import numpy as np

from furl_fast.envs.gl import load_triton_before_gl

VLM_CAMERA = "corner2"  # FuRL's camera (Meta-World camera id 2)
VLM_FRAME_SIZE = 256  # FuRL renders 256x256 and crops 32:224 before the VLM


def furl_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """FuRL's crop box (top, left, height, width): rows and columns 32:224 of a 256x256 frame, i.e. the
    central 3/4 of the frame (the table, without wall and floor), scaled for other frame sizes."""
    return (height // 8, width // 8, height - 2 * (height // 8), width - 2 * (width // 8))


_LIVE_RENDERERS: weakref.WeakSet[FrameRenderer] = weakref.WeakSet()


def holds_gl_context() -> bool:
    """Whether this process has a live FrameRenderer (so forked workers would hang on their renders)."""
    return bool(_LIVE_RENDERERS)


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
        load_triton_before_gl()
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
