from __future__ import annotations

import os
import zlib

import pytest
import torch

# MuJoCo picks its GL backend once, at its first import, from MUJOCO_GL. Any test module that imports
# metaworld or mujoco before furl_fast.envs would otherwise leave it on the windowed backend (GLFW),
# and every headless render in the session would fail.
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test (from its name), so failures reproduce but inputs vary by test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls: on a shared 2-core machine extra intra-op threads only spin and contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
