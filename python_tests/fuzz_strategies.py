"""Shared by the fuzz tests of the native boundary (python_tests/test_fuzz_native*.py): the
hypothesis profile, random tensors and DLPack capsules with every kind of defect (Arg / arg), the
case strategies of each op, and the helpers that check an entry point's outcome.

Budget: FURL_FAST_FUZZ_EXAMPLES examples per test (default 25; .ci/sanitize runs 300).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch.utils.dlpack import to_dlpack

from furl_fast import _native

C = _native._C

EXAMPLES = int(os.environ.get("FURL_FAST_FUZZ_EXAMPLES", "25"))
# deadline=None: a sanitizer build runs several times slower, and timing is not what is tested.
settings.register_profile(
    "furl_fast_fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("furl_fast_fuzz")
CORPUS = Path(__file__).parent / "fuzz_corpus"

HUGE = 2**40  # elements: no machine holds such a tensor, so it can only be empty or a view
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
          *FLOATS, torch.float64, torch.complex64)  # fmt: skip
# Scalars at the edges of the C++ types they are converted to (int, int64_t, float).
INTS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, -(2**31), -(2**63)]),
)
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e38, 1e300, -1e300]
THREADS = st.sampled_from([0, 1, 2, 3, -1, 2**31 - 1])
SEEDS = st.integers(0, 2**32 - 1)


# ---- random arguments ---------------------------------------------------------------------------


class Arg(NamedTuple):
    obj: Any  # what the entry point receives
    tensor: torch.Tensor | None  # the tensor behind a capsule (None: not a usable capsule)
    read_only: bool = False

    def ok(
        self, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], output: bool = False
    ) -> bool:
        """The contract of every tensor argument: this exact shape, an allowed dtype, contiguous,
        non-empty, aligned, and writable when written to."""
        t = self.tensor
        return (
            t is not None
            and tuple(t.shape) == tuple(shape)
            and t.dtype in dtypes
            and t.is_contiguous()
            and t.numel() > 0
            and t.data_ptr() % t.element_size() == 0
            and not (output and self.read_only)
        )


def values(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, mode: str
) -> torch.Tensor:
    """Random contents: 'normal' (moderate floats / small ints), 'special' (with NaN, inf, huge and
    tiny values sprinkled in) or 'zeros'."""
    if mode == "zeros" or dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype) if mode == "zeros" else torch.rand(shape) < 0.5
    if not (dtype.is_floating_point or dtype.is_complex):
        hi = 256 if dtype == torch.uint8 else 100
        return torch.randint(0, hi, shape, generator=gen).to(dtype)
    scale = [0.01, 1.0, 10.0][int(torch.randint(0, 3, (1,), generator=gen))]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if mode == "special" and x.numel():
        picks = torch.randint(0, len(SPECIAL_FLOATS), (x.numel(),), generator=gen)
        hit = torch.rand(x.numel(), generator=gen) < 0.3
        flat = x.view(-1)
        flat[hit] = torch.tensor(SPECIAL_FLOATS, dtype=torch.float64)[picks[hit]]
    return x.to(dtype)


MUTATIONS = (
    "plain", "plain", "plain", "plain", "plain", "offset", "versioned", "read_only", "unaligned",
    "dtype", "rank", "rank9", "size", "empty", "empty_huge", "strided", "transposed", "expanded",
    "expanded_huge", "consumed", "junk",
)  # fmt: skip


@st.composite
def arg(draw, t: torch.Tensor, *, mutate: bool = True) -> Arg:
    """A DLPack capsule of `t` (the valid argument), or often something off in one way."""
    kind = draw(st.sampled_from(MUTATIONS)) if mutate else "plain"
    shape = tuple(t.shape)
    if kind == "offset":  # a contiguous view that starts inside a larger buffer: valid
        base = torch.empty(t.numel() + 3, dtype=t.dtype)
        t = base[3:].view(shape).copy_(t)
    elif kind == "versioned":
        return Arg(t.__dlpack__(max_version=(1, 0)), t)
    elif kind == "read_only" and t.dtype != torch.bfloat16:  # numpy has no bfloat16
        a = t.numpy().copy()
        a.flags.writeable = False
        return Arg(a.__dlpack__(max_version=(1, 0)), torch.from_numpy(a.copy()), read_only=True)
    elif kind == "unaligned" and t.dtype != torch.bfloat16:
        itemsize = t.element_size()
        raw = np.zeros(t.numel() * itemsize + 1, np.uint8)
        a = np.frombuffer(raw, dtype=t.numpy().dtype, offset=1, count=t.numel()).reshape(shape)
        return Arg(a.__dlpack__(max_version=(1, 0)), torch.from_numpy(a))
    elif kind == "dtype":
        t = t.to(draw(st.sampled_from(DTYPES)))
    elif kind == "rank":
        t = t.unsqueeze(0) if draw(st.booleans()) or t.dim() == 0 else t.reshape(-1)[:1].squeeze()
    elif kind == "rank9":
        t = t.reshape((1,) * 9 + shape)
    elif kind == "size" and t.dim():
        dims = list(shape)
        dims[draw(st.integers(0, t.dim() - 1))] = draw(st.sampled_from([0, 1, 2, 3, 5, 97]))
        t = torch.zeros(dims, dtype=t.dtype)
    elif kind == "empty":
        t = torch.zeros((0, *shape[1:]), dtype=t.dtype)
    elif kind == "empty_huge" and t.dim():
        # The product of the other dimensions overflows int64 (2^40 * 2^40 * ...); torch builds
        # such a view when the zero comes first (it multiplies from the left, checking overflow).
        huge = [HUGE] * t.dim()
        huge[draw(st.integers(0, min(1, t.dim() - 1)))] = 0
        t = torch.zeros((1,) * t.dim(), dtype=t.dtype).expand(huge)
    elif kind == "strided" and t.dim():  # every other element along one dimension
        d = draw(st.integers(0, t.dim() - 1))
        wide, step = list(shape), [slice(None)] * t.dim()
        wide[d], step[d] = 2 * shape[d], slice(None, None, 2)
        t = torch.zeros(wide, dtype=t.dtype)[tuple(step)].copy_(t)
    elif kind == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    elif kind == "expanded" and t.dim():
        t = t.reshape(-1)[:1].reshape((1,) * t.dim()).expand(shape) if t.numel() else t
    elif kind == "expanded_huge" and t.dim():
        rest = math.prod(shape[1:])
        t = torch.zeros((1,) * t.dim(), dtype=t.dtype).expand((2**60 // max(rest, 1), *shape[1:]))
    elif kind == "consumed":
        capsule = to_dlpack(t)
        torch.from_dlpack(capsule)
        return Arg(capsule, None)
    elif kind == "junk":
        return Arg(
            draw(st.sampled_from([None, 0, 1.5, "tensor", (1, 2)])) if draw(st.booleans()) else t,
            None,
        )
    return Arg(to_dlpack(t), t)


def call(fn, *args, **kwargs) -> tuple[Any, BaseException | None]:
    """Runs one entry point; returns (result, None) or (None, the exception), checking that an
    exception is one the boundary may raise and, when the native checks raised it, a sentence
    that starts with the op's name."""
    try:
        return fn(*args, **kwargs), None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, (C.NativeTypeError, C.NativeValueError)):
            msg = str(exc)
            assert re.fullmatch(r"[\w.]+: .{10,}\.", msg, re.DOTALL), f"not a sentence: {msg!r}"
        return None, exc


def expect(valid: bool, exc: BaseException | None, what: str) -> None:
    if valid:
        assert exc is None, f"{what}: a valid input was rejected: {exc!r}"
    else:
        assert exc is not None, f"{what}: an invalid input was accepted"


def as_f32(value: float) -> float:
    """What a C++ float parameter receives."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def moderate(*ts: torch.Tensor) -> bool:
    """No NaN, inf or value large enough to overflow float32 arithmetic: the reference comparisons
    need these; for the rest, no crash and the right shape is what is tested."""
    return all(bool((t.double().abs() < 1e6).all()) for t in ts)


# The methods of ReplayCore (test_fuzz_native.py checks that these are all there are).
REPLAY_METHODS = {
    "__init__", "__len__", "episode_open", "truncate_episode", "start_episode", "add", "add_batch",
    "sample", "earlier",
}  # fmt: skip


# ---- per-op cases ------------------------------------------------------------------------------


@st.composite
def preprocess_case(draw):
    gen = torch.Generator().manual_seed(draw(SEEDS))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    size = draw(st.sampled_from([1, 2, 3, 7, 16]) | INTS if draw(st.booleans()) else st.just(4))
    if draw(st.booleans()):
        top, left = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        crop = (top, left, draw(st.integers(1, h - top)), draw(st.integers(1, w - left)))
    else:
        crop = tuple(draw(INTS) for _ in range(4))
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 1.0)
    if draw(st.integers(0, 4)) == 0:
        mean = tuple(draw(st.sampled_from([0.0, *SPECIAL_FLOATS])) for _ in range(3))
        std = tuple(draw(st.sampled_from([1.0, *SPECIAL_FLOATS])) for _ in range(3))
    out_dtype = draw(st.sampled_from(FLOATS))
    out_size = size if 1 <= size <= 16 else 2
    frames = draw(arg(values(gen, (n, h, w, 3), torch.uint8, "normal")))
    out = draw(arg(torch.empty(n, 3, out_size, out_size, dtype=out_dtype)))
    interp = draw(st.sampled_from([0, 1, 0, 1, -1, 2]))
    flags = (draw(st.booleans()), draw(st.booleans()))
    return frames, out, crop, size, flags, interp, mean, std, draw(THREADS)


@st.composite
def reward_case(draw, op: str):
    """Valid tensors for one reward head (values maybe NaN/inf), each then maybe mutated."""
    gen = torch.Generator().manual_seed(draw(SEEDS))
    n, d, k = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["normal", "normal", "normal", "special", "zeros"]))
    emb_dtype = draw(st.sampled_from(FLOATS))

    def f32(*shape):
        return values(gen, shape, torch.float32, mode if draw(st.booleans()) else "normal")

    emb = values(gen, (n, d), emb_dtype, mode)
    if op == "mlp_cosine":
        h, p = draw(st.integers(1, 40)), draw(st.integers(1, 20))
        ts = [emb, f32(d, h), f32(h), f32(h, p), f32(p), f32(k, p), torch.empty(n, k)]
    elif op == "goal_baseline":
        ts = [emb, f32(d), f32(d), torch.empty(n)]
    else:
        ts = [emb, f32(k, d), torch.empty(n, k) if op == "clip_similarity" else torch.empty(n)]
    mutate = draw(st.booleans())
    return [draw(arg(t, mutate=mutate)) for t in ts], draw(THREADS)
