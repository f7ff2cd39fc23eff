"""The facade's argument conversion: what users pass (tensors, arrays, lists) as contiguous tensors
of the shape and dtype the core expects, or a TypeError / ValueError naming the argument. (The
native side checks every tensor again; these checks give the friendlier messages and convert.)"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from furl_fast.replay.layout import Layout


def to_tensor(value: Any, name: str, op: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:  # ascontiguousarray: torch cannot wrap negative strides (e.g. a frame flipped with [::-1])
        return torch.as_tensor(np.ascontiguousarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{op}: '{name}' must be a tensor or array, got {type(value).__name__}."
        ) from exc


def host_int64(value: Any, name: str, op: str) -> torch.Tensor:
    """Indices as a contiguous int64 CPU tensor."""
    return to_tensor(value, name, op).to(device="cpu", dtype=torch.int64).contiguous()


class Inputs:
    """The arguments of adds to a buffer of `layout` whose frames and embeddings live on `device`;
    batch: the leading N of add_batch(), None for one step."""

    def __init__(self, layout: Layout, device: torch.device) -> None:
        self.layout, self.device = layout, device

    def obs(self, value: Any, name: str, op: str, batch: int | None = None) -> torch.Tensor:
        t = to_tensor(value, name, op)
        obs_shape = self.layout.obs_shape
        shape = obs_shape if batch is None else (batch, *obs_shape)
        if self.layout.pixels and t.dtype != torch.uint8:
            raise TypeError(f"{op}: '{name}' must be a uint8 frame {shape}, got dtype {t.dtype}.")
        if not self.layout.pixels:
            if not t.is_floating_point():
                raise TypeError(
                    f"{op}: '{name}' must be a floating-point state vector, got {t.dtype}."
                )
            t = t.to(torch.float32)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: '{name}' must have shape {shape}, got {tuple(t.shape)}.")
        if t.device.type == "cuda" and t.device != self.device:
            raise ValueError(
                f"{op}: '{name}' is on {t.device}; the buffer stores on {self.device}."
            )
        return self._staged(t.contiguous())

    def floats(
        self,
        value: Any,
        name: str,
        op: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """A floating-point argument of this shape, converted to dtype on device (default: CPU)."""
        t = to_tensor(value, name, op)
        if not t.is_floating_point():
            raise TypeError(f"{op}: '{name}' must be floating point, got {t.dtype}.")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: '{name}' must have shape {shape}, got {tuple(t.shape)}.")
        return t.to(device=device or torch.device("cpu"), dtype=dtype).contiguous()

    def embedding(
        self, value: Any, name: str, op: str, batch: int | None = None
    ) -> torch.Tensor | None:
        """The embedding argument: required when the buffer stores embeddings, else refused."""
        d = self.layout.embedding_dim
        if d == 0:
            if value is not None:
                raise ValueError(
                    f"{op}: '{name}' was given but the buffer stores no embeddings (embedding_dim=0)."
                )
            return None
        if value is None:
            raise ValueError(
                f"{op}: '{name}' is required (the buffer stores embeddings, embedding_dim={d})."
            )
        shape = (d,) if batch is None else (batch, d)
        t = to_tensor(value, name, op)
        device = self.device if t.device.type == "cuda" else None
        return self._staged(self.floats(t, name, op, shape, self.layout.embedding_dtype, device))

    def flags(self, value: Any, name: str, op: str, batch: int) -> torch.Tensor:
        """(batch,) bool on the CPU; None: all False."""
        if value is None:
            return torch.zeros(batch, dtype=torch.bool)
        t = to_tensor(value, name, op)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"{op}: '{name}' must have shape ({batch},), got {tuple(t.shape)}.")
        return t.to(device="cpu", dtype=torch.bool).contiguous()

    def goal_distances(self, value: Any, op: str, batch: int) -> torch.Tensor:
        """(batch,) float32 on the CPU; None: NaN (not given)."""
        if value is None:
            return torch.full((batch,), math.nan)
        return self.floats(value, "goal_distance", op, (batch,))

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """GPU mode: a host tensor moved to the buffer's GPU through pinned memory, asynchronously
        on the current stream; the core's copy from it is then stream-ordered, so an add does not
        wait for the training kernels queued before it."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t
