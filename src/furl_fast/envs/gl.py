"""Headless OpenGL for MuJoCo renders, shared by the suites (MUJOCO_GL itself is chosen when
furl_fast.envs is imported)."""

from __future__ import annotations


def load_triton_before_gl() -> None:
    """Call before a process makes its first GL context.

    Software rendering (Mesa's llvmpipe) brings libLLVM into the process's global symbol scope with
    the first GL context. Triton, which torch._dynamo imports (and through it torchvision, so
    open_clip), links its own LLVM statically: loaded after that, its static initialisers bind to
    Mesa's LLVM and the process dies with a segfault. Loaded first, it keeps its LLVM to itself.
    """
    try:
        import triton  # noqa: F401
    except ImportError:  # torch builds without triton (CPU-only wheels) are not affected
        pass
