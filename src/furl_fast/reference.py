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


# ---- Reward heads ----------------------------------------------------------------------
# Each runs in the embedding's dtype (the eager chain a user would write): float16 / bfloat16 inputs
# compute in that dtype, float64 in float64 (the test oracle); the other tensors are cast to it.
# Outputs are float32 (float64 for float64 embeddings). The native kernels accumulate in float32.

NORM_EPS = 1e-6
"""Cosine similarity is a.b / (max(|a|, NORM_EPS) * max(|b|, NORM_EPS)): a zero vector has similarity
0 with everything, never NaN. 1e-6 (not 1e-8) so that the rule also holds in float16."""


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by max(|row|, NORM_EPS)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, W) x (K, W) -> (N, K) cosine similarities."""
    return _normalise(a) @ _normalise(b).T


def mlp_cosine_reward(
    emb: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """FuRL's fuzzy reward: cos(relu(emb @ w1 + b1) @ w2 + b2, target).

    emb (N, D); w1 (D, H) (nn.Linear.weight transposed); b1 (H,); w2 (H, P); b2 (P,);
    target (P,) -> (N,), or (K, P) -> (N, K).
    """
    dt = emb.dtype
    z = torch.relu(emb @ w1.to(dt) + b1.to(dt)) @ w2.to(dt) + b2.to(dt)
    cos = _cosine(z, target.to(dt).reshape(-1, target.shape[-1])).to(_out_dtype(dt))
    return cos[:, 0] if target.dim() == 1 else cos


def clip_similarity(
    img_emb: torch.Tensor, text_emb: torch.Tensor, *, normalize: bool = True
) -> torch.Tensor:
    """img_emb (N, D), text_emb (K, D) -> (N, K): cosine similarities (normalize) or dot products."""
    dt = img_emb.dtype
    text = text_emb.to(dt)
    sim = _cosine(img_emb, text) if normalize else img_emb @ text.T
    return sim.to(_out_dtype(dt))


def goal_baseline_reward(
    img_emb: torch.Tensor, goal_emb: torch.Tensor, baseline_emb: torch.Tensor, alpha: float
) -> torch.Tensor:
    """VLM-RM reward 1 - 0.5 |(x - g) P|^2, P = alpha u u^T + (1 - alpha) I, u = d / max(|d|, eps).

    img_emb (N, D); goal_emb g and baseline_emb b: (D,), already averaged over the prompts (the mean
    of the L2-normalised prompt embeddings, not re-normalised); x = img_emb / max(|img_emb|, eps),
    d = g - b. Returns (N,). (x - g) P is applied as a rank-one update, never as a D x D matrix.
    """
    dt = img_emb.dtype
    g, b = goal_emb.to(dt), baseline_emb.to(dt)
    d = g - b
    u = d / torch.linalg.vector_norm(d).clamp_min(NORM_EPS)
    v = _normalise(img_emb) - g
    vp = alpha * (v @ u)[:, None] * u + (1.0 - alpha) * v
    return (1.0 - 0.5 * vp.square().sum(-1)).to(_out_dtype(dt))


def softmax_goal_reward(
    img_emb: torch.Tensor,
    text_emb: torch.Tensor,
    goal_index: int,
    *,
    temperature: float,
    threshold: float | None = None,
) -> torch.Tensor:
    """Baumli et al.: p = softmax_k(cos(img, text_k) / temperature)[goal_index], or 1[p > threshold].

    img_emb (N, D), text_emb (K, D) (the goal prompt and the negatives) -> (N,), a probability or
    0./1.; NaN stays NaN in the binary reward.
    """
    dt = img_emb.dtype
    p = torch.softmax(_cosine(img_emb, text_emb.to(dt)) / temperature, dim=-1)[:, goal_index]
    p = p.to(_out_dtype(dt))
    if threshold is None:
        return p
    return torch.where(p.isnan(), p, (p > threshold).to(p.dtype))
