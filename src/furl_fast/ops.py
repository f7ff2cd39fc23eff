"""Public tensor ops. Each validates its arguments, then dispatches to the native CPU or CUDA kernel,
or to furl_fast.reference when no native kernel is available for the tensor's device.

Ops are forward-only (no autograd): tensors that require grad are detached.
"""

from __future__ import annotations

import math
import operator
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


def _run_native(op: str, backend: str, args: tuple, device: torch.device,
                num_threads: int | None) -> None:
    """Calls _C.<op>_cpu(*args, num_threads) or _C.<op>_cuda(*args, stream) on the current stream."""
    if backend == "cpu":
        getattr(_native._C, f"{op}_cpu")(*args, num_threads or 0)
    else:
        getattr(_native._C, f"{op}_cuda")(*args, _stream(device))


def _check_threads(op: str, num_threads: int | None) -> None:
    if num_threads is not None and (
        isinstance(num_threads, bool)
        or not isinstance(num_threads, int)
        or not 1 <= num_threads < 2**31
    ):
        raise ValueError(
            f"{op}: 'num_threads' must be None (all cores) or an int in [1, 2^31 - 1], "
            f"got {num_threads!r}."
        )


def _three_floats(op: str, name: str, values: object) -> tuple[float, float, float]:
    """(mean or std) as 3 finite floats; strings, wrong lengths, NaN and inf raise ValueError."""
    try:
        out = tuple(float(v) for v in values) if not isinstance(values, (str, bytes)) else ()
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{op}: '{name}' must be 3 finite numbers, got {values!r}.")
    return out


def centre_square_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """The centred square crop box (top, left, side, side) of an H x W frame.

    Resizing this box to S x S equals open_clip's "resize the shortest side to S, then centre-crop
    S x S" exactly for square frames, and up to a sub-pixel shift of the sampling grid otherwise.
    """
    side = min(height, width)
    return ((height - side) // 2, (width - side) // 2, side, side)


def _crop_box(crop: object) -> tuple[int, int, int, int] | None:
    """crop as 4 Python ints, or None when it is not 4 integers (floats are refused, not truncated)."""
    try:
        box = tuple(operator.index(v) for v in crop)  # type: ignore[union-attr]
    except TypeError:
        return None
    return box if len(box) == 4 else None


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
    if not isinstance(interpolation, str) or interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"preprocess_frames: 'interpolation' must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}."
        )
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 8192:
        raise ValueError(f"preprocess_frames: 'size' must be an int in [1, 8192], got {size!r}.")
    _check_threads("preprocess_frames", num_threads)
    box = (0, 0, height, width) if crop is None else _crop_box(crop)
    top, left, box_h, box_w = box if box is not None else (-1, -1, 0, 0)
    if box_h < 1 or box_w < 1 or top < 0 or left < 0 or top + box_h > height or left + box_w > width:
        raise ValueError(
            f"preprocess_frames: 'crop' (top, left, height, width) = {crop!r} must be 4 ints giving a "
            f"non-empty box inside the {height}x{width} frame."
        )
    mean = _three_floats("preprocess_frames", "mean", mean)
    std = _three_floats("preprocess_frames", "std", std)
    if 0.0 in std:
        raise ValueError(f"preprocess_frames: 'std' must be non-zero, got {std!r}.")

    backend = _native_backend("preprocess_frames", frames.device)
    if backend is None:
        return reference.preprocess_frames(
            frames, size=size, crop=None if crop is None else box, flip_vertical=flip_vertical,
            bgr=bgr, mean=mean, std=std, out_dtype=out_dtype, interpolation=interpolation,
        )
    frames = frames.contiguous()
    out = torch.empty((n, 3, size, size), dtype=out_dtype, device=frames.device)
    args = (_capsule(frames), _capsule(out), box, size, flip_vertical, bgr,
            _INTERPOLATIONS[interpolation], mean, std)
    _run_native("preprocess_frames", backend, args, frames.device, num_threads)
    return out


# ---- Reward heads ----------------------------------------------------------------------
# Embeddings (emb / img_emb) may be float32, float16 or bfloat16 and are read in place; every other
# tensor (weights, targets, text / goal / baseline embeddings) may be any floating dtype and is used
# as float32 (converted here once per call: they are small). Native kernels accumulate in float32 and
# return float32. Zero vectors have cosine 0 (see reference.NORM_EPS); NaN inputs propagate.

__all__ += ["clip_similarity", "goal_baseline_reward", "mlp_cosine_reward", "softmax_goal_reward"]


def _check_floating(
    op: str, name: str, t: object, ndim: int, layout: str, like: torch.Tensor | None = None
) -> None:
    """Type, rank, emptiness and device checks for one tensor argument (layout: e.g. '(N, D)').

    Without `like`, t is the embedding batch (float32/float16/bfloat16); with it, t is a weight or
    text tensor (any floating dtype) that must live on like's device.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}.")
    if like is None and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: '{name}' must have dtype float32, float16 or bfloat16, got {t.dtype}."
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}: '{name}' must be a floating-point tensor, got {t.dtype}.")
    if t.dim() != ndim:
        raise ValueError(f"{op}: '{name}' must have shape {layout}, got {tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError(f"{op}: '{name}' must not be empty, got shape {tuple(t.shape)}.")
    if like is not None and t.device != like.device:
        raise ValueError(
            f"{op}: '{name}' is on {t.device} but the embeddings are on {like.device}."
        )


def _check_size(op: str, name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    if t.shape[dim] != size:
        raise ValueError(
            f"{op}: '{name}' must have size {size} in dimension {dim} ({what}), got shape {tuple(t.shape)}."
        )


def _f32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.detach().to(torch.float32).contiguous()


def mlp_cosine_reward(
    emb: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    target: torch.Tensor,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """FuRL's fuzzy VLM reward, fused: cos(relu(emb @ w1 + b1) @ w2 + b2, target). Forward only.

    emb: (N, D) float32/float16/bfloat16. w1: (D, H), i.e. nn.Linear(D, H).weight.T; b1: (H,);
    w2: (H, P); b2: (P,); target: (P,) or (K, P), the projected text embedding(s); weights and target in
    any floating dtype, used as float32. Returns (N,) float32 for a (P,) target, (N, K) for (K, P).
    num_threads: CPU threads (default: all cores).
    Equivalent: reference.mlp_cosine_reward.
    """
    op = "mlp_cosine_reward"
    _check_threads(op, num_threads)
    _check_floating(op, "emb", emb, 2, "(N, D)")
    _check_floating(op, "w1", w1, 2, "(D, H)", emb)
    _check_floating(op, "b1", b1, 1, "(H,)", emb)
    _check_floating(op, "w2", w2, 2, "(H, P)", emb)
    _check_floating(op, "b2", b2, 1, "(P,)", emb)
    two_d = isinstance(target, torch.Tensor) and target.dim() == 2
    _check_floating(op, "target", target, 2 if two_d else 1, "(P,) or (K, P)", emb)
    n, d = emb.shape
    h, p = w1.shape[1], w2.shape[1]
    _check_size(op, "w1", w1, 0, d, "D, the embedding width of 'emb'")
    _check_size(op, "b1", b1, 0, h, "H, the hidden width of 'w1'")
    _check_size(op, "w2", w2, 0, h, "H, the hidden width of 'w1'")
    _check_size(op, "b2", b2, 0, p, "P, the output width of 'w2'")
    _check_size(op, "target", target, target.dim() - 1, p, "P, the output width of 'w2'")

    backend = _native_backend(op, emb.device)
    if backend is None:
        return reference.mlp_cosine_reward(emb.detach(), w1, b1, w2, b2, target.detach())
    targets = _f32(target)
    if not two_d:
        targets = targets.view(1, p)
    out = torch.empty((n, targets.shape[0]), dtype=torch.float32, device=emb.device)
    args = (
        _capsule(emb.contiguous()),
        _capsule(_f32(w1)),
        _capsule(_f32(b1)),
        _capsule(_f32(w2)),
        _capsule(_f32(b2)),
        _capsule(targets),
        _capsule(out),
    )
    _run_native("mlp_cosine_reward", backend, args, emb.device, num_threads)
    return out if two_d else out.view(n)


def _check_img_text(op: str, img_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    _check_floating(op, "img_emb", img_emb, 2, "(N, D)")
    _check_floating(op, "text_emb", text_emb, 2, "(K, D)", img_emb)
    _check_size(
        op, "text_emb", text_emb, 1, img_emb.shape[1], "D, the embedding width of 'img_emb'"
    )


def clip_similarity(
    img_emb: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    normalize: bool = True,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Cosine similarity (normalize=True) or dot product of every image with every text embedding.

    img_emb: (N, D) float32/float16/bfloat16; text_emb: (K, D) any floating dtype (used as float32).
    Returns (N, K) float32. Equivalent: reference.clip_similarity.
    """
    op = "clip_similarity"
    _check_threads(op, num_threads)
    _check_img_text(op, img_emb, text_emb)
    backend = _native_backend(op, img_emb.device)
    if backend is None:
        return reference.clip_similarity(img_emb.detach(), text_emb.detach(), normalize=normalize)
    out = torch.empty(
        (img_emb.shape[0], text_emb.shape[0]), dtype=torch.float32, device=img_emb.device
    )
    args = (
        _capsule(img_emb.contiguous()),
        _capsule(_f32(text_emb)),
        _capsule(out),
        bool(normalize),
    )
    _run_native("clip_similarity", backend, args, img_emb.device, num_threads)
    return out


def goal_baseline_reward(
    img_emb: torch.Tensor,
    goal_emb: torch.Tensor,
    baseline_emb: torch.Tensor,
    alpha: float,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """VLM-RM's goal-baseline reward 1 - 0.5 |(x - g) P|^2, P = alpha d d^T / |d|^2 + (1 - alpha) I.

    img_emb: (N, D) float32/float16/bfloat16, L2-normalised inside (x). goal_emb g, baseline_emb b:
    (D,), already averaged: the mean of the L2-normalised goal (baseline) prompt embeddings, used as
    given; d = g - b. alpha in [0, 1]; alpha = 0 gives 0.5 + x.g - 0.5 |g|^2, an affine map of the
    cosine with g. Returns (N,) float32; P is never formed (rank-one algebra, see rewards.h).
    Equivalent: reference.goal_baseline_reward.
    """
    op = "goal_baseline_reward"
    _check_threads(op, num_threads)
    _check_floating(op, "img_emb", img_emb, 2, "(N, D)")
    _check_floating(op, "goal_emb", goal_emb, 1, "(D,)", img_emb)
    _check_floating(op, "baseline_emb", baseline_emb, 1, "(D,)", img_emb)
    d = img_emb.shape[1]
    _check_size(op, "goal_emb", goal_emb, 0, d, "D, the embedding width of 'img_emb'")
    _check_size(op, "baseline_emb", baseline_emb, 0, d, "D, the embedding width of 'img_emb'")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: 'alpha' must be a number in [0, 1], got {alpha!r}.")
    backend = _native_backend(op, img_emb.device)
    if backend is None:
        return reference.goal_baseline_reward(
            img_emb.detach(), goal_emb.detach(), baseline_emb.detach(), float(alpha)
        )
    out = torch.empty((img_emb.shape[0],), dtype=torch.float32, device=img_emb.device)
    args = (
        _capsule(img_emb.contiguous()),
        _capsule(_f32(goal_emb)),
        _capsule(_f32(baseline_emb)),
        _capsule(out),
        float(alpha),
    )
    _run_native("goal_baseline_reward", backend, args, img_emb.device, num_threads)
    return out


def softmax_goal_reward(
    img_emb: torch.Tensor,
    text_emb: torch.Tensor,
    goal_index: int,
    *,
    temperature: float,
    threshold: float | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Baumli et al.'s goal probability p = softmax_k(cos(img, text_k) / temperature)[goal_index].

    img_emb: (N, D) float32/float16/bfloat16; text_emb: (K, D), the goal prompt and the negatives, any
    floating dtype (used as float32); goal_index in [0, K); temperature > 0 (CLIP's 1 / logit_scale,
    e.g. 0.01). With threshold, the binary reward 1[p > threshold] as 0./1. (NaN stays NaN).
    Returns (N,) float32. Equivalent: reference.softmax_goal_reward.
    """
    op = "softmax_goal_reward"
    _check_threads(op, num_threads)
    _check_img_text(op, img_emb, text_emb)
    k = text_emb.shape[0]
    if isinstance(goal_index, bool) or not isinstance(goal_index, int) or not 0 <= goal_index < k:
        raise ValueError(
            f"{op}: 'goal_index' must be an int in [0, {k}) (a row of 'text_emb'), got {goal_index!r}."
        )
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"{op}: 'temperature' must be a finite number > 0, got {temperature!r}.")
    if threshold is not None and (
        not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
    ):
        raise ValueError(f"{op}: 'threshold' must be a finite number or None, got {threshold!r}.")
    backend = _native_backend(op, img_emb.device)
    if backend is None:
        return reference.softmax_goal_reward(
            img_emb.detach(),
            text_emb.detach(),
            goal_index,
            temperature=float(temperature),
            threshold=threshold,
        )
    out = torch.empty((img_emb.shape[0],), dtype=torch.float32, device=img_emb.device)
    args = (
        _capsule(img_emb.contiguous()),
        _capsule(_f32(text_emb)),
        _capsule(out),
        goal_index,
        float(temperature),
        None if threshold is None else float(threshold),
    )
    _run_native("softmax_goal_reward", backend, args, img_emb.device, num_threads)
    return out
