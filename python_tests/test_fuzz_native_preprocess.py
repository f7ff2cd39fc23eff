"""Fuzzing preprocess_frames_cpu and the public preprocess_frames, and the regressions found there
(see test_fuzz_native.py for the rules)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from torch.utils.dlpack import to_dlpack

from fuzz_strategies import (  # python_tests/ is on sys.path
    Arg,
    C,
    FLOATS,
    FUZZ,
    HUGE,
    as_f32,
    call,
    expect,
    preprocess_case,
)

from furl_fast import _native, ops, reference

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


def _preprocess_example(frames: torch.Tensor, crop: tuple[int, ...]) -> tuple:
    """A preprocess_case() value: these frames and crop, size 4, valid everything else."""
    out = torch.empty(frames.shape[0], 3, 4, 4)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 1.0)
    flags = (False, False)
    return Arg(to_dlpack(frames), frames), Arg(to_dlpack(out), out), crop, 4, flags, 0, mean, std, 1


@FUZZ
@given(preprocess_case())
# Found by the fuzzer under UBSan: top + height overflowed int64 in the crop check, and the sizes
# of an empty view such as (0, 2^40, 2^40, 3) overflowed int64 when multiplied.
@example(_preprocess_example(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), (23, 0, 2**63 - 1, 1)))
@example(
    _preprocess_example(torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(0, HUGE, HUGE, 3),
                        (0, 0, 1, 1))
)  # fmt: skip
def test_preprocess_frames_cpu(case):
    frames, out, crop, size, (flip, bgr), interp, mean, std, threads = case
    f = frames.tensor
    valid = (
        f is not None
        and f.dim() == 4
        and frames.ok((f.shape[0], f.shape[1], f.shape[2], 3), (torch.uint8,))
        and 1 <= size <= 8192
        and out.ok((f.shape[0], 3, size, size), FLOATS, output=True)
        and crop[2] >= 1
        and crop[3] >= 1
        and crop[0] >= 0
        and crop[1] >= 0
        and crop[0] + crop[2] <= f.shape[1]
        and crop[1] + crop[3] <= f.shape[2]
        and interp in (0, 1)
        and all(math.isfinite(as_f32(m)) for m in mean)
        and all(math.isfinite(as_f32(s)) and as_f32(s) != 0 for s in std)
        and all(abs(v) < 2**63 for v in (*crop, size))
    )
    _, exc = call(
        C.preprocess_frames_cpu,
        frames.obj,
        out.obj,
        crop,
        size,
        flip,
        bgr,
        interp,
        mean,
        std,
        threads,
    )
    expect(valid, exc, "preprocess_frames_cpu")
    if valid and mean == (0.5, 0.4, 0.3):
        expected = reference.preprocess_frames(
            f,
            size=size,
            crop=crop,
            flip_vertical=flip,
            bgr=bgr,
            mean=mean,
            std=std,
            out_dtype=torch.float64,
            interpolation=["bilinear", "bicubic"][interp],
        )
        tol = 5e-4 if out.tensor.dtype == torch.float32 else 3e-2  # float16 / bfloat16 rounding
        torch.testing.assert_close(out.tensor.double(), expected, rtol=tol, atol=tol)


def test_empty_tensor_whose_sizes_overflow_int64():
    # tensor_arg multiplied the sizes of (0, 2^40, 2^40, 3) into int64: UB (UBSan).
    frames = torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(0, HUGE, HUGE, 3)
    with pytest.raises(ValueError, match=r"argument 'frames' has a shape whose sizes multiply"):
        C.preprocess_frames_cpu(
            to_dlpack(frames),
            to_dlpack(torch.empty(0, 3, 4, 4)),
            (0, 0, 1, 1),
            4,
            False,
            False,
            0,
            (0.0,) * 3,
            (1.0,) * 3,
            1,
        )


@pytest.mark.parametrize(
    "crop", [(23, 0, 2**63 - 1, 1), (0, 2**62, 1, 2**62), (2**63 - 1, 0, 1, 1)]
)
def test_crop_whose_end_overflows_int64(crop):
    # check_preprocess_args computed top + height: UB (UBSan) for sizes near 2^63.
    frames, out = torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.empty(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"argument 'crop'"):
        C.preprocess_frames_cpu(
            to_dlpack(frames), to_dlpack(out), crop, 4, False, False, 0, (0.0,) * 3, (1.0,) * 3, 1
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"crop": (math.inf, 0, 1, 1)}, ValueError, r"'crop' .* must be 4 ints"),  # OverflowError
        ({"crop": (0.5, 0, 1, 1)}, ValueError, r"'crop' .* must be 4 ints"),  # was truncated to 0
        ({"crop": 5}, ValueError, r"'crop' .* must be 4 ints"),  # TypeError: not iterable
        ({"std": "std"}, ValueError, r"'std' must be 3 finite numbers"),  # pybind11's TypeError
        ({"mean": (0.0, math.nan, 0.0)}, ValueError, r"'mean' must be 3 finite numbers"),
        ({"num_threads": 2**31}, ValueError, r"'num_threads' must be None"),  # pybind11's TypeError
        ({"num_threads": -1}, ValueError, r"'num_threads' must be None"),  # silently all cores
        ({"interpolation": ["bilinear"]}, ValueError, r"'interpolation' must be one of"),
    ],
)
def test_public_preprocess_frames_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.preprocess_frames(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), size=4, **kwargs)
