"""Public tensor ops, registered with the PyTorch dispatcher as torch.ops.furl_fast.<name>.

Each public function checks its arguments against a declarative spec (one checker for every op,
below), then calls its custom op, whose CPU and CUDA kernels call the native _C.<name>_cpu /
_C.<name>_cuda. Without the native module (or on another device) the kernel is furl_fast.reference.
Every op has a fake (meta) implementation, so functions calling them compile under torch.compile
without graph breaks. CUDA kernels check themselves against the reference on their first call in a
process (see furl_fast._native.kernel_trusted).

Ops are forward-only (no autograd): tensors that require grad are detached.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from furl_fast import _native, reference
from furl_fast.reference import CLIP_MEAN, CLIP_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "centre_square_crop",
    "clip_similarity",
    "goal_baseline_reward",
    "mlp_cosine_reward",
    "preprocess_frames",
    "random_shift",
    "softmax_goal_reward",
]

_INTERPOLATIONS = {"bilinear": 0, "bicubic": 1}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ANY_FLOAT = None  # a Tensor spec's dtypes: any floating dtype (used as float32)


# ---- the argument spec: one declarative checker for every op -------------------------------------


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument. shapes: its layouts, dimension names separated by spaces ("N D"); a name
    seen before must have the same size. dtypes: allowed dtypes (None: any floating dtype). The first
    tensor of a spec fixes the device for the others."""

    name: str
    shapes: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = _FLOAT_DTYPES

    def __post_init__(self) -> None:  # the layouts split once, not on every call
        object.__setattr__(self, "layouts", tuple(tuple(s.split()) for s in self.shapes))


@dataclass(frozen=True)
class Int:
    """An int in [low, high] (high: an int, None for no bound, or a dimension name for [low, dim))."""

    name: str
    low: int
    high: int | str | None
    optional: bool = False  # None allowed (and kept)


@dataclass(frozen=True)
class Real:
    """A finite number in [low, high] (strictly above low when low_open)."""

    name: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Choice:
    name: str
    options: tuple[Any, ...]
    error: type[Exception] = ValueError


@dataclass(frozen=True)
class Floats:
    """n finite numbers (a tuple of floats), non-zero when nonzero."""

    name: str
    n: int
    nonzero: bool = False


@dataclass(frozen=True)
class Box:
    """A crop box (top, left, height, width) of 4 ints inside the H x W frame; None: the whole frame."""

    name: str


_THREADS = Int("num_threads", 1, "max_threads", optional=True)


def _shape_text(shape: str) -> str:
    dims = shape.split()
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


class Spec:
    """The arguments of one op; check() returns them normalised, in order."""

    def __init__(self, op: str, *args: TensorArg | Int | Real | Choice | Floats | Box) -> None:
        self.op = op
        self.args = args

    def fail(self, exc: type[Exception], name: str, what: str) -> Exception:
        return exc(f"{self.op}: '{name}' {what}.")

    def check(self, **values: Any) -> list[Any]:
        dims: dict[str, tuple[int, str]] = {}  # name -> (size, the tensor that set it)
        first: torch.Tensor | None = None
        first_name = ""
        out = []
        for a in self.args:
            v = values[a.name]
            if isinstance(a, TensorArg):
                self._check_tensor(a, v, dims, first, first_name)
                if first is None:
                    first, first_name = v, a.name
                out.append(v.detach())
            elif isinstance(a, Int):
                out.append(self._check_int(a, v, dims))
            elif isinstance(a, Real):
                out.append(self._check_real(a, v))
            elif isinstance(a, Choice):
                if not isinstance(v, type(a.options[0])) or v not in a.options:
                    raise self.fail(a.error, a.name, f"must be one of {list(a.options)}, got {v!r}")
                out.append(v)
            elif isinstance(a, Floats):
                out.append(self._check_floats(a, v))
            else:
                out.append(self._check_box(a, v, dims))
        return out

    def _check_tensor(self, a: TensorArg, t: Any, dims: dict, first: Any, first_name: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise self.fail(TypeError, a.name, f"must be a torch.Tensor, got {type(t).__name__}")
        if a.dtypes is None:
            if not t.is_floating_point():
                raise self.fail(TypeError, a.name, f"must be a floating-point tensor, got {t.dtype}")
        elif t.dtype not in a.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in a.dtypes)
            raise self.fail(TypeError, a.name, f"must have dtype {allowed}, got {t.dtype}")
        shape = next((s for s in a.layouts if len(s) == t.dim()), None)
        if shape is not None and any(d.isdigit() and int(d) != n for d, n in zip(shape, t.shape)):
            shape = None
        if shape is None:
            layouts = " or ".join(_shape_text(s) for s in a.shapes)
            raise self.fail(ValueError, a.name, f"must have shape {layouts}, got {tuple(t.shape)}")
        if t.numel() == 0:
            raise self.fail(ValueError, a.name, f"must not be empty, got shape {tuple(t.shape)}")
        if first is not None and t.device != first.device:
            raise self.fail(ValueError, a.name,
                            f"is on {t.device} but '{first_name}' is on {first.device}")
        for i, dim in enumerate(shape):
            size = t.shape[i]
            if dim.isdigit():
                continue
            if dim not in dims:
                dims[dim] = (size, a.name)
            elif dims[dim][0] != size:
                raise self.fail(
                    ValueError, a.name,
                    f"must have size {dims[dim][0]} in dimension {i} ({dim}, as in "
                    f"'{dims[dim][1]}'), got shape {tuple(t.shape)}",
                )

    def _check_int(self, a: Int, v: Any, dims: dict) -> int | None:
        if v is None and a.optional:
            return None
        if isinstance(a.high, str) and a.high in dims:
            high, text = dims[a.high][0] - 1, f"[{a.low}, {dims[a.high][0]})"
        else:
            high = _native.LIMITS.get(a.high) if isinstance(a.high, str) else a.high
            text = f"[{a.low}, {'inf' if high is None else high}]"
        if isinstance(v, bool) or not isinstance(v, int) or v < a.low or (high is not None and v > high):
            none = "None or " if a.optional else ""
            raise self.fail(ValueError, a.name, f"must be {none}an int in {text}, got {v!r}")
        return int(v)

    def _check_real(self, a: Real, v: Any) -> float | None:
        if v is None and a.optional:
            return None
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        ok = ok and (v > a.low if a.low_open else v >= a.low) and v <= a.high
        if not ok:
            if a.high == math.inf:
                bound = "" if a.low == -math.inf else f" {'>' if a.low_open else '>='} {a.low:g}"
            else:
                bound = f" in {'(' if a.low_open else '['}{a.low:g}, {a.high:g}]"
            none = " or None" if a.optional else ""
            raise self.fail(ValueError, a.name, f"must be a finite number{bound}{none}, got {v!r}")
        return float(v)

    def _check_floats(self, a: Floats, v: Any) -> tuple[float, ...]:
        try:
            out = tuple(float(x) for x in v) if not isinstance(v, (str, bytes)) else ()
        except (TypeError, ValueError):
            out = ()
        if len(out) != a.n or not all(math.isfinite(x) for x in out):
            raise self.fail(ValueError, a.name, f"must be {a.n} finite numbers, got {v!r}")
        if a.nonzero and 0.0 in out:
            raise self.fail(ValueError, a.name, f"must be non-zero, got {v!r}")
        return out

    def _check_box(self, a: Box, v: Any, dims: dict) -> list[int]:
        height, width = dims["H"][0], dims["W"][0]
        if v is None:
            return [0, 0, height, width]
        try:  # floats are refused, not truncated
            box = tuple(operator.index(x) for x in v)
        except TypeError:
            box = ()
        if len(box) != 4 or not (
            box[2] >= 1 and box[3] >= 1 and box[0] >= 0 and box[1] >= 0
            and box[0] + box[2] <= height and box[1] + box[3] <= width
        ):
            raise self.fail(
                ValueError, a.name,
                f"(top, left, height, width) = {v!r} must be 4 ints giving a non-empty box inside "
                f"the {height}x{width} frame",
            )
        return list(box)


# ---- registration: one custom op per public op ------------------------------------------------


def _capsule(t: torch.Tensor):
    return to_dlpack(t)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@dataclass(frozen=True)
class _SelfCheck:
    """The small fixed input a CUDA kernel is checked on (make_inputs(device) -> the op's
    arguments) and the tolerance (rtol, atol) of the comparison with the reference."""

    make_inputs: Callable[[torch.device], tuple]
    tolerance: tuple[float, float]


_REFERENCE_KERNELS: dict[str, Callable] = {}
_NATIVE_KERNELS: dict[str, dict[str, Callable]] = {}  # op -> {"cpu": ..., "cuda": ...}
_SELF_CHECKS: dict[str, _SelfCheck] = {}


def _reference_kernel(op: str, ref: Callable) -> Callable:
    """The reference as the kernel for any device no native kernel serves, warning once why."""

    def kernel(*args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if not _native.HAS_NATIVE:
            reason = _native.IMPORT_ERROR or "no native module"
        elif device.type == "cuda":
            reason = "furl_fast was built without CUDA kernels"
        else:
            reason = f"no native kernel for device type {device.type!r}"
        _native.warn_fallback(op, reason)
        return ref(*args)

    return kernel


def cuda_kernel_usable(op: str, device: torch.device) -> bool:
    """Whether op's CUDA kernel runs on device: the runtime is usable and the kernel passed its
    self-check; otherwise (after one warning) the reference is used."""
    status = _native.cuda_status()
    if not status.usable:
        _native.warn_fallback(op, f"CUDA kernels unusable: {status.reason}")
        return False
    if _native.kernel_check(op) is None and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"furl_fast.ops.{op}: the first CUDA call of an op in a process checks its kernel "
            "against the reference, which cannot run during CUDA graph capture; call the op once "
            "before capturing (torch.compile's CUDA graphs warm up before they capture)."
        )
    check = _SELF_CHECKS[op]
    return _native.kernel_trusted(op, _NATIVE_KERNELS[op]["cuda"], _REFERENCE_KERNELS[op],
                                  check.make_inputs, device, check.tolerance)


def _guarded_cuda(op: str) -> Callable:
    def kernel(*args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if cuda_kernel_usable(op, device):
            return _NATIVE_KERNELS[op]["cuda"](*args)
        return _REFERENCE_KERNELS[op](*args)

    return kernel


def _native_call(op: str, out: torch.Tensor, *args: Any, num_threads: int) -> torch.Tensor:
    """_C.<op>_cpu(*args, num_threads) or _C.<op>_cuda(*args, stream) on the current stream."""
    if out.device.type == "cpu":
        getattr(_native._C, f"{op}_cpu")(*args, num_threads)
    else:
        getattr(_native._C, f"{op}_cuda")(*args, _stream(out.device))
    return out


def _gen() -> torch.Generator:
    """Self-check inputs are made on the CPU from a fixed seed, then moved: the same on every GPU."""
    return torch.Generator().manual_seed(0)


# ---- preprocess_frames ----------------------------------------------------------------------


def centre_square_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """The centred square crop box (top, left, side, side) of an H x W frame.

    Resizing this box to S x S equals open_clip's "resize the shortest side to S, then centre-crop
    S x S" exactly for square frames, and up to a sub-pixel shift of the sampling grid otherwise.
    """
    side = min(height, width)
    return ((height - side) // 2, (width - side) // 2, side, side)


@torch.library.custom_op("furl_fast::preprocess_frames", mutates_args=())
def _preprocess_op(frames: torch.Tensor, crop: list[int], size: int, flip_vertical: bool, bgr: bool,
                   mean: list[float], std: list[float], out_dtype: torch.dtype,
                   interpolation: str, num_threads: int) -> torch.Tensor:
    return _preprocess_default(frames, crop, size, flip_vertical, bgr, mean, std, out_dtype,
                               interpolation, num_threads)


def _preprocess_ref(frames, crop, size, flip_vertical, bgr, mean, std, out_dtype, interpolation,
                    num_threads):
    return reference.preprocess_frames(
        frames, size=size, crop=tuple(crop), flip_vertical=flip_vertical, bgr=bgr,
        mean=tuple(mean), std=tuple(std), out_dtype=out_dtype, interpolation=interpolation)


def _preprocess_native(frames, crop, size, flip_vertical, bgr, mean, std, out_dtype, interpolation,
                       num_threads):
    frames = frames.contiguous()
    out = torch.empty((frames.shape[0], 3, size, size), dtype=out_dtype, device=frames.device)
    return _native_call("preprocess_frames", out, _capsule(frames), _capsule(out), tuple(crop), size,
                        flip_vertical, bgr, _INTERPOLATIONS[interpolation], tuple(mean), tuple(std),
                        num_threads=num_threads)


_preprocess_default = _reference_kernel("preprocess_frames", _preprocess_ref)


@_preprocess_op.register_fake
def _(frames, crop, size, flip_vertical, bgr, mean, std, out_dtype, interpolation, num_threads):
    return frames.new_empty((frames.shape[0], 3, size, size), dtype=out_dtype)


def _preprocess_check_inputs(device):
    frames = torch.randint(0, 256, (2, 37, 29, 3), dtype=torch.uint8, generator=_gen())
    return (frames.to(device), [3, 2, 30, 25], 16, True, False, list(CLIP_MEAN), list(CLIP_STD),
            torch.float32, "bicubic", 0)


_PREPROCESS = Spec(
    "preprocess_frames",
    TensorArg("frames", ("N H W 3",), (torch.uint8,)),
    Int("size", 1, "max_preprocess_size"),
    Box("crop"),
    Floats("mean", 3),
    Floats("std", 3, nonzero=True),
    Choice("out_dtype", _FLOAT_DTYPES, TypeError),
    Choice("interpolation", tuple(_INTERPOLATIONS)),
    _THREADS,
)


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
    frames, size, box, mean, std, out_dtype, interpolation, threads = _PREPROCESS.check(
        frames=frames, size=size, crop=crop, mean=mean, std=std, out_dtype=out_dtype,
        interpolation=interpolation, num_threads=num_threads)
    return _preprocess_op(frames, box, size, bool(flip_vertical), bool(bgr), list(mean), list(std),
                          out_dtype, interpolation, threads or 0)



# ---- Reward heads -------------------------------------------------------------------------------
# Embeddings (emb / img_emb) may be float32, float16 or bfloat16 and are read in place; every other
# tensor (weights, targets, text / goal / baseline embeddings) may be any floating dtype and is used
# as float32 (converted once per call: they are small). Native kernels accumulate in float32 and
# return float32. Zero vectors have cosine 0 (see reference.NORM_EPS); NaN inputs propagate.


@torch.library.custom_op("furl_fast::mlp_cosine_reward", mutates_args=())
def _mlp_op(emb: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, target: torch.Tensor, num_threads: int) -> torch.Tensor:
    return _mlp_default(emb, w1, b1, w2, b2, target, num_threads)


def _mlp_ref(emb, w1, b1, w2, b2, target, num_threads):
    return reference.mlp_cosine_reward(emb, w1, b1, w2, b2, target)


def _mlp_native(emb, w1, b1, w2, b2, target, num_threads):
    out = torch.empty((emb.shape[0], target.shape[0]), dtype=torch.float32, device=emb.device)
    return _native_call("mlp_cosine_reward", out, _capsule(emb.contiguous()), _capsule(_f32(w1)),
                        _capsule(_f32(b1)), _capsule(_f32(w2)), _capsule(_f32(b2)),
                        _capsule(_f32(target)), _capsule(out), num_threads=num_threads)


_mlp_default = _reference_kernel("mlp_cosine_reward", _mlp_ref)


@_mlp_op.register_fake
def _(emb, w1, b1, w2, b2, target, num_threads):
    return emb.new_empty((emb.shape[0], target.shape[0]), dtype=torch.float32)


def _mlp_check_inputs(device):
    g = _gen()
    ts = (torch.randn(37, 48, generator=g), torch.randn(48, 70, generator=g) / 7,
          torch.randn(70, generator=g) / 10, torch.randn(70, 20, generator=g) / 8,
          torch.randn(20, generator=g) / 10, torch.randn(3, 20, generator=g))
    return (*(t.to(device) for t in ts), 0)


_MLP = Spec(
    "mlp_cosine_reward",
    TensorArg("emb", ("N D",)),
    TensorArg("w1", ("D H",), _ANY_FLOAT),
    TensorArg("b1", ("H",), _ANY_FLOAT),
    TensorArg("w2", ("H P",), _ANY_FLOAT),
    TensorArg("b2", ("P",), _ANY_FLOAT),
    TensorArg("target", ("P", "K P"), _ANY_FLOAT),
    _THREADS,
)


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
    emb, w1, b1, w2, b2, target, threads = _MLP.check(
        emb=emb, w1=w1, b1=b1, w2=w2, b2=b2, target=target, num_threads=num_threads)
    out = _mlp_op(emb, w1, b1, w2, b2, target.reshape(-1, target.shape[-1]), threads or 0)
    return out if target.dim() == 2 else out.reshape(-1)


def _text_check_inputs(device):
    g = _gen()
    return torch.randn(37, 40, generator=g).to(device), torch.randn(11, 40, generator=g).to(device)


@torch.library.custom_op("furl_fast::clip_similarity", mutates_args=())
def _clip_op(img_emb: torch.Tensor, text_emb: torch.Tensor, normalize: bool,
             num_threads: int) -> torch.Tensor:
    return _clip_default(img_emb, text_emb, normalize, num_threads)


def _clip_ref(img_emb, text_emb, normalize, num_threads):
    return reference.clip_similarity(img_emb, text_emb, normalize=normalize)


def _clip_native(img_emb, text_emb, normalize, num_threads):
    out = torch.empty((img_emb.shape[0], text_emb.shape[0]), dtype=torch.float32,
                      device=img_emb.device)
    return _native_call("clip_similarity", out, _capsule(img_emb.contiguous()),
                        _capsule(_f32(text_emb)), _capsule(out), normalize, num_threads=num_threads)


_clip_default = _reference_kernel("clip_similarity", _clip_ref)


@_clip_op.register_fake
def _(img_emb, text_emb, normalize, num_threads):
    return img_emb.new_empty((img_emb.shape[0], text_emb.shape[0]), dtype=torch.float32)


_CLIP = Spec(
    "clip_similarity",
    TensorArg("img_emb", ("N D",)),
    TensorArg("text_emb", ("K D",), _ANY_FLOAT),
    _THREADS,
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
    img_emb, text_emb, threads = _CLIP.check(img_emb=img_emb, text_emb=text_emb,
                                             num_threads=num_threads)
    return _clip_op(img_emb, text_emb, bool(normalize), threads or 0)


@torch.library.custom_op("furl_fast::goal_baseline_reward", mutates_args=())
def _goal_op(img_emb: torch.Tensor, goal_emb: torch.Tensor, baseline_emb: torch.Tensor,
             alpha: float, num_threads: int) -> torch.Tensor:
    return _goal_default(img_emb, goal_emb, baseline_emb, alpha, num_threads)


def _goal_ref(img_emb, goal_emb, baseline_emb, alpha, num_threads):
    return reference.goal_baseline_reward(img_emb, goal_emb, baseline_emb, alpha)


def _goal_native(img_emb, goal_emb, baseline_emb, alpha, num_threads):
    out = torch.empty((img_emb.shape[0],), dtype=torch.float32, device=img_emb.device)
    return _native_call("goal_baseline_reward", out, _capsule(img_emb.contiguous()),
                        _capsule(_f32(goal_emb)), _capsule(_f32(baseline_emb)), _capsule(out),
                        alpha, num_threads=num_threads)


_goal_default = _reference_kernel("goal_baseline_reward", _goal_ref)


@_goal_op.register_fake
def _(img_emb, goal_emb, baseline_emb, alpha, num_threads):
    return img_emb.new_empty((img_emb.shape[0],), dtype=torch.float32)


def _goal_check_inputs(device):
    img, text = _text_check_inputs(device)
    return img, text[0] / 8, text[1] / 8, 0.3, 0


_GOAL = Spec(
    "goal_baseline_reward",
    TensorArg("img_emb", ("N D",)),
    TensorArg("goal_emb", ("D",), _ANY_FLOAT),
    TensorArg("baseline_emb", ("D",), _ANY_FLOAT),
    Real("alpha", 0.0, 1.0),
    _THREADS,
)


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
    img_emb, goal_emb, baseline_emb, alpha, threads = _GOAL.check(
        img_emb=img_emb, goal_emb=goal_emb, baseline_emb=baseline_emb, alpha=alpha,
        num_threads=num_threads)
    return _goal_op(img_emb, goal_emb, baseline_emb, alpha, threads or 0)


@torch.library.custom_op("furl_fast::softmax_goal_reward", mutates_args=())
def _softmax_op(img_emb: torch.Tensor, text_emb: torch.Tensor, goal_index: int, temperature: float,
                threshold: float | None, num_threads: int) -> torch.Tensor:
    return _softmax_default(img_emb, text_emb, goal_index, temperature, threshold, num_threads)


def _softmax_ref(img_emb, text_emb, goal_index, temperature, threshold, num_threads):
    return reference.softmax_goal_reward(img_emb, text_emb, goal_index, temperature=temperature,
                                         threshold=threshold)


def _softmax_native(img_emb, text_emb, goal_index, temperature, threshold, num_threads):
    out = torch.empty((img_emb.shape[0],), dtype=torch.float32, device=img_emb.device)
    return _native_call("softmax_goal_reward", out, _capsule(img_emb.contiguous()),
                        _capsule(_f32(text_emb)), _capsule(out), goal_index, temperature,
                        threshold, num_threads=num_threads)


_softmax_default = _reference_kernel("softmax_goal_reward", _softmax_ref)


@_softmax_op.register_fake
def _(img_emb, text_emb, goal_index, temperature, threshold, num_threads):
    return img_emb.new_empty((img_emb.shape[0],), dtype=torch.float32)


def _softmax_check_inputs(device):
    img, text = _text_check_inputs(device)
    return img, text, 2, 0.1, None, 0


_SOFTMAX = Spec(
    "softmax_goal_reward",
    TensorArg("img_emb", ("N D",)),
    TensorArg("text_emb", ("K D",), _ANY_FLOAT),
    Int("goal_index", 0, "K"),
    Real("temperature", 0.0, low_open=True),
    Real("threshold", optional=True),
    _THREADS,
)


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
    img_emb, text_emb, goal_index, temperature, threshold, threads = _SOFTMAX.check(
        img_emb=img_emb, text_emb=text_emb, goal_index=goal_index, temperature=temperature,
        threshold=threshold, num_threads=num_threads)
    return _softmax_op(img_emb, text_emb, goal_index, temperature, threshold, threads or 0)


# ---- random_shift (DrQ augmentation; the replay buffer's gather) --------------------------------


@torch.library.custom_op("furl_fast::random_shift", mutates_args=())
def _shift_op(frames: torch.Tensor, shifts: torch.Tensor, pad: int,
              num_threads: int) -> torch.Tensor:
    return _shift_default(frames, shifts, pad, num_threads)


def _shift_ref(frames, shifts, pad, num_threads):
    return reference.random_shift(frames, shifts, pad)


def _shift_native(frames, shifts, pad, num_threads):
    frames = frames.contiguous()
    n = frames.shape[0]
    slots = torch.arange(n, dtype=torch.int64, device=frames.device).view(n, 1)
    out = torch.empty_like(frames)
    # Clamped before the int32 cast, so an int64 shift past 2^31 stays out of range (not wrapped).
    shifts = shifts.clamp(-(2**31), 2**31 - 1).to(torch.int32).contiguous()
    return _native_call("random_shift", out, _capsule(frames), _capsule(slots), _capsule(shifts),
                        _capsule(out), pad, num_threads=num_threads)


_shift_default = _reference_kernel("random_shift", _shift_ref)


@_shift_op.register_fake
def _(frames, shifts, pad, num_threads):
    return torch.empty_like(frames)


def _shift_check_inputs(device):
    g = _gen()
    frames = torch.randint(0, 256, (5, 3, 13, 11), dtype=torch.uint8, generator=g)
    shifts = torch.randint(0, 7, (5, 2), dtype=torch.int32, generator=g)
    return frames.to(device), shifts.to(device), 3, 0


_SHIFT = Spec(
    "random_shift",
    TensorArg("frames", ("N C H W",), (torch.uint8,)),
    TensorArg("shifts", ("N 2",), (torch.int32, torch.int64)),
    Int("pad", 0, "max_shift_pad"),
    _THREADS,
)


def random_shift(
    frames: torch.Tensor, shifts: torch.Tensor, pad: int = 4, *, num_threads: int | None = None
) -> torch.Tensor:
    """DrQ's random shift with given integer shifts: frames replicate-padded by `pad`, then cropped
    back to H x W at offset (y, x) = (shifts[n, 1], shifts[n, 0]).

    frames: (N, C, H, W) uint8; shifts: (N, 2) int32/int64 (x, y), each in [0, 2 * pad] (the CPU
    kernel raises ValueError otherwise; the CUDA kernel, which cannot look without a sync, clamps).
    Returns (N, C, H, W) uint8. The replay buffer's sample() applies the same shift while it gathers.
    Equivalent: reference.random_shift.
    """
    frames, shifts, pad, threads = _SHIFT.check(frames=frames, shifts=shifts, pad=pad,
                                                num_threads=num_threads)
    return _shift_op(frames, shifts, pad, threads or 0)


# ---- native kernels and self-checks --------------------------------------------------------------

_KERNELS = [  # (op, custom op, reference kernel, native kernel, self-check)
    ("preprocess_frames", _preprocess_op, _preprocess_ref, _preprocess_native,
     _SelfCheck(_preprocess_check_inputs, (1e-4, 1e-4))),
    ("mlp_cosine_reward", _mlp_op, _mlp_ref, _mlp_native,
     _SelfCheck(_mlp_check_inputs, (1e-4, 1e-5))),
    ("clip_similarity", _clip_op, _clip_ref, _clip_native,
     _SelfCheck(lambda d: (*_text_check_inputs(d), True, 0), (1e-4, 1e-5))),
    ("goal_baseline_reward", _goal_op, _goal_ref, _goal_native,
     _SelfCheck(_goal_check_inputs, (1e-4, 1e-5))),
    ("softmax_goal_reward", _softmax_op, _softmax_ref, _softmax_native,
     _SelfCheck(_softmax_check_inputs, (1e-4, 1e-5))),
    ("random_shift", _shift_op, _shift_ref, _shift_native, _SelfCheck(_shift_check_inputs, (0, 0))),
]

OPS: dict[str, Any] = {}
"""Every custom op by name (torch.ops.furl_fast.<name> is the same op)."""

for _name, _op, _ref, _nat, _check in _KERNELS:
    OPS[_name] = _op
    _REFERENCE_KERNELS[_name] = _ref
    _SELF_CHECKS[_name] = _check
    if _native.HAS_NATIVE:
        _NATIVE_KERNELS[_name] = {"cpu": _nat}
        _op.register_kernel("cpu")(_nat)
        if _native.HAS_CUDA_KERNELS:
            _NATIVE_KERNELS[_name]["cuda"] = _nat
            _op.register_kernel("cuda")(_guarded_cuda(_name))
del _KERNELS, _name, _op, _ref, _nat, _check


def self_check_inputs(op: str, device: torch.device | str) -> tuple:
    """The fixed small input op's CUDA kernel is checked on (the op's arguments)."""
    return _SELF_CHECKS[op].make_inputs(torch.device(device))


def selftest() -> list[dict[str, Any]]:
    """Runs the self-check of every op's CUDA kernel now (on the current CUDA device): one row per
    op with its state (verified / fell back / error / skipped) and the error, if any."""
    status = _native.cuda_status()
    rows = []
    for op in OPS:
        if not status.usable:
            rows.append({"op": op, "state": "skipped", "device": None, "error": status.reason})
            continue
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            cuda_kernel_usable(op, device)
        except RuntimeError:  # strict mode: the table still lists it
            pass
        c = _native.kernel_checks()[op]
        rows.append({"op": op, "state": c.state, "device": c.device, "error": c.error})
    return rows
