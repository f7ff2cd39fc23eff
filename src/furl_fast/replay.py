"""Replay buffer for pixel and state RL with VLM embeddings: one stored frame per environment step,
frame stacks and n-step returns built by index at sample time, DrQ random shift fused into the gather.

The core is C++ (csrc/replay/); this module allocates its storage as torch tensors, validates
arguments, and returns batches as torch tensors.

Adding data. An episode is `start_episode(first_obs)` followed by one `add(next_obs, action, reward,
terminated, truncated)` per step, where next_obs is the observation that step returned. The step
that ends the episode (terminated or truncated) carries its final observation, so the last
transition's next_obs is always stored; the next episode needs a new start_episode(), and add()
without an open episode raises. Every observation is stored exactly once. (The argument order of
add() follows what env.step() returns first: the observation, then the rest.)

    buf.start_episode(obs)
    while True:
        action = policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        buf.add(obs, action, reward, terminated, truncated, success=info["success"])
        if terminated or truncated:
            break

Vector envs: num_envs=N, then start_episode(obs_e, env=e) per env, and add_batch() with (N, ...)
arrays per step; pass reset_obs (the observations after the automatic reset) to start the next
episodes of the envs that ended in the same call.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from furl_fast import _native

__all__ = ["Batch", "ReplayBuffer"]

_MAGIC = b"FURLRPB\x00"
# Version 2 stores only the slots written so far (`rows` in the header); version 1 files hold all
# `capacity` slots and are still read.
_FORMAT_VERSION = 2
_READ_VERSIONS = (1, 2)
_STATE_HEADER = 8  # kStateHeader in csrc/include/furl_fast/replay.h
_EMBEDDING_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_MAX_CAPACITY = 2**31 - 1  # the core keeps slot numbers in int32 columns (valid_list)
_COLUMN_DTYPES = ("uint8", "int32", "int64", "float16", "float32")  # what _allocate() creates
_MAX_BYTES = 2**60  # per column, as the core's check (TensorView::kMaxElements)


class Batch(NamedTuple):
    """A sampled batch; B = batch size, F = frame_stack, A = action_dim, D = embedding_dim.

    Pixel buffers: obs / next_obs are (B, F * C, H, W) uint8, frames concatenated along channels,
    oldest first (random-shifted when sampled with augment=True). State buffers: (B, F * dim) float32.
    reward (B,) float32 is the n-step discounted sum r_t + gamma r_{t+1} + ... over k <= n steps of the
    episode; discount (B,) float32 is gamma^k, or 0 when the episode terminated within those steps
    (a truncation keeps gamma^k: bootstrap from next_obs). next_obs is the observation after those k
    steps. action (B, A) float32 is a_t. success (B,) bool and goal_distance (B,) float32 (NaN when
    not given) are those of step t. embedding / next_embedding (B, D) are the stored embeddings of
    the last frame of obs / next_obs (None without embeddings). step_embeddings (B, n, D) are those
    of the observations after each step of the n-step window, o_{t+1} .. o_{t+k} (the last one
    repeated past an episode end at k < n, so step_embeddings[:, -1] is next_embedding), and
    step_discounts (B, n) float32 their weights gamma^j for j < k, 0 beyond: the n-step sum of a
    per-step reward R of the next observation is (step_discounts * R(step_embeddings)).sum(1)
    (None without embeddings). indices (B,) int64 identify the
    transitions (for gather() and earlier(); valid until overwritten); episodes (B,) int64 are episode
    ids and steps (B,) int64 the step of obs within its episode (0 = first observation).
    """

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    discount: torch.Tensor
    next_obs: torch.Tensor
    success: torch.Tensor
    goal_distance: torch.Tensor
    indices: torch.Tensor
    episodes: torch.Tensor
    steps: torch.Tensor
    embedding: torch.Tensor | None = None
    next_embedding: torch.Tensor | None = None
    step_embeddings: torch.Tensor | None = None
    step_discounts: torch.Tensor | None = None


def _positive_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"ReplayBuffer: '{name}' must be an int {bounds}, got {value!r}.")
    return int(value)


def _to_tensor(value: Any, name: str, op: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:  # ascontiguousarray: torch cannot wrap negative strides (e.g. a frame flipped with [::-1])
        return torch.as_tensor(np.ascontiguousarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{op}: '{name}' must be a tensor or array, got {type(value).__name__}."
        ) from exc


def _capsule(t: torch.Tensor | None):
    return None if t is None else to_dlpack(t)


def _raw_bytes(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (also for empty ones, which
    memoryview.cast refuses)."""
    return memoryview(a.reshape(-1).view(np.uint8))


def _column_entry_ok(entry: Any) -> bool:
    """[name, dtype name, shape] as save() writes it."""
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and entry[1] in _COLUMN_DTYPES
        and isinstance(entry[2], list)
        and all(isinstance(n, int) and 0 <= n < 2**62 for n in entry[2])
    )


def _packed(
    plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
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


class ReplayBuffer:
    """FIFO replay buffer of transitions with frame stacking, n-step returns and DrQ random shift.

    capacity: observation slots (at most 2^31 - 1), overwritten oldest first. Each episode of T steps takes T + 1 slots
    (its final observation too), so the buffer holds about capacity * T / (T + 1) transitions;
    len(buffer) counts the ones that can be sampled now. A transition is sampleable once its n-step
    window is stored, and stops being so when any frame of its stack is overwritten (so once the
    oldest episode's first frames are gone, its first surviving frame_stack - 1 steps are skipped:
    a stack never reads an overwritten frame or one of another episode).
    obs_shape: (C, H, W) for uint8 pixel frames (one frame per step; stacks are built at sample
    time) or (dim,) for float32 state vectors.
    action_dim: width of the float32 action vector.
    frame_stack: frames per sampled observation (at most capacity); at an episode's start the first
    frame is repeated (as gymnasium's FrameStackObservation does after a reset).
    embedding_dim / embedding_dtype: store a VLM image embedding (float32 or float16) per
    observation; 0 stores none.
    n_step / gamma: n-step returns (n_step at most capacity), cut at episode ends (see Batch).
    num_envs: number of environments adding interleaved episodes (vector envs).
    device: "cpu", or "cuda[:i]" to keep frames and embeddings in GPU memory and gather them there.
    seed: seeds the sampler (indices and shifts); the same seed and the same adds give the same
    batches. None draws a random seed.
    num_threads: CPU threads for a sample (default: all cores). The GIL is released while sampling.
    pin_memory: CPU batches in pinned memory (fast, asynchronous copies to a GPU later).
    prefetch: sample() returns a batch prepared in a background thread during the previous call and
    starts the next one; a prefetched batch is drawn from the buffer as it was at the previous
    sample() call (adds wait for it, so results stay deterministic). CPU mode only.
    shift_pad: the DrQ pad; shifts are integers in [0, 2 * shift_pad] (4 in DrQ / DrQ-v2).
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: Sequence[int],
        action_dim: int,
        *,
        frame_stack: int = 1,
        embedding_dim: int = 0,
        embedding_dtype: torch.dtype = torch.float32,
        n_step: int = 1,
        gamma: float = 0.99,
        num_envs: int = 1,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        num_threads: int | None = None,
        pin_memory: bool = False,
        prefetch: bool = False,
        shift_pad: int = 4,
    ) -> None:
        self._setup(
            {
                "capacity": capacity,
                "obs_shape": obs_shape,
                "action_dim": action_dim,
                "frame_stack": frame_stack,
                "embedding_dim": embedding_dim,
                "embedding_dtype": embedding_dtype,
                "n_step": n_step,
                "gamma": gamma,
                "num_envs": num_envs,
                "shift_pad": shift_pad,
            },
            device=device,
            num_threads=num_threads,
            pin_memory=pin_memory,
            prefetch=prefetch,
        )
        self._columns = self._allocate()
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._core = self._make_core(fresh=True, seed=int(seed) % 2**64)

    # ---- construction ------------------------------------------------------------------------

    def _setup(
        self,
        cfg: dict[str, Any],
        *,
        device: str | torch.device,
        num_threads: int | None,
        pin_memory: bool,
        prefetch: bool,
    ) -> None:
        if not _native.HAS_NATIVE:
            raise ImportError(_native.IMPORT_ERROR)
        capacity = _positive_int(cfg["capacity"], "capacity", maximum=_MAX_CAPACITY)
        obs_shape = tuple(cfg["obs_shape"]) if isinstance(cfg["obs_shape"], (tuple, list)) else None
        if obs_shape is None or len(obs_shape) not in (1, 3):
            raise ValueError(
                f"ReplayBuffer: 'obs_shape' must be (C, H, W) for pixel frames or (dim,) for state "
                f"vectors, got {cfg['obs_shape']!r}."
            )
        obs_shape = tuple(_positive_int(s, "obs_shape") for s in obs_shape)
        embedding_dtype = cfg["embedding_dtype"]
        if embedding_dtype not in _EMBEDDING_DTYPES:
            raise TypeError(
                f"ReplayBuffer: 'embedding_dtype' must be torch.float32 or torch.float16, got {embedding_dtype}."
            )
        gamma = float(cfg["gamma"])
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"ReplayBuffer: 'gamma' must be in [0, 1], got {gamma}.")
        self._cfg = {
            "capacity": capacity,
            "obs_shape": obs_shape,
            "action_dim": _positive_int(cfg["action_dim"], "action_dim"),
            # A stack or n-step window never spans more slots than the ring holds.
            "frame_stack": _positive_int(cfg["frame_stack"], "frame_stack", maximum=capacity),
            "embedding_dim": _positive_int(cfg["embedding_dim"], "embedding_dim", 0),
            "embedding_dtype": embedding_dtype,
            "n_step": _positive_int(cfg["n_step"], "n_step", maximum=capacity),
            "gamma": gamma,
            "num_envs": _positive_int(cfg["num_envs"], "num_envs"),
            "shift_pad": _positive_int(cfg["shift_pad"], "shift_pad", 0, 1024),
        }
        if capacity <= self._cfg["num_envs"]:
            raise ValueError(
                f"ReplayBuffer: 'capacity' ({capacity}) must exceed 'num_envs' ({self._cfg['num_envs']})."
            )
        self.device = torch.device(device)
        if self.device.type == "cuda":
            status = _native.cuda_status()
            if not status.usable:
                raise ValueError(
                    f"ReplayBuffer: device='cuda' needs furl_fast's CUDA kernels, which cannot run "
                    f"here: {status.reason}. Use device='cpu' (with pin_memory=True for fast copies "
                    f"to the GPU)."
                )
            if not torch.cuda.is_available():
                raise ValueError("ReplayBuffer: device='cuda' but torch sees no CUDA device.")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            if prefetch:
                raise ValueError(
                    "ReplayBuffer: prefetch is for CPU mode; GPU sampling is already asynchronous."
                )
        elif self.device.type != "cpu":
            raise ValueError(f"ReplayBuffer: 'device' must be cpu or cuda, got {device!r}.")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError(
                "ReplayBuffer: pin_memory=True needs a CUDA device (pinned memory is for GPU copies)."
            )
        if num_threads is not None:
            _positive_int(num_threads, "num_threads", maximum=2**31 - 1)
        self.num_threads = num_threads
        self.pin_memory = pin_memory
        self.pixels = len(obs_shape) == 3
        self._obs_dtype = torch.uint8 if self.pixels else torch.float32
        self._columns: dict[str, torch.Tensor] = {}  # _allocate() fills it
        self._write_lock = (
            threading.Lock()
        )  # one add / save at a time; save sees a consistent state
        self._executor = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
        self._pending: tuple[tuple[int, bool], concurrent.futures.Future] | None = None

    def _column_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]:
        """name -> (shape, dtype, device) of every storage column."""
        c = self._cfg
        cap, dev, cpu = c["capacity"], self.device, torch.device("cpu")
        specs = {
            "frames": ((cap, *c["obs_shape"]), self._obs_dtype, dev),
            "actions": ((cap, c["action_dim"]), torch.float32, cpu),
            "rewards": ((cap,), torch.float32, cpu),
            "goal_distances": ((cap,), torch.float32, cpu),
            "flags": ((cap,), torch.uint8, cpu),
            "prev": ((cap,), torch.int64, cpu),
            "next": ((cap,), torch.int64, cpu),
            "episodes": ((cap,), torch.int64, cpu),
            "steps": ((cap,), torch.int32, cpu),
            "valid_pos": ((cap,), torch.int32, cpu),
            "valid_list": ((cap,), torch.int32, cpu),
            "state": ((_STATE_HEADER + c["num_envs"],), torch.int64, cpu),
        }
        if c["embedding_dim"] > 0:
            specs["embeddings"] = ((cap, c["embedding_dim"]), c["embedding_dtype"], dev)
        return specs

    def _allocate(self) -> dict[str, torch.Tensor]:
        specs, cap = self._column_specs(), self._cfg["capacity"]
        nbytes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype, _) in specs.items()}
        if max(nbytes.values()) >= _MAX_BYTES:
            raise ValueError(
                f"ReplayBuffer: {cap} slots of obs_shape {self.obs_shape} need more than 2^60 bytes."
            )
        # torch.empty commits pages only when written, so frames and embeddings grow with the data;
        # but the core initialises every other column at once: refuse what cannot fit in memory
        # instead of letting the first write run the machine out of it.
        written = sum(v for k, v in nbytes.items() if k not in ("frames", "embeddings"))
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if written > physical:
            raise ValueError(
                f"ReplayBuffer: capacity {cap} needs {written / 2**30:.1f} GiB of bookkeeping "
                f"(initialised at once) but this machine has {physical / 2**30:.1f} GiB of memory."
            )
        return {k: torch.empty(shape, dtype=dtype, device=d) for k, (shape, dtype, d) in specs.items()}

    def _core_layout(self) -> dict[str, Any]:
        """The layout dict the native ReplayCore is built from."""
        c = self._cfg
        shape = c["obs_shape"]
        return {
            "capacity": c["capacity"],
            "num_envs": c["num_envs"],
            "frame_stack": c["frame_stack"],
            "n_step": c["n_step"],
            "gamma": c["gamma"],
            "action_dim": c["action_dim"],
            "pixels": self.pixels,
            "channels": shape[0],
            "height": shape[1] if self.pixels else 1,
            "width": shape[2] if self.pixels else 1,
            "embedding_dim": c["embedding_dim"],
            "embedding_dtype": _EMBEDDING_DTYPES[c["embedding_dtype"]],
            "shift_pad": c["shift_pad"],
            "device": self.device.type,
        }

    def _make_core(self, *, fresh: bool, seed: int) -> Any:
        layout = self._core_layout()
        capsules = {name: to_dlpack(t) for name, t in self._columns.items()}
        return _native._C.ReplayCore(layout, capsules, fresh, seed)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._cfg["capacity"]

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self._cfg["obs_shape"]

    @property
    def frame_stack(self) -> int:
        return self._cfg["frame_stack"]

    @property
    def num_envs(self) -> int:
        return self._cfg["num_envs"]

    @property
    def nbytes(self) -> int:
        """Bytes of storage (host and device) for all `capacity` slots."""
        return sum(t.numel() * t.element_size() for t in self._columns.values())

    def __len__(self) -> int:
        """Number of transitions that can be sampled now."""
        return len(self._core)

    def episode_open(self, env: int = 0) -> bool:
        """Whether env has a started, unfinished episode (add() is allowed)."""
        return self._core.episode_open(env)

    def truncate_episode(self, env: int = 0) -> None:
        """Ends env's open episode as if its last step had been truncated (its transitions bootstrap
        from the last observation stored). Used when a run resumes from a checkpoint: environments
        cannot be restored mid-episode, so the interrupted episode ends where the checkpoint was.
        No-op when env has no open episode."""
        with self._write_lock:
            self._wait_prefetch()
            self._core.truncate_episode(int(env))

    # ---- adding ---------------------------------------------------------------------------------

    def _stream(self) -> int:
        return (
            torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        )

    def _obs(self, value: Any, name: str, op: str, batch: int | None = None) -> torch.Tensor:
        t = _to_tensor(value, name, op)
        shape = self.obs_shape if batch is None else (batch, *self.obs_shape)
        if self.pixels and t.dtype != torch.uint8:
            raise TypeError(f"{op}: '{name}' must be a uint8 frame {shape}, got dtype {t.dtype}.")
        if not self.pixels:
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

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """GPU mode: a host tensor moved to the buffer's GPU through pinned memory, asynchronously
        on the current stream; the core's copy from it is then stream-ordered, so an add does not
        wait for the training kernels queued before it."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _floats(
        self,
        value: Any,
        name: str,
        op: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        t = _to_tensor(value, name, op)
        if not t.is_floating_point():
            raise TypeError(f"{op}: '{name}' must be floating point, got {t.dtype}.")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: '{name}' must have shape {shape}, got {tuple(t.shape)}.")
        return t.to(device=device or torch.device("cpu"), dtype=dtype).contiguous()

    def _embedding(
        self, value: Any, name: str, op: str, batch: int | None = None
    ) -> torch.Tensor | None:
        d = self._cfg["embedding_dim"]
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
        t = _to_tensor(value, name, op)
        device = self.device if t.device.type == "cuda" else None
        return self._staged(self._floats(t, name, op, shape, self._cfg["embedding_dtype"], device))

    def _wait_prefetch(self) -> None:
        if self._pending is not None:
            concurrent.futures.wait([self._pending[1]])

    def start_episode(self, obs: Any, *, embedding: Any = None, env: int = 0) -> None:
        """Starts an episode of env with its first observation (after env.reset()).

        obs: (C, H, W) uint8 or (dim,) float; embedding: (D,) float when the buffer stores embeddings.
        Raises if env's previous episode was not ended by a terminated or truncated step.
        """
        o = self._obs(obs, "obs", "start_episode")
        e = self._embedding(embedding, "embedding", "start_episode")
        with self._write_lock:
            self._wait_prefetch()
            self._core.start_episode(int(env), _capsule(o), _capsule(e), self._stream())

    def add(
        self,
        next_obs: Any,
        action: Any,
        reward: float,
        terminated: bool,
        truncated: bool,
        *,
        success: bool = False,
        embedding: Any = None,
        goal_distance: float | None = None,
        env: int = 0,
    ) -> None:
        """Adds one step of env: a_t, r_t and the observation o_{t+1} that env.step(a_t) returned.

        next_obs: (C, H, W) uint8 or (dim,) float (on the final step: the final observation);
        action: (A,) float; embedding: (D,) embedding of next_obs; goal_distance: a scalar for this
        step (NaN when None). terminated or truncated ends the episode; call start_episode() next.
        """
        o = self._obs(next_obs, "next_obs", "add")
        a = self._floats(action, "action", "add", (self._cfg["action_dim"],))
        e = self._embedding(embedding, "embedding", "add")
        g = math.nan if goal_distance is None else float(goal_distance)
        with self._write_lock:
            self._wait_prefetch()
            self._core.add(
                int(env),
                _capsule(o),
                _capsule(a),
                float(reward),
                bool(terminated),
                bool(truncated),
                bool(success),
                _capsule(e),
                g,
                self._stream(),
            )

    def add_batch(
        self,
        next_obs: Any,
        action: Any,
        reward: Any,
        terminated: Any,
        truncated: Any,
        *,
        success: Any = None,
        embedding: Any = None,
        goal_distance: Any = None,
        reset_obs: Any = None,
        reset_embedding: Any = None,
    ) -> None:
        """add() for every env at once (vector envs), env e = row e.

        next_obs (N, *obs_shape), action (N, A), reward / terminated / truncated / success /
        goal_distance (N,), embedding (N, D), with N = num_envs. reset_obs (N, *obs_shape) (and
        reset_embedding (N, D)): the observations after the automatic reset; rows of envs whose
        episode ended here start their next episode (the other rows are ignored). Without it, call
        start_episode(obs, env=e) for those envs before their next step.
        """
        n, op = self.num_envs, "add_batch"
        o = self._obs(next_obs, "next_obs", op, n)
        a = self._floats(action, "action", op, (n, self._cfg["action_dim"]))
        r = self._floats(reward, "reward", op, (n,))
        flags = []
        for name, value in (
            ("terminated", terminated),
            ("truncated", truncated),
            ("success", success),
        ):
            t = torch.zeros(n, dtype=torch.bool) if value is None else _to_tensor(value, name, op)
            if tuple(t.shape) != (n,):
                raise ValueError(f"{op}: '{name}' must have shape ({n},), got {tuple(t.shape)}.")
            flags.append(t.to(device="cpu", dtype=torch.bool).contiguous())
        g = (
            torch.full((n,), math.nan)
            if goal_distance is None
            else self._floats(goal_distance, "goal_distance", op, (n,))
        )
        e = self._embedding(embedding, "embedding", op, n)
        ro = None if reset_obs is None else self._obs(reset_obs, "reset_obs", op, n)
        re = (
            None
            if reset_obs is None
            else self._embedding(reset_embedding, "reset_embedding", op, n)
        )
        if reset_obs is None and reset_embedding is not None:
            raise ValueError(f"{op}: 'reset_embedding' was given without 'reset_obs'.")
        with self._write_lock:
            self._wait_prefetch()
            self._core.add_batch(
                _capsule(o),
                _capsule(a),
                _capsule(r),
                *map(_capsule, flags),
                _capsule(e),
                _capsule(g),
                _capsule(ro),
                _capsule(re),
                self._stream(),
            )

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, batch_size: int, *, augment: bool = True, out: Batch | None = None) -> Batch:
        """batch_size transitions drawn uniformly (with replacement) from the len(self) valid ones.

        augment: DrQ random shift of pixel observations (replicate pad shift_pad, an integer shift in
        [0, 2 * shift_pad] per sample and axis, drawn independently for obs and next_obs, the same
        for all frames of one stack); ignored for state vectors. See Batch for the fields.
        out: a Batch returned by an earlier call of the same batch_size whose tensors are written
        again instead of allocating new ones (CPU mode without prefetch; saves the page faults of
        ~2 x 16 MB of fresh memory per batch of 256 84x84 3-stacks).
        Equivalent: gather(indices, shifts=...) with the drawn indices and shifts.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        if out is not None and (self._executor is not None or self.device.type != "cpu"):
            raise ValueError("sample: 'out' is for CPU mode without prefetch.")
        if len(self) == 0:
            raise ValueError(
                "sample: the buffer holds no sampleable transition yet (add more steps)."
            )
        if batch_size > len(self):
            raise ValueError(
                f"sample: 'batch_size' ({batch_size}) is larger than the number of sampleable "
                f"transitions ({len(self)})."
            )
        if self._executor is None:
            return self._sample(batch_size, bool(augment), None, None, out)
        key = (batch_size, bool(augment))
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            batch = pending[1].result()
        else:
            if pending is not None:
                pending[1].exception()  # a different request: drop it, but keep draws in order
            batch = self._sample(batch_size, bool(augment), None, None)
        self._pending = (
            key,
            self._executor.submit(self._sample, batch_size, bool(augment), None, None),
        )
        return batch

    def gather(self, indices: Any, *, shifts: Any = None) -> Batch:
        """The batch of the given transitions, drawing nothing at random.

        indices: (B,) int64 valid transition indices (e.g. Batch.indices, earlier()). shifts: None
        (no augmentation) or (B, 4) ints (obs x, obs y, next_obs x, next_obs y), each in
        [0, 2 * shift_pad], for pixel buffers: the same result as sample() drawing those shifts.
        """
        idx = (
            _to_tensor(indices, "indices", "gather")
            .to(device="cpu", dtype=torch.int64)
            .contiguous()
        )
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(
                f"gather: 'indices' must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}."
            )
        sh = None
        if shifts is not None:
            if not self.pixels:
                raise ValueError("gather: 'shifts' apply to pixel observations only.")
            sh = _to_tensor(shifts, "shifts", "gather")
            if sh.is_floating_point() or tuple(sh.shape) != (idx.numel(), 4):
                raise ValueError(
                    f"gather: 'shifts' must be ({idx.numel()}, 4) integers, got {tuple(sh.shape)} {sh.dtype}."
                )
            sh = sh.to(device="cpu", dtype=torch.int32).contiguous()
        return self._sample(idx.numel(), False, idx, sh)

    def earlier(self, indices: Any, k: int) -> torch.Tensor:
        """For each valid transition index, the index of the transition k steps earlier in the same
        episode, clamped to the earliest one of that episode still stored (check Batch.steps to see
        whether the full k steps were available). indices: (B,) int64 -> (B,) int64."""
        idx = (
            _to_tensor(indices, "indices", "earlier")
            .to(device="cpu", dtype=torch.int64)
            .contiguous()
        )
        if idx.dim() != 1:
            raise ValueError(f"earlier: 'indices' must be 1-D, got shape {tuple(idx.shape)}.")
        # More steps back than the ring holds reaches the same (earliest) transition.
        k = min(_positive_int(k, "k", 0), self.capacity)
        out = torch.empty_like(idx)
        if idx.numel():
            self._core.earlier(_capsule(idx), k, _capsule(out))
        return out

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)

    def _sample(
        self,
        b: int,
        augment: bool,
        indices: torch.Tensor | None,
        shifts: torch.Tensor | None,
        reuse: Batch | None = None,
    ) -> Batch:
        c = self._cfg
        f, d = c["frame_stack"], c["embedding_dim"]
        stack = (b, f * self.obs_shape[0], *self.obs_shape[1:])
        if reuse is not None:  # the native side checks every shape and dtype again
            out = {k: v for k, v in reuse._asdict().items() if v is not None}
            self._core.sample(
                b,
                augment,
                None,
                None,
                {k: _capsule(v) for k, v in out.items()},
                self.num_threads or 0,
            )
            return reuse
        plan = {
            "action": ((b, c["action_dim"]), torch.float32),
            "reward": ((b,), torch.float32),
            "discount": ((b,), torch.float32),
            "goal_distance": ((b,), torch.float32),
            "success": ((b,), torch.bool),
            "indices": ((b,), torch.int64),
            "episodes": ((b,), torch.int64),
            "steps": ((b,), torch.int64),
        }
        cuda = self.device.type == "cuda"
        n = c["n_step"]
        if d:
            plan["step_discounts"] = ((b, n), torch.float32)
        if cuda:
            plan.update(obs_slots=((b, f), torch.int64), next_slots=((b, f), torch.int64),
                        shifts=((b, 4), torch.int32))
            if d:
                plan["step_slots"] = ((b, n), torch.int64)
            packed, out = _packed(plan, torch.device("cpu"), pin_memory=True)
        else:
            out = {k: self._empty(shape, dtype) for k, (shape, dtype) in plan.items()}
            out["obs"] = self._empty(stack, self._obs_dtype)
            out["next_obs"] = self._empty(stack, self._obs_dtype)
            if d:
                out["embedding"] = self._empty((b, d), c["embedding_dtype"])
                out["next_embedding"] = self._empty((b, d), c["embedding_dtype"])
                out["step_embeddings"] = self._empty((b, n, d), c["embedding_dtype"])
        self._core.sample(
            b,
            augment,
            _capsule(indices),
            _capsule(shifts),
            {k: _capsule(v) for k, v in out.items()},
            self.num_threads or 0,
        )
        if cuda:
            out = self._gather_cuda(packed, plan, stack)
        fields = {k: out.get(k) for k in Batch._fields if k in out}
        return Batch(**fields)

    def _gather_cuda(
        self, packed: torch.Tensor, plan: dict[str, tuple], stack: tuple[int, ...]
    ) -> dict[str, torch.Tensor]:
        """GPU mode: the host planned the batch (slots, shifts and the small columns) into one
        pinned buffer; one asynchronous copy moves it, and frames are gathered on the GPU.

        Everything runs on the caller's current stream. The gather reads the frame storage after
        the write lock is released: an add() on another thread that runs on another stream may
        overwrite a slot of this batch before the gather reads it (as with any tensor written on
        one stream and read on another); add and sample on one stream, or synchronise them."""
        dev, frames = self.device, self._columns["frames"]
        _, res = _packed(plan, dev, source=packed)
        slots = {k: res.pop(k) for k in ("obs_slots", "next_slots")}
        shifts = res.pop("shifts")
        for name, key, cols in (
            ("obs", "obs_slots", slice(0, 2)),
            ("next_obs", "next_slots", slice(2, 4)),
        ):
            if self.pixels:
                res[name] = torch.empty(stack, dtype=torch.uint8, device=dev)
                _native._C.random_shift_cuda(
                    to_dlpack(frames),
                    to_dlpack(slots[key]),
                    to_dlpack(shifts[:, cols].contiguous()),
                    to_dlpack(res[name]),
                    self._cfg["shift_pad"],
                    self._stream(),
                )
            else:
                res[name] = frames.index_select(0, slots[key].flatten()).reshape(stack)
        if self._cfg["embedding_dim"]:
            emb = self._columns["embeddings"]
            res["embedding"] = emb.index_select(0, slots["obs_slots"][:, -1])
            res["next_embedding"] = emb.index_select(0, slots["next_slots"][:, -1])
            step_slots = res.pop("step_slots")  # step_discounts came with the packed plan
            res["step_embeddings"] = emb.index_select(0, step_slots.flatten()).view(
                *step_slots.shape, -1)
        return res

    # ---- persistence ----------------------------------------------------------------------------

    def _layout(self, rows: int | None = None) -> dict[str, Any]:
        """The header's description of the storage; rows: the slots stored per column (all but the
        small state column), default all `capacity`."""
        c = dict(self._cfg)
        c["obs_shape"] = list(c["obs_shape"])
        c["embedding_dtype"] = _EMBEDDING_DTYPES[c["embedding_dtype"]]
        rows = self.capacity if rows is None else rows
        c["columns"] = [
            [name, str(dtype).removeprefix("torch."), list(shape if name == "state" else (rows, *shape[1:]))]
            for name, (shape, dtype, _) in self._column_specs().items()
        ]
        return c

    def save(self, path: str | os.PathLike) -> None:
        """Writes the buffer (data, episode state and the sampler's RNG) to path atomically: a
        temporary file in the same directory, fsync, then rename, so a crash mid-save leaves any
        previous file at path intact. Until the ring is full only the slots written so far are
        stored (the file grows with the data, not with the capacity)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        # Under the write lock: no add() changes the columns between checksum and write. The small
        # state column (counters, RNG) is copied, as a sample() in another thread advances the RNG.
        with self._write_lock:
            self._wait_prefetch()
            state = self._columns["state"].clone()
            # Slots are written in order, so slots from `written` on were never written: they hold
            # only what a fresh buffer starts with, which load() recreates.
            rows = min(int(state[0]), self.capacity)  # kStateWritten
            columns = [
                (state if name == "state" else t[:rows]).cpu().numpy()
                for name, t in self._columns.items()
            ]
            header = {
                "layout": self._layout(rows),
                "rows": rows,
                "crc32": [zlib.crc32(_raw_bytes(a)) for a in columns],
            }
            blob = json.dumps(header).encode()
            try:
                with open(tmp, "wb") as f:
                    f.write(
                        _MAGIC + struct.pack("<III", _FORMAT_VERSION, len(blob), zlib.crc32(blob))
                    )
                    f.write(blob)
                    f.writelines(_raw_bytes(a) for a in columns)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _read_header(f: Any, path: Path) -> dict[str, Any]:
        """The checked header; header["rows"] is set for every version (1: all slots)."""
        head = f.read(len(_MAGIC) + 12)
        if len(head) < len(_MAGIC) + 12 or head[: len(_MAGIC)] != _MAGIC:
            raise ValueError(f"ReplayBuffer.load: {path} is not a furl_fast replay buffer file.")
        version, size, crc = struct.unpack("<III", head[len(_MAGIC) :])
        if version not in _READ_VERSIONS:
            raise ValueError(
                f"ReplayBuffer.load: {path} has format version {version}; this furl_fast reads "
                f"versions {', '.join(map(str, _READ_VERSIONS))}."
            )
        blob = f.read(size)
        if len(blob) != size or zlib.crc32(blob) != crc:
            raise ValueError(f"ReplayBuffer.load: the header of {path} is truncated or corrupted.")
        header = json.loads(blob)  # json's errors are ValueErrors
        # A header that passed its checksum may still be malformed: check its structure here so
        # that everything after it reads plain values (never a KeyError or a huge allocation).
        layout = header.get("layout") if isinstance(header, dict) else None
        columns = layout.get("columns") if isinstance(layout, dict) else None
        crcs = header.get("crc32") if isinstance(header, dict) else None
        rows = header.get("rows") if version >= 2 else layout.get("capacity") if columns else None
        if (
            not isinstance(columns, list)
            or not isinstance(crcs, list)
            or len(crcs) != len(columns)
            or not all(_column_entry_ok(e) for e in columns)
            or isinstance(rows, bool)
            or not isinstance(rows, int)
            or not 0 <= rows < 2**62
        ):
            raise ValueError(f"ReplayBuffer.load: the header of {path} has an unknown structure.")
        header["rows"] = rows
        data_bytes = sum(math.prod(shape) * getattr(torch, dt).itemsize for _, dt, shape in columns)
        actual = os.fstat(f.fileno()).st_size
        if actual != len(head) + size + data_bytes:
            raise ValueError(
                f"ReplayBuffer.load: {path} is truncated or has trailing data: {actual} bytes, "
                f"expected {len(head) + size + data_bytes}."
            )
        return header

    @classmethod
    def check_file(cls, path: str | os.PathLike) -> None:
        """Raises ValueError unless path holds a replay buffer file of a version this furl_fast
        reads, whole (header and size; load() verifies the data's checksums). Reads the header only."""
        path = Path(path)
        with open(path, "rb") as f:
            cls._read_header(f, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        pin_memory: bool = False,
        prefetch: bool = False,
    ) -> ReplayBuffer:
        """Reads a buffer written by save(): same data, episodes in progress and RNG state, so it
        samples exactly what the saved one would have. Raises ValueError on a file of another format
        version or layout, or a truncated or corrupted one."""
        path = Path(path)
        with open(path, "rb") as f:
            header = cls._read_header(f, path)
            layout = header["layout"]
            buf = cls.__new__(cls)
            try:
                cfg = {
                    k: layout[k]
                    for k in (
                        "capacity",
                        "obs_shape",
                        "action_dim",
                        "frame_stack",
                        "embedding_dim",
                        "n_step",
                        "gamma",
                        "num_envs",
                        "shift_pad",
                    )
                }
                cfg["embedding_dtype"] = {v: k for k, v in _EMBEDDING_DTYPES.items()}[
                    layout["embedding_dtype"]
                ]
            except (KeyError, TypeError) as exc:
                raise ValueError(
                    f"ReplayBuffer.load: {path} has an unknown layout ({exc!r})."
                ) from exc
            try:
                buf._setup(
                    cfg,
                    device=device,
                    num_threads=num_threads,
                    pin_memory=pin_memory,
                    prefetch=prefetch,
                )
            except TypeError as exc:  # e.g. a list where the layout has a number
                raise ValueError(f"ReplayBuffer.load: {path} has an invalid layout ({exc}).") from exc
            rows = header["rows"]
            # Before allocating: the header's sizes are checked now.
            if rows > buf.capacity or buf._layout(rows) != layout:
                raise ValueError(
                    f"ReplayBuffer.load: {path} has a storage layout this version does not read."
                )
            buf._columns = buf._allocate()
            # A fresh core gives the slots the file does not store (never written) their initial
            # values; the stored rows then overwrite the others.
            buf._make_core(fresh=True, seed=1)
            # (The file's size matches these columns: _read_header checked it against the header.)
            for (name, t), crc in zip(buf._columns.items(), header["crc32"]):
                t = t if name == "state" else t[:rows]
                host = torch.empty(t.shape, dtype=t.dtype) if t.device.type != "cpu" else t
                view = _raw_bytes(host.numpy())
                if f.readinto(view) != len(view) or zlib.crc32(view) != crc:
                    raise ValueError(
                        f"ReplayBuffer.load: column '{name}' of {path} is corrupted (checksum mismatch)."
                    )
                if host is not t:
                    t.copy_(host)
        written = int(buf._columns["state"][0])  # kStateWritten
        if rows < min(written, buf.capacity):  # its missing slots would read as never written
            raise ValueError(
                f"ReplayBuffer.load: {path} is inconsistent: it stores {rows} slots, but "
                f"{min(written, buf.capacity)} were written."
            )
        buf._core = buf._make_core(fresh=False, seed=0)
        return buf

    def restore(self, path: str | os.PathLike) -> None:
        """load() into this buffer; raises ValueError (and changes nothing) if the file's layout
        (capacity, shapes, frame_stack, n_step, gamma, embeddings, ...) differs from this one's."""
        path = Path(path)
        with open(path, "rb") as f:
            header = self._read_header(f, path)
        ours, theirs = self._layout(header["rows"]), header["layout"]
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ValueError(
                f"ReplayBuffer.restore: {path} was written by a buffer of a different layout "
                f"(differs in: {', '.join(diff)})."
            )
        other = ReplayBuffer.load(
            path,
            device=self.device,
            num_threads=self.num_threads,
            pin_memory=self.pin_memory,
            prefetch=False,
        )
        with self._write_lock:
            self._wait_prefetch()
            self._pending = None
            self._columns, self._core = other._columns, other._core

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
