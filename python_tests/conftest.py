from __future__ import annotations

import importlib.util
import json
import os
import zlib
from pathlib import Path

import pytest
import torch

# MuJoCo picks its GL backend once, at its first import, from MUJOCO_GL. Any test module that imports
# metaworld or mujoco before furl_fast.envs would otherwise leave it on the windowed backend (GLFW),
# and every headless render in the session would fail.
os.environ.setdefault("MUJOCO_GL", "egl")

# No test may reach the network (a weights hub, a package index): connect() outside loopback raises,
# here and, through the guard's sitecustomize on PYTHONPATH, in every subprocess the tests start.
NETWORK_GUARD_DIR = Path(__file__).parent / "network_guard"
_spec = importlib.util.spec_from_file_location("furl_fast_network_guard",
                                               NETWORK_GUARD_DIR / "sitecustomize.py")
network_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(network_guard)
# Absolute entries: subprocesses often run in a temporary directory (PYTHONPATH=src would not resolve).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(NETWORK_GUARD_DIR)] + [os.path.abspath(p) for p in
                                os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_runtest_setup(item):
    # Before every test's fixtures (module-scoped ones included): pytest-socket, when installed,
    # restores the unguarded connect after each test.
    network_guard.install()


# A random-weight open_clip model small enough for CLI smoke runs on a CPU.
TINY_CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64,
                                                 "head_width": 32, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                              "layers": 2}}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """TINY_CLIP_CFG with random weights as a local-dir: model (config + weights), loadable in a
    subprocess, as users load their own checkpoints."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_CLIP_CFG).state_dict(), root / "open_clip_pytorch_model.bin")
    return "local-dir:" + str(root)


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


@pytest.fixture
def closing():
    """Collects envs and closes them after the test (GL contexts are per process and not free)."""
    envs = []
    yield lambda env: envs.append(env) or env
    for env in envs:
        env.close()
