"""DrQ: SAC from pixels (the FuRL paper, baselines: "DrQ-v2-style defaults").

A conv encoder shared by actor and critics turns stacked 84x84 RGB frames into a small feature vector;
SAC runs on those features (furl_fast.agents.sac.SAC with an encoder): critic gradients train the
encoder, the actor reads detached features. The random-shift augmentation is NOT done here: the replay
buffer applies it while gathering the batch (furl_fast.replay, augment=True).
"""

from __future__ import annotations

import torch
from torch import nn

from furl_fast.agents.sac import SAC
from furl_fast.config import DrQConfig, SACConfig

__all__ = ["PixelEncoder", "make_drq"]


class PixelEncoder(nn.Module):
    """(B, C, H, W) uint8 (or float in [0, 255]) -> (B, feature_dim) float32 in [-1, 1].

    DrQ-v2's conv stack (32 filters 3x3: stride 2, then three of stride 1, ReLU) followed by DrQ's
    Linear -> LayerNorm -> tanh projection to feature_dim.
    conv_dtype: torch.bfloat16 runs the conv stack (forward and backward: the agent's hot path) under
    autocast; weights, gradients and the projection stay float32. bfloat16 keeps float32's range, so
    no loss scaling is needed.
    """

    def __init__(self, input_shape: tuple[int, int, int], feature_dim: int = 50,
                 conv_dtype: torch.dtype = torch.float32):
        super().__init__()
        if conv_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"PixelEncoder: conv_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{conv_dtype}.")
        self.conv_dtype = conv_dtype
        self.input_shape = tuple(int(v) for v in input_shape)
        c, h, w = self.input_shape
        self.convs = nn.Sequential(
            nn.Conv2d(c, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, c, h, w)).shape[1]
        self.project = nn.Sequential(nn.Linear(flat, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.feature_dim = feature_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dim() != 4 or tuple(obs.shape[1:]) != self.input_shape:
            raise ValueError(f"PixelEncoder: obs must have shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(obs.shape)}.")
        x = obs.float() / 255.0 - 0.5
        if self.conv_dtype == torch.float32:
            return self.project(self.convs(x))
        with torch.autocast(x.device.type, dtype=self.conv_dtype):
            h = self.convs(x)
        return self.project(h.float())


def make_drq(obs_shape: tuple[int, int, int], act_dim: int, config: SACConfig | None = None,
             drq: DrQConfig | None = None, device: torch.device | str = "cpu",
             metric_prefix: str = "") -> SAC:
    """A SAC agent on PixelEncoder features. obs_shape: (frame_stack * 3, image_size, image_size)."""
    drq = drq or DrQConfig()
    if len(obs_shape) != 3 or min(obs_shape[1:]) < 16:
        raise ValueError(f"make_drq: obs_shape must be (C, H, W) with H, W >= 16, got {tuple(obs_shape)}.")
    device = torch.device(device)
    precision = drq.precision if drq.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    conv_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    encoder = PixelEncoder(obs_shape, drq.feature_dim, conv_dtype)
    return SAC(drq.feature_dim, act_dim, config, device, encoder=encoder, metric_prefix=metric_prefix)
