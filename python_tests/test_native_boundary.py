"""The Python/C++ tensor boundary: the native entry points validate everything themselves, so even a
direct call into furl_fast._C with bad tensors is a Python exception naming the argument."""

from __future__ import annotations

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from furl_fast import _native

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")
needs_cuda_kernels = pytest.mark.skipif(
    not _native.HAS_CUDA_KERNELS, reason="built without CUDA kernels"
)

CLIP = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def call_cpu(frames, out=None, crop=(0, 0, 4, 4), size=8, interpolation=0):
    out = torch.empty(1, 3, size, size) if out is None else out
    f = frames if not isinstance(frames, torch.Tensor) else to_dlpack(frames)
    o = out if not isinstance(out, torch.Tensor) else to_dlpack(out)
    _native._C.preprocess_frames_cpu(f, o, crop, size, False, False, interpolation, CLIP["mean"],
                                     CLIP["std"], 1)


def frames(n=1, h=4, w=4, dtype=torch.uint8):
    return torch.zeros(n, h, w, 3, dtype=dtype)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (frames(dtype=torch.float32), TypeError, r"'frames' must have dtype uint8, got float32"),
        (frames(dtype=torch.int64), TypeError, r"'frames' must have dtype uint8, got int64"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), ValueError, r"'frames' must be a 4-D tensor"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.uint8), ValueError, r"'frames' must have size 3 in dimension 3"),
        (torch.zeros(1, 4, 8, 3, dtype=torch.uint8)[:, :, ::2], ValueError, r"'frames' must be contiguous"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.uint8).transpose(1, 2), ValueError, r"'frames' must be contiguous"),
        (frames(n=0), ValueError, r"'frames' must not be empty"),
        ("not a tensor", TypeError, r"'frames' must be a DLPack capsule"),
    ],
    ids=["float32", "int64", "rank3", "4-channels", "strided", "transposed", "empty", "not-capsule"],
)
def test_bad_frames(bad, error, match):
    with pytest.raises(error, match=match):
        call_cpu(bad)


@pytest.mark.parametrize(
    "out, error, match",
    [
        (torch.empty(1, 3, 8, 8, dtype=torch.float64), TypeError, r"'out' must have dtype float32"),
        (torch.empty(2, 3, 8, 8), ValueError, r"'out' must have size 1 in dimension 0"),
        (torch.empty(1, 3, 8, 7), ValueError, r"'out' must have size 8 in dimension 3"),
        (torch.empty(1, 3, 8, 16)[..., ::2], ValueError, r"'out' must be contiguous"),
        (torch.empty(3, 8, 8), ValueError, r"'out' must be a 4-D tensor"),
    ],
    ids=["float64", "batch", "width", "strided", "rank3"],
)
def test_bad_out(out, error, match):
    with pytest.raises(error, match=match):
        call_cpu(frames(), out=out)


@pytest.mark.parametrize("crop", [(0, 0, 5, 4), (0, 1, 4, 4), (-1, 0, 2, 2), (0, 0, 0, 1)])
def test_crop_outside_frame(crop):
    with pytest.raises(ValueError, match=r"'crop' .* must be a non-empty box inside the 4x4 frame"):
        call_cpu(frames(), crop=crop)


def test_bad_size_and_interpolation():
    with pytest.raises(ValueError, match="'size'"):
        call_cpu(frames(), out=torch.empty(1, 3, 1, 1), size=0)
    with pytest.raises(ValueError, match="'interpolation'"):
        call_cpu(frames(), interpolation=7)


def test_consumed_capsule_is_rejected():
    capsule = to_dlpack(frames())
    torch.utils.dlpack.from_dlpack(capsule)  # the consumer renames it "used_dltensor"
    with pytest.raises(TypeError, match="already consumed"):
        call_cpu(capsule)


def test_versioned_capsule_is_accepted():
    f = frames()
    capsule = f.__dlpack__(max_version=(1, 0))
    call_cpu(capsule)  # no exception: read through the DLPack 1.0 struct


@needs_cuda_kernels
def test_cpu_tensor_to_cuda_entry_point():
    out = torch.empty(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"'frames' must be on the cuda device, got a cpu tensor"):
        _native._C.preprocess_frames_cuda(to_dlpack(frames()), to_dlpack(out), (0, 0, 4, 4), 8, False,
                                          False, 0, CLIP["mean"], CLIP["std"], 0)


@pytest.mark.cuda
def test_mixed_devices_cuda():
    out = torch.empty(1, 3, 8, 8)  # on the CPU while frames are on the GPU
    with pytest.raises(ValueError, match=r"'out' must be on the same device as 'frames'"):
        _native._C.preprocess_frames_cuda(to_dlpack(frames().cuda()), to_dlpack(out), (0, 0, 4, 4), 8,
                                          False, False, 0, CLIP["mean"], CLIP["std"], 0)
