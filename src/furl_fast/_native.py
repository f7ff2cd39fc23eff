"""Loads the native module furl_fast._C once and reports what it can do.

Nothing here initialises the CUDA driver at import: importing furl_fast must work on machines with no
GPU and no driver (the CUDA runtime is linked statically into _C), and must leave
CUDA_VISIBLE_DEVICES changeable (the driver reads it once, when it starts; processes forked later,
such as env workers, need CUDA untouched). The runtime is asked lazily, by cuda_status(), the first
time a CUDA kernel is about to run.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
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
"""The CUDA kernels were compiled in. Whether they can run here is cuda_status().usable."""

LIMITS: dict[str, int] = _C.limits() if _C is not None else {}
"""The numeric limits of the native argument checks (max_preprocess_size, max_shift_pad,
max_threads, ...), defined once in C++; empty without the native module (the reference has none)."""

STRICT_ENV = "FURL_FAST_STRICT_CUDA"
REPORT_HINT = (
    "Please report it to the furl_fast maintainers with the output of "
    "`python -m furl_fast.info --selftest`"
)

_warned: set[str] = set()


def warn_fallback(op: str, reason: str) -> None:
    """Logs once per op that the pure-PyTorch reference is used instead of a native kernel."""
    if op not in _warned:
        _warned.add(op)
        logger.warning("furl_fast.ops.%s: using the pure-PyTorch reference (%s)", op, reason)


# ---- CUDA runtime ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaStatus:
    usable: bool
    reason: str | None  # why not, with the versions and the remedy
    runtime_version: str | None  # the CUDA runtime furl_fast was built with, e.g. "13.0"
    driver_version: str | None  # the CUDA version the installed driver supports; None: no driver
    device_count: int


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def describe_cuda_runtime(raw: dict[str, Any] | None) -> CudaStatus:
    """CudaStatus from _C.cuda_runtime_info()'s dict (None: built without CUDA kernels)."""
    if raw is None:
        return CudaStatus(False, "furl_fast was built without CUDA kernels", None, None, 0)
    runtime, driver = int(raw["runtime_version"]), int(raw["driver_version"])
    rt = _version(runtime)
    drv = _version(driver) if driver else None
    count = int(raw["device_count"])
    reason = None
    if driver == 0:
        reason = f"no NVIDIA driver found (furl_fast's CUDA kernels are built with CUDA {rt})"
    elif driver < runtime:
        reason = (
            f"the NVIDIA driver supports CUDA {drv}, older than the CUDA {rt} runtime furl_fast's "
            f"kernels were built with; update the driver (CUDA 13 needs R580 or newer) or rebuild "
            f"furl_fast with a CUDA toolkit no newer than {drv} on PATH (pip install .)"
        )
    elif count == 0:
        reason = (raw.get("error") or "no CUDA device found") + f" (CUDA runtime {rt}, driver {drv})"
    return CudaStatus(reason is None, reason, rt, drv, count)


@functools.cache
def cuda_status() -> CudaStatus:
    """Whether furl_fast's CUDA kernels can run in this process. The first call initialises the CUDA
    driver (so it is never made at import)."""
    raw = _C.cuda_runtime_info() if HAS_CUDA_KERNELS else None
    return describe_cuda_runtime(raw)


# ---- self-checked kernels ----------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCheck:
    op: str
    state: str  # "verified", "fell back" (to the reference) or "error" (strict mode)
    device: str
    error: str | None


_checks: dict[str, KernelCheck] = {}
_checks_lock = threading.Lock()


def kernel_checks() -> dict[str, KernelCheck]:
    """The self-checks run so far in this process, by op."""
    with _checks_lock:
        return dict(_checks)


def kernel_check(op: str) -> KernelCheck | None:
    """op's self-check result, None before its first CUDA call (cheap: called on every call)."""
    return _checks.get(op)  # a single dict lookup needs no lock


def reset_kernel_checks() -> None:
    """Forgets every self-check result (tests; the next call of each op checks again)."""
    with _checks_lock:
        _checks.clear()
    _warned.clear()


def _device_name(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index or 0})"
    return str(device)


def kernel_trusted(
    op: str,
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    make_inputs: Callable[[Any], tuple],
    device: Any,
    tolerance: tuple[float, float],
) -> bool:
    """True when op's native kernel may be used on device; the first call per op and process runs it
    once on make_inputs(device) against the reference on the same inputs.

    A kernel that raises or differs beyond tolerance (rtol, atol) makes the op use the reference for
    the rest of the process, with one warning naming the op, the device, the error and where to
    report it; with FURL_FAST_STRICT_CUDA=1 it raises RuntimeError instead (on every call).
    """
    done = kernel_check(op)
    if done is None:
        done = _run_check(op, kernel, reference, make_inputs, device, tolerance)
    if done.state == "error":
        raise RuntimeError(_failure_message(done, strict=True))
    return done.state == "verified"


def _run_check(op, kernel, reference, make_inputs, device, tolerance) -> KernelCheck:
    import torch

    name, kind = _device_name(device), torch.device(device).type
    try:
        # In float32 whatever the caller's autocast region: a bf16 reference would fail a good kernel.
        with torch.autocast(kind, enabled=False), torch.no_grad():
            args = make_inputs(device)
            got = kernel(*args)
            if kind == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous launch error surfaces here
            want = reference(*args)
        torch.testing.assert_close(got, want, rtol=tolerance[0], atol=tolerance[1])
        check = KernelCheck(op, "verified", name, None)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not trust the kernel
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        strict = os.environ.get(STRICT_ENV, "") not in ("", "0")
        check = KernelCheck(op, "error" if strict else "fell back", name, error)
        if not strict:
            logger.warning("%s", _failure_message(check, strict=False))
    with _checks_lock:
        return _checks.setdefault(op, check)  # two threads raced: the first result stands


def _failure_message(check: KernelCheck, *, strict: bool) -> str:
    head = (
        f"furl_fast.ops.{check.op}: the native kernel failed its self-check on {check.device} "
        f"({check.error})"
    )
    if strict:
        return f"{head}; {STRICT_ENV} is set, so this is an error. {REPORT_HINT}."
    return (
        f"{head}; using the pure-PyTorch reference for the rest of this process. {REPORT_HINT} "
        f"({STRICT_ENV}=1 makes this an error)."
    )


def build_info() -> dict[str, Any]:
    """What was built and what is usable now: version, CUDA kernels and architectures, runtime and
    driver, GPU. Asks the CUDA runtime (and so initialises the driver) when the kernels are built."""
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
    status = cuda_status()
    info["cuda_compiled"] = bool(native.get("cuda_compiled", False))
    info["cuda_architectures"] = native.get("cuda_architectures", "")
    info["cuda_runtime_version"] = native.get("cuda_runtime_version")
    info["cuda_driver_version"] = status.driver_version
    info["cuda_device_count"] = status.device_count
    info["cuda_kernels_usable"] = status.usable
    info["gpu_usable"] = bool(status.usable and info["torch_cuda_available"])
    info["gpu_unusable_reason"] = None if info["gpu_usable"] else (
        IMPORT_ERROR or status.reason or "torch sees no CUDA device"
    )
    info["cpu_threads"] = native.get("cpu_threads")
    info["compiler"] = native.get("compiler")
    info["sanitizers"] = native.get("sanitizers", "")
    return info
