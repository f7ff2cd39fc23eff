"""The ReplayBuffer facade: checks arguments, keeps the storage as torch tensors and hands them
to the C++ core (furl_fast._C.ReplayCore) as DLPack capsules; sample() returns a Batch."""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.dlpack import to_dlpack

from furl_fast import _native
from furl_fast.replay import file_format, sampling
from furl_fast.replay.inputs import Inputs, host_int64, to_tensor
from furl_fast.replay.layout import Layout, allocate, positive_int


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


def _capsule(t: torch.Tensor | None):
    return None if t is None else to_dlpack(t)


def _require_native() -> None:
    if not _native.HAS_NATIVE:
        raise ImportError(_native.IMPORT_ERROR)


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
        _require_native()
        layout = Layout(
            capacity=capacity,
            obs_shape=obs_shape,
            action_dim=action_dim,
            frame_stack=frame_stack,
            embedding_dim=embedding_dim,
            embedding_dtype=embedding_dtype,
            n_step=n_step,
            gamma=gamma,
            num_envs=num_envs,
            shift_pad=shift_pad,
        )
        self._setup(
            layout, device=device, num_threads=num_threads, pin_memory=pin_memory, prefetch=prefetch
        )
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._core = self._make_core(fresh=True, seed=int(seed) % 2**64)

    # ---- construction ------------------------------------------------------------------------

    def _setup(
        self,
        layout: Layout,
        *,
        device: str | torch.device,
        num_threads: int | None,
        pin_memory: bool,
        prefetch: bool,
    ) -> None:
        """Checks the buffer's settings and allocates its (uninitialised) storage columns."""
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
            positive_int(num_threads, "num_threads", maximum=2**31 - 1)
        self._layout = layout
        self._inputs = Inputs(layout, self.device)
        self.num_threads = num_threads
        self.pin_memory = pin_memory
        self.pixels = layout.pixels
        self._columns = allocate(layout, self.device)
        # One add / save at a time; a save sees a consistent state.
        self._write_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
        self._pending: tuple[tuple[int, bool], concurrent.futures.Future] | None = None

    def _make_core(self, *, fresh: bool, seed: int) -> Any:
        """The native core over self._columns; fresh: initialise them (else check what they hold)."""
        capsules = {name: to_dlpack(t) for name, t in self._columns.items()}
        return _native._C.ReplayCore(self._layout.native_layout(self.device), capsules, fresh, seed)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._layout.capacity

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self._layout.obs_shape

    @property
    def frame_stack(self) -> int:
        return self._layout.frame_stack

    @property
    def num_envs(self) -> int:
        return self._layout.num_envs

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

    def _wait_prefetch(self) -> None:
        if self._pending is not None:
            concurrent.futures.wait([self._pending[1]])

    def start_episode(self, obs: Any, *, embedding: Any = None, env: int = 0) -> None:
        """Starts an episode of env with its first observation (after env.reset()).

        obs: (C, H, W) uint8 or (dim,) float; embedding: (D,) float when the buffer stores embeddings.
        Raises if env's previous episode was not ended by a terminated or truncated step.
        """
        o = self._inputs.obs(obs, "obs", "start_episode")
        e = self._inputs.embedding(embedding, "embedding", "start_episode")
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
        o = self._inputs.obs(next_obs, "next_obs", "add")
        a = self._inputs.floats(action, "action", "add", (self._layout.action_dim,))
        e = self._inputs.embedding(embedding, "embedding", "add")
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
        n, op, inputs = self.num_envs, "add_batch", self._inputs
        o = inputs.obs(next_obs, "next_obs", op, n)
        a = inputs.floats(action, "action", op, (n, self._layout.action_dim))
        r = inputs.floats(reward, "reward", op, (n,))
        flags = [
            inputs.flags(value, name, op, n)
            for name, value in (("terminated", terminated), ("truncated", truncated),
                                ("success", success))
        ]  # fmt: skip
        g = inputs.goal_distances(goal_distance, op, n)
        e = inputs.embedding(embedding, "embedding", op, n)
        ro, re = None, None
        if reset_obs is not None:
            ro = inputs.obs(reset_obs, "reset_obs", op, n)
            re = inputs.embedding(reset_embedding, "reset_embedding", op, n)
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
        batch_size = positive_int(batch_size, "batch_size")
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
        idx = host_int64(indices, "indices", "gather")
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(
                f"gather: 'indices' must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}."
            )
        sh = None
        if shifts is not None:
            if not self.pixels:
                raise ValueError("gather: 'shifts' apply to pixel observations only.")
            sh = to_tensor(shifts, "shifts", "gather")
            if sh.is_floating_point() or tuple(sh.shape) != (idx.numel(), 4):
                raise ValueError(
                    f"gather: 'shifts' must be ({idx.numel()}, 4) integers, got "
                    f"{tuple(sh.shape)} {sh.dtype}."
                )
            sh = sh.to(device="cpu", dtype=torch.int32).contiguous()
        return self._sample(idx.numel(), False, idx, sh)

    def earlier(self, indices: Any, k: int) -> torch.Tensor:
        """For each valid transition index, the index of the transition k steps earlier in the same
        episode, clamped to the earliest one of that episode still stored (check Batch.steps to see
        whether the full k steps were available). indices: (B,) int64 -> (B,) int64."""
        idx = host_int64(indices, "indices", "earlier")
        if idx.dim() != 1:
            raise ValueError(f"earlier: 'indices' must be 1-D, got shape {tuple(idx.shape)}.")
        # More steps back than the ring holds reaches the same (earliest) transition.
        k = min(positive_int(k, "k", 0), self.capacity)
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
        if reuse is not None:  # the native side checks every shape and dtype again
            out = {k: v for k, v in reuse._asdict().items() if v is not None}
            self._core.sample(
                b, augment, None, None, {k: _capsule(v) for k, v in out.items()},
                self.num_threads or 0,
            )  # fmt: skip
            return reuse
        cuda = self.device.type == "cuda"
        plan = sampling.plan(self._layout, b, gpu=cuda)
        if cuda:
            packed, out = sampling.packed(plan, torch.device("cpu"), pin_memory=True)
        else:
            out = {k: self._empty(shape, dtype) for k, (shape, dtype) in plan.items()}
        self._core.sample(
            b,
            augment,
            _capsule(indices),
            _capsule(shifts),
            {k: _capsule(v) for k, v in out.items()},
            self.num_threads or 0,
        )
        if cuda:
            out = sampling.gather_cuda(packed, plan, self._layout, self._columns, self._stream())
        fields = {k: out.get(k) for k in Batch._fields if k in out}
        return Batch(**fields)

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Writes the buffer (data, episode state and the sampler's RNG) to path atomically: a
        temporary file in the same directory, fsync, then rename, so a crash mid-save leaves any
        previous file at path intact. Until the ring is full only the slots written so far are
        stored (the file grows with the data, not with the capacity)."""
        with self._write_lock:  # no add() changes the columns while they are written
            self._wait_prefetch()
            file_format.save(path, self._layout, self._columns)

    @staticmethod
    def check_file(path: str | os.PathLike) -> None:
        """Raises ValueError unless path holds a replay buffer file of a version this furl_fast
        reads, whole (header and size; load() verifies the data's checksums). Reads the header only."""
        file_format.check_file(path)

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
        _require_native()
        buf = cls.__new__(cls)

        def storage(layout: Layout) -> dict[str, torch.Tensor]:
            buf._setup(
                layout, device=device, num_threads=num_threads, pin_memory=pin_memory,
                prefetch=prefetch,
            )  # fmt: skip
            # A fresh core gives the slots the file does not store (never written) their initial
            # values; the stored rows then overwrite the others.
            buf._make_core(fresh=True, seed=1)
            return buf._columns

        file_format.load(path, storage)
        buf._core = buf._make_core(fresh=False, seed=0)  # checks what the file holds
        return buf

    def restore(self, path: str | os.PathLike) -> None:
        """load() into this buffer; raises ValueError (and changes nothing) if the file's layout
        (capacity, shapes, frame_stack, n_step, gamma, embeddings, ...) differs from this one's."""
        file_format.check_same_layout(path, self._layout)
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
