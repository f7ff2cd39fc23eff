"""Session-wide test setup."""

from __future__ import annotations

import os

# MuJoCo picks its GL backend once, at its first import, from MUJOCO_GL. Any test module that imports
# metaworld or mujoco before furl_fast.envs would otherwise leave it on the windowed backend (GLFW),
# and every headless render in the session would fail.
os.environ.setdefault("MUJOCO_GL", "egl")
