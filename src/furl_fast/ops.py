"""Public tensor ops. Each validates its arguments, then dispatches to the native CPU or CUDA kernel,
or to furl_fast.reference when no native kernel is available for the tensor's device.

Ops are forward-only (no autograd): tensors that require grad are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.dlpack import to_dlpack

from furl_fast import _native, reference
from furl_fast.reference import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "centre_square_crop", "preprocess_frames"]

_INTERPOLATIONS = {"bilinear": 0, "bicubic": 1}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _capsule(t: torch.Tensor):
    return to_dlpack(t.detach())


def _native_backend(op: str, device: torch.device) -> str | None:
    """'cpu' or 'cuda' when a native kernel serves this device, else None (after a one-time warning)."""
    if not _native.HAS_NATIVE:
        _native.warn_fallback(op, _native.IMPORT_ERROR or "no native module")
        return None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if _native.HAS_CUDA_KERNELS:
            return "cuda"
        _native.warn_fallback(op, "furl_fast was built without CUDA kernels")
        return None
    _native.warn_fallback(op, f"no native kernel for device type {device.type!r}")
    return None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def centre_square_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """The centred square crop box (top, left, side, side) of an H x W frame.

    Resizing this box to S x S equals open_clip's "resize the shortest side to S, then centre-crop
    S x S" exactly for square frames, and up to a sub-pixel shift of the sampling grid otherwise.
    """
    side = min(height, width)
    return ((height - side) // 2, (width - side) // 2, side, side)


def preprocess_frames(
    frames: torch.Tensor,
    *,
    size: int = 224,
    crop: tuple[int, int, int, int] | None = None,
    flip_vertical: bool = False,
    bgr: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    out_dtype: torch.dtype = torch.float32,
    interpolation: str = "bilinear",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Fused frame preprocessing: one pass from uint8 frames to normalised model input.

    frames: (N, H, W, 3) uint8 on CPU or CUDA. Optional vertical flip, then the crop box
    (top, left, height, width) in the flipped frame, then resize to size x size (bilinear or bicubic,
    as F.interpolate with align_corners=False, antialiased when downsampling), /255, (x - mean) / std.
    bgr=True feeds channels in reverse order (a quirk of FuRL's release).
    Returns (N, 3, size, size) out_dtype (float32, float16 or bfloat16) on frames' device.
    num_threads: CPU threads (default: all cores).
    Equivalent: reference.preprocess_frames.
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"preprocess_frames: 'frames' must be a torch.Tensor, got {type(frames).__name__}.")
    if frames.dtype != torch.uint8:
        raise TypeError(f"preprocess_frames: 'frames' must have dtype uint8, got {frames.dtype}.")
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"preprocess_frames: 'frames' must have shape (N, H, W, 3), got {tuple(frames.shape)}."
        )
    n, height, width, _ = frames.shape
    if n == 0 or height == 0 or width == 0:
        raise ValueError(f"preprocess_frames: 'frames' must not be empty, got shape {tuple(frames.shape)}.")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"preprocess_frames: 'out_dtype' must be one of {_FLOAT_DTYPES}, got {out_dtype}.")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"preprocess_frames: 'interpolation' must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}."
        )
    if not isinstance(size, int) or not 1 <= size <= 8192:
        raise ValueError(f"preprocess_frames: 'size' must be an int in [1, 8192], got {size!r}.")
    box = (0, 0, height, width) if crop is None else tuple(int(v) for v in crop)
    top, left, box_h, box_w = box if len(box) == 4 else (None,) * 4
    if top is None or box_h < 1 or box_w < 1 or top < 0 or left < 0 or top + box_h > height or left + box_w > width:
        raise ValueError(
            f"preprocess_frames: 'crop' (top, left, height, width) = {crop} must be a non-empty box "
            f"inside the {height}x{width} frame."
        )
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError("preprocess_frames: 'mean' and 'std' must have 3 values each, std non-zero.")

    backend = _native_backend("preprocess_frames", frames.device)
    if backend is None:
        return reference.preprocess_frames(
            frames, size=size, crop=crop, flip_vertical=flip_vertical, bgr=bgr, mean=mean, std=std,
            out_dtype=out_dtype, interpolation=interpolation,
        )
    frames = frames.contiguous()
    out = torch.empty((n, 3, size, size), dtype=out_dtype, device=frames.device)
    args = (_capsule(frames), _capsule(out), box, size, flip_vertical, bgr,
            _INTERPOLATIONS[interpolation], tuple(mean), tuple(std))
    if backend == "cpu":
        _native._C.preprocess_frames_cpu(*args, num_threads or 0)
    else:
        _native._C.preprocess_frames_cuda(*args, _stream(frames.device))
    return out
