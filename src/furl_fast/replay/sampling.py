"""What one sample() hands the core to fill (its plan), and GPU mode's gather: there the host
plans a batch (slots, shifts and the small columns) into one pinned buffer, one asynchronous copy
moves it, and frames and embeddings are gathered on the GPU."""

from __future__ import annotations

import math

import torch
from torch.utils.dlpack import to_dlpack

from furl_fast import _native
from furl_fast.replay.layout import Layout

Plan = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)


def plan(layout: Layout, batch: int, *, gpu: bool) -> Plan:
    """The core's outputs for a batch (Batch's fields; see ReplaySampleOut in
    csrc/include/furl_fast/replay.h). gpu: instead of obs, next_obs and the embeddings, the slots
    and shifts gather_cuda() reads them with."""
    b, f, d, n = batch, layout.frame_stack, layout.embedding_dim, layout.n_step
    out: Plan = {
        "action": ((b, layout.action_dim), torch.float32),
        "reward": ((b,), torch.float32),
        "discount": ((b,), torch.float32),
        "goal_distance": ((b,), torch.float32),
        "success": ((b,), torch.bool),
        "indices": ((b,), torch.int64),
        "episodes": ((b,), torch.int64),
        "steps": ((b,), torch.int64),
    }
    if d:
        out["step_discounts"] = ((b, n), torch.float32)
    if gpu:
        out["obs_slots"] = out["next_slots"] = ((b, f), torch.int64)
        out["shifts"] = ((b, 4), torch.int32)
        if d:
            out["step_slots"] = ((b, n), torch.int64)
    else:
        out["obs"] = out["next_obs"] = (stack_shape(layout, b), layout.obs_dtype)
        if d:
            out["embedding"] = out["next_embedding"] = ((b, d), layout.embedding_dtype)
            out["step_embeddings"] = ((b, n, d), layout.embedding_dtype)
    return out


def stack_shape(layout: Layout, batch: int) -> tuple[int, ...]:
    """The shape of a batch of stacked observations, frames concatenated along channels."""
    c, *rest = layout.obs_shape
    return (batch, layout.frame_stack * c, *rest)


def packed(
    plan: Plan,
    device: torch.device,
    *,
    pin_memory: bool = False,
    source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One byte buffer holding every tensor of plan (name -> (shape, dtype)), 8-byte aligned, and
    the views into it. With source (a packed buffer of the same plan), the buffer is source copied
    to device (non-blocking: one copy instead of one per tensor)."""
    spans, total = {}, 0
    for name, (shape, dtype) in plan.items():
        nbytes = math.prod(shape) * dtype.itemsize
        spans[name] = (total, nbytes)
        total += -(-nbytes // 8) * 8  # the next view starts 8-byte aligned
    if source is None:
        buf = torch.empty(total, dtype=torch.uint8, device=device, pin_memory=pin_memory)
    else:
        buf = source.to(device, non_blocking=True)
    views = {
        name: buf[start : start + nbytes].view(plan[name][1]).view(plan[name][0])
        for name, (start, nbytes) in spans.items()
    }
    return buf, views


def gather_cuda(
    packed_plan: torch.Tensor,
    host_plan: Plan,
    layout: Layout,
    columns: dict[str, torch.Tensor],
    stream: int,
) -> dict[str, torch.Tensor]:
    """The batch's tensors on the GPU of columns["frames"], from the packed host plan (holding
    the outputs of plan(..., gpu=True)).

    Everything runs on the caller's current stream. The gather reads the frame storage after
    the write lock is released: an add() on another thread that runs on another stream may
    overwrite a slot of this batch before the gather reads it (as with any tensor written on
    one stream and read on another); add and sample on one stream, or synchronise them."""
    frames = columns["frames"]
    dev = frames.device
    _, res = packed(host_plan, dev, source=packed_plan)
    stack = stack_shape(layout, len(res["indices"]))
    slots = {k: res.pop(k) for k in ("obs_slots", "next_slots")}
    shifts = res.pop("shifts")
    for name, key, cols in (
        ("obs", "obs_slots", slice(0, 2)),
        ("next_obs", "next_slots", slice(2, 4)),
    ):
        if layout.pixels:
            res[name] = torch.empty(stack, dtype=torch.uint8, device=dev)
            _native._C.random_shift_cuda(
                to_dlpack(frames),
                to_dlpack(slots[key]),
                to_dlpack(shifts[:, cols].contiguous()),
                to_dlpack(res[name]),
                layout.shift_pad,
                stream,
            )
        else:
            res[name] = frames.index_select(0, slots[key].flatten()).reshape(stack)
    if layout.embedding_dim:
        emb = columns["embeddings"]
        res["embedding"] = emb.index_select(0, slots["obs_slots"][:, -1])
        res["next_embedding"] = emb.index_select(0, slots["next_slots"][:, -1])
        step_slots = res.pop("step_slots")  # step_discounts came with the packed plan
        res["step_embeddings"] = emb.index_select(0, step_slots.flatten()).view(
            *step_slots.shape, -1
        )
    return res
