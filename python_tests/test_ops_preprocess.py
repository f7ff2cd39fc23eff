from __future__ import annotations

import numpy as np
import pytest
import torch

from furl_fast import ops, reference

SIZES = [(1, 1), (3, 5), (97, 131), (256, 256), (480, 640)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (flip_vertical, bgr, random crop): each option on and off, and each pair of options together.
OPTIONS = [(False, False, False), (True, False, True), (False, True, True), (True, True, False)]


def random_frames(gen, n, h, w, device="cpu"):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen).to(device)


def random_crop(gen, h, w):
    top = int(torch.randint(0, h, (1,), generator=gen))
    left = int(torch.randint(0, w, (1,), generator=gen))
    height = int(torch.randint(1, h - top + 1, (1,), generator=gen))
    width = int(torch.randint(1, w - left + 1, (1,), generator=gen))
    return (top, left, height, width)


def check_against_reference(frames, out_dtype, **kwargs):
    got = ops.preprocess_frames(frames, out_dtype=out_dtype, **kwargs)
    assert got.shape == (frames.shape[0], 3, kwargs.get("size", 224), kwargs.get("size", 224))
    assert got.dtype == out_dtype and got.device == frames.device
    # Error against a float64 oracle at most 2x the reference's own error in out_dtype, float32
    # included: ATen computes source coordinates in float32 on some versions (bicubic always, bilinear
    # in torch 2.14), and that rounding moves the weights enough (measured: torch's own float32 resize
    # is up to 5e-5 off float64 in normalised units) that two equally accurate float32 paths differ by
    # more than assert_close's atol.
    exact = reference.preprocess_frames(frames.cpu(), out_dtype=torch.float64, **kwargs)
    ref = reference.preprocess_frames(frames, out_dtype=out_dtype, **kwargs)
    err_native = (got.cpu().double() - exact).abs().max().item()
    err_ref = (ref.cpu().double() - exact).abs().max().item()
    slack = 1e-5 if out_dtype == torch.float32 else 0.0  # assert_close's float32 atol
    assert err_native <= 2 * err_ref + slack, (err_native, err_ref)


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_matches_reference_cpu(gen, hw, out_dtype, interpolation):
    h, w = hw
    frames = random_frames(gen, 2, h, w)
    for flip, bgr, crop in OPTIONS:
        box = random_crop(gen, h, w) if crop else None
        size = 224 if (h, w) != (480, 640) else 84  # 84: DrQ's size, a heavier downsample
        check_against_reference(frames, out_dtype, size=size, crop=box, flip_vertical=flip, bgr=bgr,
                                interpolation=interpolation)


def test_furl_pipeline_cpu(gen):
    """FuRL's geometry: 256x256 render, upright flip, crop rows/cols 32:224, bilinear to 224."""
    frames = random_frames(gen, 5, 256, 256)
    got = ops.preprocess_frames(frames, crop=(32, 32, 192, 192), flip_vertical=True)
    mean = torch.tensor(ops.CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(ops.CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)

    def torch_pipeline(dtype):
        x = frames.flip(1)[:, 32:224, 32:224].permute(0, 3, 1, 2).to(dtype)
        x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
        return (x / 255 - mean.to(dtype)) / std.to(dtype)

    # As check_against_reference: within 2x torch's own float32 error against float64 (+ atol).
    exact = torch_pipeline(torch.float64)
    err_native = (got.double() - exact).abs().max().item()
    err_torch = (torch_pipeline(torch.float32).double() - exact).abs().max().item()
    assert err_native <= 2 * err_torch + 1e-5, (err_native, err_torch)


def test_custom_mean_std_and_threads(gen):
    frames = random_frames(gen, 9, 40, 50)
    kwargs = dict(size=17, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    one = ops.preprocess_frames(frames, num_threads=1, **kwargs)
    many = ops.preprocess_frames(frames, num_threads=4, **kwargs)
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    torch.testing.assert_close(one, reference.preprocess_frames(frames, **kwargs))
    assert 0.0 <= one.min() and one.max() <= 1.0  # mean 0 / std 1 leaves x / 255


def test_non_contiguous_input_is_accepted(gen):
    base = random_frames(gen, 4, 64, 64)
    frames = base[::2]  # non-contiguous view
    torch.testing.assert_close(ops.preprocess_frames(frames, size=32),
                               reference.preprocess_frames(frames, size=32))


def smooth_frames(gen, n, h, w):
    """Photo-like frames: upsampled low-resolution noise (PIL rounds to uint8 between passes, so
    pixel noise would measure rounding, not geometry)."""
    low = torch.rand((n, 3, max(h // 16, 2), max(w // 16, 2)), generator=gen) * 255
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("hw, tol_max, tol_mean", [((256, 256), 0.03, 0.008), ((480, 640), 0.2, 0.03)])
def test_reproduces_open_clip_transform(gen, hw, tol_max, tol_mean):
    """open_clip's eval transform (PIL: resize shortest side, bicubic; centre crop; normalise) on
    PIL images vs preprocess_frames on the tensor. Tolerance, in normalised units (1/255/std ~ 0.015
    per uint8 level): square frames agree to PIL's two uint8-rounded passes (measured: max ~1 level,
    mean ~0.3); non-square frames add the sub-pixel offset of crop-then-resize vs
    resize-then-crop (measured on 480x640: max ~9 levels, mean ~1.1; see ops.centre_square_crop)."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    transform = open_clip.image_transform(224, is_train=False, mean=ops.CLIP_MEAN, std=ops.CLIP_STD)
    frames = smooth_frames(gen, 3, *hw)
    expected = torch.stack([transform(Image.fromarray(f.numpy())) for f in frames])
    got = ops.preprocess_frames(frames, crop=ops.centre_square_crop(*hw), interpolation="bicubic")
    diff = (got - expected).abs()
    assert diff.max().item() <= tol_max, diff.max().item()
    assert diff.mean().item() <= tol_mean, diff.mean().item()


def test_centre_square_crop():
    assert ops.centre_square_crop(256, 256) == (0, 0, 256, 256)
    assert ops.centre_square_crop(480, 640) == (0, 80, 480, 480)
    assert ops.centre_square_crop(7, 4) == (1, 0, 4, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(frames=np.zeros((1, 4, 4, 3), np.uint8)), TypeError, "torch.Tensor"),
        (dict(frames=torch.zeros(1, 4, 4, 3)), TypeError, "uint8"),
        (dict(frames=torch.zeros(4, 4, 3, dtype=torch.uint8)), ValueError, r"\(N, H, W, 3\)"),
        (dict(frames=torch.zeros(1, 4, 4, 4, dtype=torch.uint8)), ValueError, r"\(N, H, W, 3\)"),
        (dict(frames=torch.zeros(0, 4, 4, 3, dtype=torch.uint8)), ValueError, "empty"),
        (dict(crop=(0, 0, 5, 4)), ValueError, "crop"),
        (dict(crop=(-1, 0, 2, 2)), ValueError, "crop"),
        (dict(crop=(0, 0, 0, 2)), ValueError, "crop"),
        (dict(crop=(0, 0, 2)), ValueError, "crop"),
        (dict(size=0), ValueError, "size"),
        (dict(out_dtype=torch.int32), TypeError, "out_dtype"),
        (dict(interpolation="nearest"), ValueError, "interpolation"),
        (dict(std=(1.0, 0.0, 1.0)), ValueError, "std"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"frames": torch.zeros(1, 4, 4, 3, dtype=torch.uint8), **kwargs}
    with pytest.raises(error, match=match):
        ops.preprocess_frames(**kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_matches_reference_cuda(gen, hw, out_dtype, interpolation):
    h, w = hw
    frames = random_frames(gen, 2, h, w, device="cuda")
    for flip, bgr, crop in OPTIONS:
        box = random_crop(gen, h, w) if crop else None
        check_against_reference(frames, out_dtype, size=224, crop=box, flip_vertical=flip, bgr=bgr,
                                interpolation=interpolation)


@pytest.mark.cuda
def test_cuda_runs_on_current_stream(gen):
    frames = random_frames(gen, 8, 256, 256, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = ops.preprocess_frames(frames, crop=(32, 32, 192, 192), flip_vertical=True)
    stream.synchronize()
    torch.testing.assert_close(got, reference.preprocess_frames(frames, crop=(32, 32, 192, 192),
                                                                flip_vertical=True))
