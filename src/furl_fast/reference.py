"""Pure-PyTorch versions of every furl_fast op: the fallback when the native module is missing and the
oracle the native kernels are tested against. Written for clarity, not speed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
) -> torch.Tensor:
    """frames: (N, H, W, 3) uint8 -> (N, 3, size, size) out_dtype.

    Computes in float32, or in float64 when out_dtype is float64 (the test oracle). Vertical flip, then the crop box (top, left, height, width) in the flipped frame, then
    F.interpolate(align_corners=False, antialias when downsampling) on the float frame, /255 and
    (x - mean) / std per output channel; bgr reverses the channel order before normalising.
    """
    x = frames
    if flip_vertical:
        x = x.flip(1)
    if crop is not None:
        top, left, height, width = crop
        x = x[:, top : top + height, left : left + width]
    if bgr:
        x = x.flip(-1)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    x = x.permute(0, 3, 1, 2).to(compute)
    antialias = x.shape[-2] > size or x.shape[-1] > size
    x = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=antialias)
    m = torch.tensor(mean, dtype=compute, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=compute, device=x.device).view(1, 3, 1, 1)
    return ((x / 255.0 - m) / s).to(out_dtype)
