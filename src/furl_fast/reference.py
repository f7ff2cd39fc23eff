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


# ---- replay buffer augmentation (furl_fast.replay) ------------------------------------------------


def random_shift(frames: torch.Tensor, shifts: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ / DrQ-v2 random shift with given integer shifts, by plain indexing.

    frames: (N, C, H, W) of any dtype; shifts: (N, 2) integers (x, y), each in [0, 2 * pad], in the
    order of the last dimension of DrQ-v2's sampling grid. Output pixel (y, x) of sample n is
    frames[n, :, clamp(y + shifts[n, 1] - pad), clamp(x + shifts[n, 0] - pad)]: the frame
    replicate-padded by `pad` on every side, then cropped back to H x W at offset (y, x) = shifts[n, ::-1].
    This equals DrQ-v2's RandomShiftsAug (replicate pad + grid_sample, align_corners=False) for the
    same shifts. Returns (N, C, H, W) in frames' dtype.
    """
    n, _, height, width = frames.shape
    shifts = shifts.to(device=frames.device, dtype=torch.long)
    if shifts.shape != (n, 2) or bool(((shifts < 0) | (shifts > 2 * pad)).any()):
        raise ValueError(f"random_shift: 'shifts' must be (N, 2) integers in [0, {2 * pad}].")
    ys = (torch.arange(height, device=frames.device) + shifts[:, 1:2] - pad).clamp(0, height - 1)
    xs = (torch.arange(width, device=frames.device) + shifts[:, 0:1] - pad).clamp(0, width - 1)
    rows = torch.gather(frames, 2, ys[:, None, :, None].expand(-1, frames.shape[1], -1, width))
    return torch.gather(rows, 3, xs[:, None, None, :].expand(-1, frames.shape[1], height, -1))
