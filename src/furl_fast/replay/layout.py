"""What a replay buffer stores: its validated Layout and the storage columns derived from it.

The columns are declared once, in C++ (FURL_REPLAY_COLUMNS in csrc/include/furl_fast/replay.h),
and read here through furl_fast._C.replay_columns(): (name, dtype, shape, device) rules that
column_specs() turns into the shapes and dtypes of one layout. A column added there is allocated,
checked, saved and loaded without a change here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import numpy as np
import torch

from furl_fast import _native

EMBEDDING_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_MAX_CAPACITY = 2**31 - 1  # the core keeps slot numbers in int32 columns (valid_list)
_MAX_SHIFT_PAD = 1024  # kMaxShiftPad in csrc/include/furl_fast/replay.h
_MAX_BYTES = 2**60  # per column, as the core's check (TensorView::kMaxElements)


def positive_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """value as an int in [minimum, maximum], else a ValueError naming the argument."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"ReplayBuffer: '{name}' must be an int {bounds}, got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shape of a replay buffer's storage, checked on construction (a ValueError or TypeError
    names the first bad field). See ReplayBuffer for what each field means.

    Mirrors ReplayLayout in csrc/include/furl_fast/replay.h, which spells obs_shape as pixels,
    channels, height and width and adds the device (native_layout()). The fields, in this order,
    are also the "layout" entry of a saved file's header (file_format.py).
    """

    capacity: int
    obs_shape: tuple[int, ...]
    action_dim: int
    frame_stack: int = 1
    embedding_dim: int = 0
    embedding_dtype: torch.dtype = torch.float32
    n_step: int = 1
    gamma: float = 0.99
    num_envs: int = 1
    shift_pad: int = 4

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # a frozen dataclass normalises its own fields
            object.__setattr__(self, name, value)

        capacity = positive_int(self.capacity, "capacity", maximum=_MAX_CAPACITY)
        set_("capacity", capacity)
        shape = self.obs_shape
        if not isinstance(shape, (tuple, list)) or len(shape) not in (1, 3):
            raise ValueError(
                f"ReplayBuffer: 'obs_shape' must be (C, H, W) for pixel frames or (dim,) for state "
                f"vectors, got {shape!r}."
            )
        set_("obs_shape", tuple(positive_int(s, "obs_shape") for s in shape))
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise TypeError(
                "ReplayBuffer: 'embedding_dtype' must be torch.float32 or torch.float16, got "
                f"{self.embedding_dtype}."
            )
        gamma = float(self.gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"ReplayBuffer: 'gamma' must be in [0, 1], got {gamma}.")
        set_("gamma", gamma)
        set_("action_dim", positive_int(self.action_dim, "action_dim"))
        # A stack or n-step window never spans more slots than the ring holds.
        set_("frame_stack", positive_int(self.frame_stack, "frame_stack", maximum=capacity))
        set_("embedding_dim", positive_int(self.embedding_dim, "embedding_dim", 0))
        set_("n_step", positive_int(self.n_step, "n_step", maximum=capacity))
        set_("num_envs", positive_int(self.num_envs, "num_envs"))
        set_("shift_pad", positive_int(self.shift_pad, "shift_pad", 0, _MAX_SHIFT_PAD))
        if capacity <= self.num_envs:
            raise ValueError(
                f"ReplayBuffer: 'capacity' ({capacity}) must exceed 'num_envs' ({self.num_envs})."
            )

    @property
    def pixels(self) -> bool:
        """True for uint8 (C, H, W) frames, False for float32 (dim,) state vectors."""
        return len(self.obs_shape) == 3

    @property
    def obs_dtype(self) -> torch.dtype:
        return torch.uint8 if self.pixels else torch.float32

    def native_layout(self, device: torch.device) -> dict[str, Any]:
        """The dict furl_fast._C.ReplayCore reads into its ReplayLayout."""
        channels, height, width = (*self.obs_shape, 1, 1)[:3]
        return {
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "frame_stack": self.frame_stack,
            "n_step": self.n_step,
            "gamma": self.gamma,
            "action_dim": self.action_dim,
            "pixels": self.pixels,
            "channels": channels,
            "height": height,
            "width": width,
            "embedding_dim": self.embedding_dim,
            "embedding_dtype": EMBEDDING_DTYPES[self.embedding_dtype],
            "shift_pad": self.shift_pad,
            "device": device.type,
        }


class ColumnSpec(NamedTuple):
    """One storage column of a layout."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    on_buffer_device: bool  # else host memory
    per_slot: bool  # its rows are the capacity slots (only the small 'state' column is not)


@functools.cache
def _native_columns() -> tuple[tuple[str, str, str, str], ...]:
    return tuple(_native._C.replay_columns())


def column_specs(layout: Layout) -> dict[str, ColumnSpec]:
    """name -> spec of every column the layout stores, in the order of FURL_REPLAY_COLUMNS (the
    order of a saved file); the rules are those documented there."""
    cap = layout.capacity
    shapes = {
        "slot": (cap,),
        "action": (cap, layout.action_dim),
        "obs": (cap, *layout.obs_shape),
        "embedding": (cap, layout.embedding_dim),
        "state": (_native._C.limits()["replay_state_header"] + layout.num_envs,),
    }
    dtypes = {"obs": layout.obs_dtype, "embedding": layout.embedding_dtype}  # else a torch name
    return {
        name: ColumnSpec(
            shape=shapes[shape],
            dtype=dtypes[dtype] if dtype in dtypes else getattr(torch, dtype),
            on_buffer_device=device == "buffer",
            per_slot=shape != "state",
        )
        for name, dtype, shape, device in _native_columns()
        if shape != "embedding" or layout.embedding_dim > 0
    }


def allocate(layout: Layout, device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialised storage for every column (the core initialises it)."""
    specs = column_specs(layout)
    nbytes = {k: math.prod(s.shape) * s.dtype.itemsize for k, s in specs.items()}
    if max(nbytes.values()) >= _MAX_BYTES:
        raise ValueError(
            f"ReplayBuffer: {layout.capacity} slots of obs_shape {layout.obs_shape} need more "
            f"than 2^60 bytes."
        )
    # torch.empty commits pages only when written, so the device columns (frames and embeddings)
    # grow with the data; but the core initialises every host column at once: refuse what cannot
    # fit in memory instead of letting the first write run the machine out of it.
    initialised = sum(n for k, n in nbytes.items() if not specs[k].on_buffer_device)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if initialised > physical:
        raise ValueError(
            f"ReplayBuffer: capacity {layout.capacity} needs {initialised / 2**30:.1f} GiB of "
            f"bookkeeping (initialised at once) but this machine has {physical / 2**30:.1f} GiB "
            f"of memory."
        )
    cpu = torch.device("cpu")
    return {
        k: torch.empty(s.shape, dtype=s.dtype, device=device if s.on_buffer_device else cpu)
        for k, s in specs.items()
    }

