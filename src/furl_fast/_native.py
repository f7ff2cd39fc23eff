"""Loads the native module furl_fast._C once and reports what it can do.

Nothing here touches torch.cuda at import time: importing furl_fast must work on machines with no GPU
and no driver (the CUDA runtime is linked statically into _C).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("furl_fast")

try:
    from furl_fast import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # an sdist/source tree without a build, or a broken build
    _C = None
    IMPORT_ERROR = (
        f"furl_fast's native module furl_fast._C could not be imported ({exc}). Install the package "
        "with `pip install .` from the source tree (it compiles the C++/CUDA core); until then "
        "furl_fast uses the slower pure-PyTorch reference ops."
    )

HAS_NATIVE: bool = _C is not None
HAS_CUDA_KERNELS: bool = bool(_C is not None and _C.build_info()["cuda_compiled"])

_warned: set[str] = set()


def warn_fallback(op: str, reason: str) -> None:
    """Logs once per op that the pure-PyTorch reference is used instead of a native kernel."""
    if op not in _warned:
        _warned.add(op)
        logger.warning("furl_fast.ops.%s: using the pure-PyTorch reference (%s)", op, reason)


def build_info() -> dict[str, Any]:
    """What was built and what is usable now: version, CUDA kernels and architectures, runtime, GPU."""
    import torch

    from furl_fast import __version__

    info: dict[str, Any] = {
        "version": __version__,
        "native_module": HAS_NATIVE,
        "native_import_error": IMPORT_ERROR,
        "torch_version": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
    }
    native = _C.build_info() if _C is not None else {}
    info["cuda_compiled"] = bool(native.get("cuda_compiled", False))
    info["cuda_architectures"] = native.get("cuda_architectures", "")
    info["cuda_runtime_version"] = native.get("cuda_runtime_version")
    info["cuda_device_count"] = native.get("cuda_device_count", 0)
    info["gpu_usable"] = bool(
        info["cuda_compiled"] and info["cuda_device_count"] > 0 and info["torch_cuda_available"]
    )
    info["gpu_unusable_reason"] = None if info["gpu_usable"] else (
        native.get("cuda_error") or IMPORT_ERROR or "torch sees no CUDA device"
    )
    info["cpu_threads"] = native.get("cpu_threads")
    info["compiler"] = native.get("compiler")
    info["sanitizers"] = native.get("sanitizers", "")
    return info
