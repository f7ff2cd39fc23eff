"""Fuzzing the native boundary: every entry point of furl_fast._C gets random shapes,
dtypes, strides (non-contiguous, transposed, zero-stride), capsule kinds, sizes 0 and huge, NaN/inf
values; the replay buffer gets random call sequences with save/load and damaged files.

Every input must end in a result or a Python exception, never a crash. Each test also states which
inputs are valid, independently of the C++ checks: a valid input must succeed (and match
furl_fast.reference where that is cheap), an invalid one must raise TypeError / ValueError with a
sentence naming the op. Under .ci/sanitize (ASan + UBSan) a memory error or undefined behaviour
aborts the run as well.

Budget: FURL_FAST_FUZZ_EXAMPLES examples per test (default 25; .ci/sanitize runs 300). Inputs that
once broke something are kept: as @example cases, as the named regression tests at the end, and
as damaged replay files in python_tests/fuzz_corpus/.

This file: the list of entry points (a new binding needs a fuzz test), the CUDA entry points given
CPU tensors, the public ops and the thread limits. Each op's entry points are fuzzed in
test_fuzz_native_<op>.py, with the shared strategies in fuzz_strategies.py.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils.dlpack import to_dlpack

from fuzz_strategies import (  # python_tests/ is on sys.path
    C,
    FLOATS,
    FUZZ,
    INTS,
    REPLAY_METHODS,
    SEEDS,
    arg,
    call,
    moderate,
    preprocess_case,
    reward_case,
    values,
)

from furl_fast import _native, ops, reference

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


# ---- the entry points ---------------------------------------------------------------------------

CUDA_ENTRY_POINTS = {
    "preprocess_frames_cuda", "mlp_cosine_reward_cuda", "clip_similarity_cuda",
    "goal_baseline_reward_cuda", "softmax_goal_reward_cuda", "random_shift_cuda",
}  # fmt: skip
FUNCTIONS = {
    "build_info", "limits", "preprocess_frames_cpu", "mlp_cosine_reward_cpu", "clip_similarity_cpu",
    "goal_baseline_reward_cpu", "softmax_goal_reward_cpu", "random_shift_cpu", "replay_columns",
} | (CUDA_ENTRY_POINTS | {"cuda_runtime_info"} if _native.HAS_CUDA_KERNELS else set())  # fmt: skip


def test_every_entry_point_is_fuzzed():
    """The entry points the tests below drive are all there are: a new binding needs a fuzz test.
    (26 with the CUDA kernels: 17 functions and ReplayCore's 9 methods; 18 without.)"""
    names = {n for n in dir(C) if not n.startswith("_") and not n.startswith("Native")}
    assert names == FUNCTIONS | {"ReplayCore"}
    methods = {n for n in vars(C.ReplayCore) if n in ("__init__", "__len__") or n[0] != "_"}
    assert methods == REPLAY_METHODS


def test_build_info():
    info = C.build_info()
    assert set(info) >= {"cuda_compiled", "cpu_threads", "compiler", "sanitizers"}
    assert set(C.limits()) >= {"max_preprocess_size", "max_shift_pad", "max_threads"}


# ---- CUDA entry points given CPU tensors ----------------------------------------------------


@pytest.mark.skipif(not _native.HAS_CUDA_KERNELS, reason="built without CUDA kernels")
@FUZZ
@given(st.data())
def test_cuda_entry_points_refuse_cpu_tensors(data):
    """Whatever else is wrong, CPU tensors never reach a CUDA call: TypeError / ValueError, never
    the RuntimeError of a CUDA error (a machine without a driver raises one for any CUDA call)."""
    draw = data.draw
    name = draw(st.sampled_from(sorted(CUDA_ENTRY_POINTS)))
    if name == "preprocess_frames_cuda":
        frames, out, crop, size, (flip, bgr), interp, mean, std, _ = draw(preprocess_case())
        args = [frames.obj, out.obj, crop, size, flip, bgr, interp, mean, std]
    elif name == "random_shift_cuda":
        gen = torch.Generator().manual_seed(draw(SEEDS))
        ts = [
            values(gen, (5, 3, 4, 4), torch.uint8, "normal"),
            torch.zeros(2, 3, dtype=torch.int64),
            torch.zeros(2, 2, dtype=torch.int32),
            torch.empty(2, 9, 4, 4, dtype=torch.uint8),
        ]
        args = [draw(arg(t)).obj for t in ts] + [draw(INTS)]
    else:
        op = name.removesuffix("_reward_cuda").removesuffix("_cuda")
        tensors, _ = draw(reward_case(op))
        extra = {
            "mlp_cosine": [],
            "clip_similarity": [True],
            "goal_baseline": [0.5],
            "softmax_goal": [0, 0.01, None],
        }[op]
        args = [a.obj for a in tensors] + extra
    _, exc = call(getattr(C, name), *args, draw(st.sampled_from([0, 1, 2**64 - 1])))
    assert exc is not None, f"{name} accepted CPU tensors"


def _cpu(*shape: int, dtype: torch.dtype = torch.float32) -> Any:
    return to_dlpack(torch.zeros(shape, dtype=dtype))


@pytest.mark.skipif(not _native.HAS_CUDA_KERNELS, reason="built without CUDA kernels")
@pytest.mark.parametrize(
    "name, args",
    [
        ("preprocess_frames_cuda", (_cpu(1, 4, 4, 3, dtype=torch.uint8), _cpu(1, 3, 4, 4),
                                    (0, 0, 4, 4), 4, False, False, 0, (0.5,) * 3, (0.5,) * 3)),
        ("mlp_cosine_reward_cuda", (_cpu(2, 3), _cpu(3, 4), _cpu(4), _cpu(4, 5), _cpu(5),
                                    _cpu(1, 5), _cpu(2, 1))),
        ("clip_similarity_cuda", (_cpu(2, 3), _cpu(1, 3), _cpu(2, 1), True)),
        ("goal_baseline_reward_cuda", (_cpu(2, 3), _cpu(3), _cpu(3), _cpu(2), 0.5)),
        ("softmax_goal_reward_cuda", (_cpu(2, 3), _cpu(2, 3), _cpu(2), 0, 0.01, None)),
        ("random_shift_cuda", (_cpu(5, 3, 4, 4, dtype=torch.uint8),
                                       _cpu(2, 3, dtype=torch.int64), _cpu(2, 2, dtype=torch.int32),
                                       _cpu(2, 9, 4, 4, dtype=torch.uint8), 4)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_cuda_entry_points_name_the_device(name, args):
    """Valid tensors, but on the CPU: a ValueError that says so, before any CUDA call."""
    with pytest.raises(ValueError, match=r"must be on the cuda device, got a cpu tensor\."):
        getattr(C, name)(*args, 0)


# ---- the public ops (Python validation in front of the same kernels) ----------------------------


@FUZZ
@given(st.data())
def test_public_ops_validate_or_match_reference(data):
    """furl_fast.ops with fuzzed tensors (any dtype, rank, strides, NaN/inf) and scalar arguments:
    a result equal to the reference on the same inputs, or TypeError / ValueError."""
    draw = data.draw
    gen = torch.Generator().manual_seed(draw(SEEDS))
    name = draw(
        st.sampled_from(
            [
                "preprocess_frames",
                "mlp_cosine_reward",
                "clip_similarity",
                "goal_baseline_reward",
                "softmax_goal_reward",
                "random_shift",
            ]
        )
    )

    def tensor(*shape, dtype=torch.float32):
        a = draw(arg(values(gen, shape, dtype, draw(st.sampled_from(["normal", "special"])))))
        return a.tensor if a.tensor is not None else a.obj

    n, d, k = draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.integers(1, 3))
    threads = draw(st.none() | st.sampled_from([1, 2, 0, -1, 2**31, 1.5]))
    if name == "preprocess_frames":
        h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        kwargs = {
            "size": draw(st.sampled_from([1, 3, 7]) | INTS),
            "crop": draw(
                st.none()
                | st.tuples(INTS, INTS, INTS, INTS)
                | st.sampled_from([(0, 0, 1), "crop", (0.5, 0, 1, 1), (math.inf, 0, 1, 1)])
            ),
            "interpolation": draw(st.sampled_from(["bilinear", "bicubic", "nearest"])),
            "out_dtype": draw(st.sampled_from([*FLOATS, torch.float64])),
            "std": draw(st.sampled_from([(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (1.0,), "std"])),
            "mean": (0.0, 0.0, 0.0),
        }
        args = [tensor(n, h, w, 3, dtype=torch.uint8)]
    elif name == "mlp_cosine_reward":
        h, p = draw(st.integers(1, 12)), draw(st.integers(1, 6))
        args = [
            tensor(n, d),
            tensor(d, h),
            tensor(h),
            tensor(h, p),
            tensor(p),
            tensor(*draw(st.sampled_from([(p,), (k, p)]))),
        ]
        kwargs = {}
    elif name == "clip_similarity":
        args, kwargs = [tensor(n, d), tensor(k, d)], {"normalize": draw(st.booleans())}
    elif name == "goal_baseline_reward":
        args = [
            tensor(n, d),
            tensor(d),
            tensor(d),
            draw(st.sampled_from([0.5, 1, -1, math.nan, "a"])),
        ]
        kwargs = {}
    elif name == "random_shift":
        c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
        pad = draw(st.sampled_from([0, 1, 4, 50]) | INTS)
        shifts = torch.randint(0, 2 * pad + 1 if 0 <= pad < 2**20 else 9, (n, 2), generator=gen)
        args = [tensor(n, c, h, w, dtype=torch.uint8),
                draw(st.sampled_from([shifts, shifts.int(), shifts + 100, shifts.float()])), pad]
        kwargs = {}
    else:
        args = [tensor(n, d), tensor(k, d), draw(INTS)]
        kwargs = {
            "temperature": draw(st.sampled_from([0.01, 1.0, 0.0, math.nan, math.inf])),
            "threshold": draw(st.sampled_from([None, 0.5, math.nan])),
        }
    try:
        result, exc = call(getattr(ops, name), *args, num_threads=threads, **kwargs)
    except RuntimeError as e:  # torch cannot allocate a huge output or contiguous copy
        assert re.search(r"can't allocate memory|Storage size calculation overflowed", str(e)), e
        return
    if exc is not None:
        return
    ref_args = [
        a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    ]
    if name == "preprocess_frames":
        kwargs["out_dtype"] = torch.float64
    if not all(moderate(a) for a in ref_args if isinstance(a, torch.Tensor)):
        return  # NaN / inf: no crash is the property; the arithmetic is the reference tests' job
    expected = getattr(reference, name)(*ref_args, **kwargs)
    tol = 5e-2 if name == "preprocess_frames" or args[0].dtype != torch.float32 else 1e-3
    torch.testing.assert_close(result.double(), expected.double(), rtol=tol, atol=tol * 10)


NO_THREADS_SCRIPT = """
import resource, torch
from furl_fast import ops
frames = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
emb = torch.randn(4099, 64)
expected = ops.preprocess_frames(frames, size=256, num_threads=1), ops.clip_similarity(emb, emb[:3])
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
# 128 MiB more address space: room for the outputs, not for the 8 MiB stacks of 256 threads.
resource.setrlimit(resource.RLIMIT_AS, (vm + (128 << 20), resource.RLIM_INFINITY))
got = ops.preprocess_frames(frames, size=256, num_threads=1000), ops.clip_similarity(emb, emb[:3])
print(all(torch.equal(a, b) for a, b in zip(got, expected)))
"""


@pytest.mark.skipif(
    "address" in C.build_info()["sanitizers"],
    reason="ASan reserves terabytes of address space: no RLIMIT_AS can apply",
)
def test_ops_run_on_when_no_thread_can_be_started():
    # parallel_for let the std::system_error of a thread that could not start unwind past joinable
    # threads: std::terminate, the process aborted. (HelperPool's constructor freed the pool under
    # the helpers already started.) Now the caller runs the chunks that got no thread.
    result = subprocess.run(
        [sys.executable, "-c", NO_THREADS_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
