"""furl_fast.ReplayBuffer against an independent pure-Python model of what it must return."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from furl_fast import ReplayBuffer, _native, reference
from furl_fast.replay import file_format

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


# ---- the oracle ----------------------------------------------------------------------------------


class Model:
    """What the buffer stores, kept as a plain log of every observation in write order (seq)."""

    def __init__(self, capacity: int, frame_stack: int, n_step: int, gamma: float) -> None:
        self.capacity, self.f, self.n, self.gamma = capacity, frame_stack, n_step, gamma
        self.obs: list[dict] = []  # per seq: frame, embedding, episode, position in episode
        self.episodes: list[list[int]] = []  # per episode: its seqs in order
        self.steps: list[list[dict]] = []  # per episode: its transitions (action, reward, ...)
        self.open: dict[int, int] = {}  # env -> episode

    def start(self, env, frame, emb=None):
        ep = len(self.episodes)
        self.episodes.append([len(self.obs)])
        self.steps.append([])
        self.obs.append({"frame": frame, "emb": emb, "episode": ep, "t": 0})
        self.open[env] = ep

    def add(self, env, frame, action, reward, term, trunc, success=False, goal=math.nan, emb=None):
        ep = self.open[env]
        self.steps[ep].append(
            {
                "action": action,
                "reward": reward,
                "term": term,
                "trunc": trunc,
                "success": success,
                "goal": goal,
            }
        )
        self.episodes[ep].append(len(self.obs))
        self.obs.append(
            {"frame": frame, "emb": emb, "episode": ep, "t": len(self.episodes[ep]) - 1}
        )
        if term or trunc:
            del self.open[env]

    def alive(self, seq):
        return seq >= len(self.obs) - self.capacity

    def window(self, ep, t):
        """(k, last) of the n-step window of transition t, or None while it is incomplete."""
        steps = self.steps[ep]
        for j in range(t, t + self.n):
            if j >= len(steps):
                return None
            if steps[j]["term"] or steps[j]["trunc"] or j == t + self.n - 1:
                return j - t + 1, j
        raise AssertionError

    def valid(self):
        """seq -> (episode, t) of every transition that may be sampled."""
        out = {}
        for ep, seqs in enumerate(self.episodes):
            for t in range(len(self.steps[ep])):
                first = seqs[max(t - self.f + 1, 0)]
                if self.alive(first) and self.window(ep, t) is not None:
                    out[seqs[t]] = (ep, t)
        return out

    def expected(self, seq):
        o = self.obs[seq]
        ep, t = o["episode"], o["t"]
        seqs, steps = self.episodes[ep], self.steps[ep]
        k, last = self.window(ep, t)

        def stack(pos):
            return torch.cat(
                [self.obs[seqs[max(pos - j, 0)]]["frame"] for j in range(self.f - 1, -1, -1)]
            )

        ret = sum(self.gamma**j * steps[t + j]["reward"] for j in range(k))
        discount = 0.0 if steps[last]["term"] else self.gamma**k
        return {
            "obs": stack(t),
            "next_obs": stack(last + 1),
            "action": steps[t]["action"],
            "reward": ret,
            "discount": discount,
            "success": steps[t]["success"],
            "goal": steps[t]["goal"],
            "episode": ep,
            "step": t,
            "emb": o["emb"],
            "next_emb": self.obs[seqs[last + 1]]["emb"],
        }


def check_batch(model: Model, buf: ReplayBuffer, batch, shifts=None):
    valid = model.valid()
    slot_to_seq = {seq % model.capacity: seq for seq in valid}
    for i, index in enumerate(batch.indices.tolist()):
        assert index in slot_to_seq, f"sampled index {index} is not a valid transition"
        e = model.expected(slot_to_seq[index])
        obs, next_obs = e["obs"], e["next_obs"]
        if shifts is not None:
            obs = reference.random_shift(obs[None], shifts[i : i + 1, :2])[0]
            next_obs = reference.random_shift(next_obs[None], shifts[i : i + 1, 2:])[0]
        torch.testing.assert_close(batch.obs[i], obs, rtol=0, atol=0)
        torch.testing.assert_close(batch.next_obs[i], next_obs, rtol=0, atol=0)
        torch.testing.assert_close(batch.action[i], e["action"])
        assert batch.reward[i].item() == pytest.approx(e["reward"], rel=1e-6, abs=1e-6)
        assert batch.discount[i].item() == pytest.approx(e["discount"], rel=1e-6)
        assert batch.success[i].item() == e["success"]
        assert (math.isnan(e["goal"]) and math.isnan(batch.goal_distance[i].item())) or (
            batch.goal_distance[i].item() == pytest.approx(e["goal"])
        )
        assert (batch.episodes[i].item(), batch.steps[i].item()) == (e["episode"], e["step"])
        if e["emb"] is not None:
            torch.testing.assert_close(batch.embedding[i], e["emb"], rtol=0, atol=0)
            torch.testing.assert_close(batch.next_embedding[i], e["next_emb"], rtol=0, atol=0)


def random_frame(g, shape=(3, 6, 6)):
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def fill(buf, model, g, episodes, *, max_len=9, env=0, emb_dim=0, emb_dtype=torch.float32):
    """Adds `episodes` episodes of random length to env, mirroring them into the model."""
    for _ in range(episodes):
        emb = torch.randn(emb_dim, generator=g).to(emb_dtype) if emb_dim else None
        frame = random_frame(g, buf.obs_shape)
        buf.start_episode(frame, embedding=emb, env=env)
        model.start(env, frame, emb)
        length = int(torch.randint(1, max_len + 1, (1,), generator=g))
        terminated = bool(torch.rand(1, generator=g) < 0.5)
        for t in range(length):
            emb = torch.randn(emb_dim, generator=g).to(emb_dtype) if emb_dim else None
            frame = random_frame(g, buf.obs_shape)
            action = torch.randn(buf._layout.action_dim, generator=g)
            reward = float(torch.randn(1, generator=g))
            goal = float(torch.rand(1, generator=g))
            success = bool(torch.rand(1, generator=g) < 0.3)
            last = t == length - 1
            buf.add(
                frame,
                action,
                reward,
                last and terminated,
                last and not terminated,
                success=success,
                embedding=emb,
                goal_distance=goal,
                env=env,
            )
            model.add(
                env,
                frame,
                action,
                reward,
                last and terminated,
                last and not terminated,
                success,
                goal,
                emb,
            )


def all_valid_indices(model):
    return torch.tensor(sorted(seq % model.capacity for seq in model.valid()), dtype=torch.int64)


# ---- augmentation ------------------------------------------------------------------------------


def drqv2_random_shift(x: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ-v2's RandomShiftsAug with given shifts: replicate pad, then grid_sample of a pixel-centre
    grid translated by shift * 2 / (h + 2 pad), align_corners=False. x: (N, C, H, H) float."""
    n, _, h, w = x.shape
    assert h == w
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    line = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, dtype=x.dtype)[:h]
    xs = line.view(1, h).expand(h, h)  # grid[..., 0] indexes width
    ys = line.view(h, 1).expand(h, h)
    grid = torch.stack([xs, ys], dim=-1).expand(n, h, h, 2)
    grid = grid + shifts.view(n, 1, 1, 2).to(x.dtype) * (2.0 / (h + 2 * pad))
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("size", [1, 3, 7, 84])
@pytest.mark.parametrize("pad", [1, 4])
def test_reference_random_shift_matches_drqv2_grid_sample(size, pad):
    g = torch.Generator().manual_seed(1000 * size + pad)
    frames = torch.randint(0, 256, (32, 9, size, size), generator=g, dtype=torch.uint8)
    shifts = torch.randint(0, 2 * pad + 1, (32, 2), generator=g)
    ours = reference.random_shift(frames, shifts, pad)
    assert ours.dtype == torch.uint8
    # float64: grid_sample lands on pixel centres up to rounding of the grid coordinates
    torch.testing.assert_close(
        drqv2_random_shift(frames.double(), shifts, pad), ours.double(), rtol=0, atol=1e-6
    )
    # float32 (what DrQ-v2 runs): off by at most a few 1e-3 from coordinate rounding, so exact
    # after rounding to the uint8 grid
    oracle32 = drqv2_random_shift(frames.float(), shifts, pad)
    assert (oracle32 - ours.float()).abs().max() < 0.01
    torch.testing.assert_close(oracle32.round().to(torch.uint8), ours, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 84, 84), (3, 7, 5), (1, 2, 3)])
def test_native_shift_equals_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    buf = ReplayBuffer(64, shape, 2, frame_stack=3, seed=1)
    model = Model(64, 3, 1, 0.99)
    fill(buf, model, g, 8)
    idx = all_valid_indices(model)
    shifts = torch.randint(0, 9, (idx.numel(), 4), generator=g, dtype=torch.int32)
    shifted = buf.gather(idx, shifts=shifts)
    plain = buf.gather(idx)
    torch.testing.assert_close(
        shifted.obs, reference.random_shift(plain.obs, shifts[:, :2]), rtol=0, atol=0
    )
    torch.testing.assert_close(
        shifted.next_obs, reference.random_shift(plain.next_obs, shifts[:, 2:]), rtol=0, atol=0
    )
    check_batch(model, buf, shifted, shifts)


def test_shift_distribution_uniform_and_independent():
    # Frames whose pixel (y, x) holds y * 16 + x: the centre pixel of a shifted frame reveals the shift.
    h = w = 12
    frame = (torch.arange(h).view(h, 1) * 16 + torch.arange(w)).to(torch.uint8).expand(3, h, w)
    buf = ReplayBuffer(300, (3, h, w), 1, seed=3)
    buf.start_episode(frame)
    for t in range(256):
        buf.add(frame, [0.0], 0.0, False, t == 255)
    counts = torch.zeros(9, 9)
    same = 0
    rounds = 40
    for _ in range(rounds):
        b = buf.sample(256)
        centre = b.obs[:, 0, 6, 6].long(), b.next_obs[:, 0, 6, 6].long()
        sy, sx = centre[0] // 16 - 2, centre[0] % 16 - 2  # centre (6, 6) reads (2 + sy, 2 + sx)
        ny, nx = centre[1] // 16 - 2, centre[1] % 16 - 2
        assert sx.min() >= 0 and sx.max() <= 8 and sy.min() >= 0 and sy.max() <= 8
        counts.index_put_((sy, sx), torch.ones(256), accumulate=True)
        same += int(((sy == ny) & (sx == nx)).sum())
    n = rounds * 256
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 160, chi2  # 80 degrees of freedom: p < 1e-6 above 160
    assert abs(same / n - 1 / 81) < 0.01  # obs and next_obs shifts independent


# ---- storage semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("frame_stack,n_step", [(1, 1), (3, 1), (3, 3), (2, 5)])
def test_wraparound_matches_model(frame_stack, n_step):
    g = torch.Generator().manual_seed(10 * frame_stack + n_step)
    cap = 37
    buf = ReplayBuffer(cap, (3, 5, 4), 3, frame_stack=frame_stack, n_step=n_step, gamma=0.9, seed=5)
    model = Model(cap, frame_stack, n_step, 0.9)
    for _ in range(25):  # ~5 passes over the ring
        fill(buf, model, g, 2, max_len=12)
        idx = all_valid_indices(model)
        assert len(buf) == idx.numel()
        shifts = torch.randint(0, 9, (idx.numel(), 4), generator=g, dtype=torch.int32)
        check_batch(model, buf, buf.gather(idx, shifts=shifts), shifts)
        check_batch(model, buf, buf.sample(min(16, len(buf)), augment=False))


def test_frame_stack_repeats_first_frame_and_never_crosses_episodes():
    buf = ReplayBuffer(100, (1, 1, 1), 1, frame_stack=4, seed=0)
    for ep in range(2):
        buf.start_episode(torch.tensor([[[10 * ep]]], dtype=torch.uint8))
        for t in range(1, 4):
            buf.add(torch.tensor([[[10 * ep + t]]], dtype=torch.uint8), [0.0], 0.0, False, t == 3)
    b = buf.gather(
        torch.arange(4, 7)
    )  # episode 1 starts at slot 4; slot 3 is episode 0's last frame
    assert b.obs[:, :, 0, 0].tolist() == [[10, 10, 10, 10], [10, 10, 10, 11], [10, 10, 11, 12]]
    assert b.next_obs[:, :, 0, 0].tolist() == [[10, 10, 10, 11], [10, 10, 11, 12], [10, 11, 12, 13]]
    assert buf.gather(torch.tensor([2])).next_obs[0, :, 0, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not a sampleable transition"):
        buf.gather(torch.tensor([3]))  # episode 0's final observation has no transition


def test_nstep_termination_and_truncation():
    gamma = 0.5
    for terminated, discount_at_end in ((True, 0.0), (False, gamma)):
        buf = ReplayBuffer(20, (2,), 1, n_step=3, gamma=gamma, seed=0)
        buf.start_episode([0.0, 0.0])
        for t in range(1, 5):  # 4 steps, rewards 1, 2, 3, 4; the last one ends the episode
            end = t == 4
            buf.add([float(t), 0.0], [0.0], float(t), end and terminated, end and not terminated)
        b = buf.gather(torch.arange(4))
        assert b.reward.tolist() == pytest.approx([1 + 1 + 0.75, 2 + 1.5 + 1, 3 + 2, 4])
        end = discount_at_end  # the window of transitions 1, 2, 3 reaches the episode's end
        assert b.discount.tolist() == pytest.approx([gamma**3, end * gamma**2, end * gamma, end])
        assert b.next_obs[:, 0].tolist() == [3.0, 4.0, 4.0, 4.0]


def test_nstep_window_must_be_complete_before_sampling():
    buf = ReplayBuffer(20, (1,), 1, n_step=3, seed=0)
    buf.start_episode([0.0])
    for t in range(1, 4):
        assert len(buf) == 0  # before the 3rd step no window of 3 steps is complete
        buf.add([float(t)], [0.0], 1.0, False, False)
    assert len(buf) == 1 and buf.sample(1).indices.tolist() == [0]
    buf.add([4.0], [0.0], 1.0, True, False)  # the end completes every open window
    assert len(buf) == 4


def test_vector_envs_interleaved_with_autoreset():
    g = torch.Generator().manual_seed(7)
    n, cap = 3, 41
    buf = ReplayBuffer(
        cap,
        (2, 3, 3),
        2,
        frame_stack=2,
        n_step=2,
        gamma=0.9,
        num_envs=n,
        embedding_dim=4,
        embedding_dtype=torch.float16,
        seed=0,
    )
    model = Model(cap, 2, 2, 0.9)
    for e in range(n):
        frame, emb = random_frame(g, (2, 3, 3)), torch.randn(4, generator=g).half()
        buf.start_episode(frame, embedding=emb, env=e)
        model.start(e, frame, emb)
    for _ in range(60):
        obs = torch.randint(0, 256, (n, 2, 3, 3), generator=g, dtype=torch.uint8)
        emb = torch.randn(n, 4, generator=g).half()
        act, rew = torch.randn(n, 2, generator=g), torch.randn(n, generator=g)
        term, trunc = torch.rand(n, generator=g) < 0.1, torch.rand(n, generator=g) < 0.1
        trunc &= ~term
        succ = torch.rand(n, generator=g) < 0.5
        reset, reset_emb = (
            torch.randint(0, 256, (n, 2, 3, 3), generator=g, dtype=torch.uint8),
            torch.randn(n, 4, generator=g).half(),
        )
        buf.add_batch(
            obs,
            act,
            rew,
            term,
            trunc,
            success=succ,
            embedding=emb,
            reset_obs=reset,
            reset_embedding=reset_emb,
        )
        for e in range(n):
            model.add(
                e,
                obs[e],
                act[e],
                float(rew[e]),
                bool(term[e]),
                bool(trunc[e]),
                bool(succ[e]),
                math.nan,
                emb[e],
            )
            if term[e] or trunc[e]:
                model.start(e, reset[e], reset_emb[e])
        idx = all_valid_indices(model)
        assert len(buf) == idx.numel()
        if idx.numel():
            check_batch(model, buf, buf.gather(idx))


def test_earlier_clamps_to_episode_start_and_overwritten_start():
    buf = ReplayBuffer(12, (1,), 1, seed=0)
    buf.start_episode([0.0])
    for t in range(1, 8):
        buf.add([float(t)], [0.0], 0.0, False, t == 7)  # episode 0: slots 0..7, transitions 0..6
    idx = torch.tensor([6, 3, 0])
    assert buf.earlier(idx, 2).tolist() == [4, 1, 0]
    assert buf.earlier(idx, 10).tolist() == [0, 0, 0]
    buf.start_episode([100.0])
    for t in range(1, 6):  # slots 8..11, then 0, 1: episode 0's steps 0 and 1 are overwritten
        buf.add([100.0 + t], [0.0], 0.0, False, False)
    assert buf.gather(buf.earlier(torch.tensor([6]), 10)).steps.tolist() == [2]
    assert buf.gather(buf.earlier(torch.tensor([11]), 2)).steps.tolist() == [1]


def test_one_frame_stored_per_step():
    # An episode of T steps takes exactly T + 1 observation slots: nothing else is stored per frame.
    steps = 50
    buf = ReplayBuffer(steps + 1, (3, 84, 84), 4, frame_stack=3, seed=0)
    buf.start_episode(torch.zeros(3, 84, 84, dtype=torch.uint8))
    for t in range(steps):
        buf.add(
            torch.full((3, 84, 84), t + 1, dtype=torch.uint8),
            torch.zeros(4),
            0.0,
            False,
            t == steps - 1,
        )
    assert len(buf) == steps
    assert buf.gather(buf.earlier(torch.tensor([steps - 1]), steps)).steps.tolist() == [0]
    frame_bytes = 3 * 84 * 84
    per_slot = buf.nbytes / buf.capacity
    assert frame_bytes <= per_slot <= frame_bytes + 100  # ~61 bytes of per-step metadata


def test_numpy_inputs_including_flipped_frames():
    frame = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    buf = ReplayBuffer(10, (2, 3, 4), 2, seed=0)
    buf.start_episode(frame[:, ::-1])  # negative strides, as after a vertical flip
    buf.add(frame, np.array([0.5, -0.5]), np.float32(1.0), np.bool_(False), np.bool_(True))
    b = buf.gather([0])
    assert np.array_equal(b.obs[0].numpy(), frame[:, ::-1])
    assert np.array_equal(b.next_obs[0].numpy(), frame)
    assert b.action.tolist() == [[0.5, -0.5]] and b.reward.tolist() == [1.0]


def test_state_vectors_embeddings_and_goal_distance():
    g = torch.Generator().manual_seed(11)
    buf = ReplayBuffer(30, (5,), 2, frame_stack=2, n_step=2, embedding_dim=3, seed=0)
    model = Model(30, 2, 2, 0.99)
    for _ in range(6):
        first = torch.randn(5, generator=g)
        emb = torch.randn(3, generator=g)
        buf.start_episode(first.double().numpy(), embedding=emb)  # float64 numpy is accepted
        model.start(0, first, emb)
        for t in range(4):
            obs, emb, act = (
                torch.randn(5, generator=g),
                torch.randn(3, generator=g),
                torch.randn(2, generator=g),
            )
            buf.add(
                obs,
                act,
                0.5 * t,
                t == 3,
                False,
                success=t == 2,
                embedding=emb,
                goal_distance=float(t),
            )
            model.add(0, obs, act, 0.5 * t, t == 3, False, t == 2, float(t), emb)
    b = buf.gather(all_valid_indices(model))
    assert b.obs.shape == (len(buf), 10) and b.obs.dtype == torch.float32
    check_batch(model, buf, b)
    assert buf.sample(4, augment=True).obs.shape == (4, 10)  # augment ignored for state vectors


# ---- determinism, threads, prefetch ------------------------------------------------------------


def _filled(seed, **kw):
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(60, (3, 8, 8), 2, frame_stack=3, n_step=2, seed=seed, **kw)
    fill(buf, Model(60, 3, 2, 0.99), g, 12)
    return buf


def _equal(x, y):
    if not isinstance(x, torch.Tensor):
        return x == y
    return (
        x.shape == y.shape
        and x.dtype == y.dtype
        and bool(
            torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all()
            if x.is_floating_point()
            else torch.equal(x, y)
        )
    )


def _same(a, b):
    return all(_equal(x, y) for x, y in zip(a, b))


def test_seed_determinism_and_thread_count_independence():
    a, b, c, d = _filled(1, num_threads=1), _filled(1, num_threads=2), _filled(2), _filled(1)
    for _ in range(3):
        ba, bb, bc = a.sample(32), b.sample(32), c.sample(32)
        assert _same(ba, bb)
        assert not torch.equal(ba.indices, bc.indices)
    assert not _same(d.sample(32), d.sample(32))  # draws advance


def test_sample_into_reused_batch():
    a, b = _filled(7), _filled(7)
    reused = b.sample(16)
    a.sample(16)
    for _ in range(3):
        expected = a.sample(16)
        got = b.sample(16, out=reused)
        assert got is reused and _same(expected, got)
    with pytest.raises(ValueError, match="must have size 8 in dimension 0"):
        b.sample(8, out=reused)


def test_prefetch_gives_the_same_batches():
    plain, pre = _filled(4), _filled(4, prefetch=True)
    for _ in range(4):  # no adds in between: the same sequence of draws
        assert _same(plain.sample(16), pre.sample(16))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    m1, m2 = Model(60, 3, 2, 0.99), Model(60, 3, 2, 0.99)
    x, y = _filled(5, prefetch=True), _filled(5, prefetch=True)
    for _ in range(5):  # with adds in between, prefetching stays deterministic
        assert _same(x.sample(8), y.sample(8))
        fill(x, m1, g1, 1)
        fill(y, m2, g2, 1)


def test_add_in_one_thread_while_sampling_in_another():
    # Frames carry (episode, step) in their pixels, so any torn or stitched stack shows up.
    cap, fs = 50, 3
    buf = ReplayBuffer(cap, (2, 4, 4), 1, frame_stack=fs, n_step=2, seed=0, num_threads=2)

    def frame(ep, t):
        f = torch.empty(2, 4, 4, dtype=torch.uint8)
        f[0], f[1] = ep % 256, t
        return f

    stop = threading.Event()
    errors = []

    def writer():
        ep = 0
        try:
            while not stop.is_set():
                buf.start_episode(frame(ep, 0))
                for t in range(1, 8):
                    buf.add(frame(ep, t), [0.0], 1.0, False, t == 7)
                ep += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(buf) < 8:
            time.sleep(0.001)
        deadline, batches = time.monotonic() + 1.5, 0
        while time.monotonic() < deadline or batches < 50:
            b = buf.sample(8, augment=False)
            ep, t = b.episodes % 256, b.steps
            for j in range(fs):
                lag = fs - 1 - j
                assert torch.equal(b.obs[:, 2 * j, 0, 0].long(), ep), "stack mixes episodes"
                assert torch.equal(b.obs[:, 2 * j + 1, 0, 0].long(), (t - lag).clamp(min=0))
            k = torch.where(t == 6, 1, 2)  # step 6 is the last transition (truncated)
            assert torch.equal(b.next_obs[:, -1, 0, 0].long(), t + k)
            assert torch.equal(b.next_obs[:, -2, 0, 0].long(), ep)
            batches += 1
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


# ---- persistence -------------------------------------------------------------------------------


def _saved_buffer(tmp_path):
    g = torch.Generator().manual_seed(21)
    buf = ReplayBuffer(
        40,
        (3, 6, 6),
        2,
        frame_stack=2,
        n_step=2,
        embedding_dim=3,
        embedding_dtype=torch.float16,
        seed=8,
    )
    fill(buf, Model(40, 2, 2, 0.99), g, 9, emb_dim=3, emb_dtype=torch.float16)  # wraps around
    buf.start_episode(random_frame(g), embedding=torch.zeros(3))  # an episode in progress
    buf.add(random_frame(g), [0.0, 1.0], 1.0, False, False, embedding=torch.ones(3))
    path = tmp_path / "buffer.bin"
    buf.save(path)
    return buf, path


def test_save_load_round_trip(tmp_path):
    buf, path = _saved_buffer(tmp_path)
    loaded = ReplayBuffer.load(path)
    assert len(loaded) == len(buf) and loaded.episode_open(0)
    for _ in range(3):  # RNG state restored: the same draws
        assert _same(buf.sample(16), loaded.sample(16))
    for b in (buf, loaded):  # and the open episode continues
        b.add(
            torch.zeros(3, 6, 6, dtype=torch.uint8),
            [1.0, 1.0],
            2.0,
            False,
            True,
            embedding=torch.ones(3),
        )
    assert _same(buf.sample(16), loaded.sample(16))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def _partly_filled(steps: int) -> ReplayBuffer:
    """A state buffer with FuRL-sized embeddings (RN50: 1024 float16), `steps` steps into one
    episode of a ring 100x larger."""
    g = torch.Generator().manual_seed(5)
    buf = ReplayBuffer(100 * steps, (39,), 4, embedding_dim=1024, embedding_dtype=torch.float16,
                       seed=3)
    buf.start_episode(torch.randn(39, generator=g), embedding=torch.randn(1024, generator=g))
    for t in range(steps):
        buf.add(torch.randn(39, generator=g), torch.rand(4, generator=g), float(t), False,
                t == steps - 1, embedding=torch.randn(1024, generator=g))
    return buf


def test_save_writes_only_the_slots_written_so_far(tmp_path):
    buf, path = _partly_filled(50), tmp_path / "partial.bin"
    buf.save(path)
    per_slot = buf.nbytes / buf.capacity  # every column but the tiny state column is per slot
    # 51 observations written (the first one too), plus the JSON header: far from 5000 slots.
    assert 51 * per_slot < path.stat().st_size < 51 * per_slot + 8192
    loaded = ReplayBuffer.load(path)
    assert len(loaded) == len(buf) == 50
    for _ in range(3):
        assert _same(buf.sample(32), loaded.sample(32))
    for b in (buf, loaded):  # the never-written slots are usable: the ring keeps filling them
        b.start_episode(torch.zeros(39), embedding=torch.zeros(1024))
        b.add(torch.ones(39), torch.zeros(4), 1.0, True, False, embedding=torch.ones(1024))
    assert len(loaded) == 51 and _same(buf.sample(48), loaded.sample(48))
    empty = tmp_path / "empty.bin"
    ReplayBuffer(8, (2,), 1).save(empty)  # nothing written: only the header and the counters
    assert len(ReplayBuffer.load(empty)) == 0 and empty.stat().st_size < 4096


def _version_1_file(buf: ReplayBuffer, path: Path) -> None:
    """The previous format: every column in full (unwritten slots as zeros), no "rows" entry."""
    import json
    import struct
    import zlib

    cols = []
    for name, t in buf._columns.items():
        a = t.clone()
        if name in ("frames", "embeddings"):
            a[int(buf._columns["state"][0]) :] = 0
        cols.append(a.numpy().tobytes())
    layout = file_format.header_layout(buf._layout, buf.capacity)
    blob = json.dumps({"layout": layout, "crc32": [zlib.crc32(c) for c in cols]}).encode()
    path.write_bytes(b"FURLRPB\x00" + struct.pack("<III", 1, len(blob), zlib.crc32(blob)) + blob
                     + b"".join(cols))


def test_version_1_files_still_load(tmp_path):
    buf, path = _partly_filled(20), tmp_path / "v1.bin"
    _version_1_file(buf, path)
    assert path.stat().st_size > buf.nbytes  # the old format: the whole ring
    loaded = ReplayBuffer.load(path)
    assert _same(buf.sample(16), loaded.sample(16))
    restored = ReplayBuffer(2000, (39,), 4, embedding_dim=1024, embedding_dtype=torch.float16)
    restored.restore(path)
    assert len(restored) == 20


def test_a_file_missing_written_slots_is_refused(tmp_path):
    """A version 2 header that claims fewer stored slots than the counters say were written (the
    checksums fixed, as a bug rather than a disk would write it)."""
    import json
    import struct
    import zlib

    buf, path = _partly_filled(10), tmp_path / "short.bin"
    buf.save(path)
    data = path.read_bytes()
    size = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[20 : 20 + size])
    cols, pos = [], 20 + size
    for name, dtype, shape in header["layout"]["columns"]:
        n = math.prod(shape) * getattr(torch, dtype).itemsize
        col = data[pos : pos + n]
        pos += n
        if name != "state":  # keep 5 of the 11 written slots
            shape[0] = 5
            col = col[: n // 11 * 5]
        cols.append(col)
    header["rows"], header["crc32"] = 5, [zlib.crc32(c) for c in cols]
    blob = json.dumps(header).encode()
    path.write_bytes(data[:8] + struct.pack("<III", 2, len(blob), zlib.crc32(blob)) + blob
                     + b"".join(cols))
    with pytest.raises(ValueError, match="inconsistent: it stores 5 slots, but 11 were written"):
        ReplayBuffer.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    buf, path = _saved_buffer(tmp_path)
    before = path.read_bytes()
    buf.sample(4)

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        buf.save(path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


FORMAT_V2_FILE = Path(__file__).parent / "replay_files" / "format_v2.bin"


def test_files_of_the_current_format_load_and_save_byte_for_byte(tmp_path):
    """A version 2 file kept from when the format was introduced (pixels (3, 4, 5), float16
    embeddings, two envs with open episodes, the RNG advanced by a sample) loads, samples what its
    saved RNG state draws, and saves back to the same bytes: reader and writer stay compatible."""
    buf = ReplayBuffer.load(FORMAT_V2_FILE)
    assert (buf.capacity, buf.obs_shape, buf.num_envs, len(buf)) == (16, (3, 4, 5), 2, 8)
    assert buf.episode_open(0) and buf.episode_open(1)
    buf.save(tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == FORMAT_V2_FILE.read_bytes()
    assert buf.sample(3).indices.tolist() == [2, 2, 5]
    same = ReplayBuffer(16, (3, 4, 5), 2, frame_stack=2, n_step=2, gamma=0.9, num_envs=2,
                        embedding_dim=3, embedding_dtype=torch.float16, shift_pad=2)  # fmt: skip
    same.restore(FORMAT_V2_FILE)
    assert same.sample(3).indices.tolist() == [2, 2, 5]


def test_storage_columns_are_the_native_list():
    """The facade allocates, and a file lists, exactly the columns FURL_REPLAY_COLUMNS declares,
    in its order (embeddings only with embedding_dim > 0)."""
    names = [name for name, *_ in _native._C.replay_columns()]
    for buf in (ReplayBuffer(8, (2,), 1), ReplayBuffer(8, (3, 4, 4), 1, embedding_dim=2)):
        stored = [n for n in names if n != "embeddings" or buf._layout.embedding_dim]
        assert list(buf._columns) == stored
        header = file_format.header_layout(buf._layout, 3)
        assert [name for name, _, _ in header["columns"]] == stored
    for name, dtype, shape, device in _native._C.replay_columns():
        assert dtype in ("uint8", "int32", "int64", "float32", "obs", "embedding"), name
        assert shape in ("slot", "action", "obs", "embedding", "state"), name
        assert device in ("host", "buffer"), name


def test_native_core_names_missing_and_unknown_columns():
    buf = ReplayBuffer(8, (2,), 1, embedding_dim=2, seed=0)
    layout = buf._layout.native_layout(buf.device)
    cols = {k: torch.utils.dlpack.to_dlpack(t) for k, t in buf._columns.items()}
    with pytest.raises(ValueError, match=r"storage column 'embeddings' is missing"):
        _native._C.ReplayCore(layout, {k: v for k, v in cols.items() if k != "embeddings"}, True, 0)
    with pytest.raises(ValueError, match=r"unknown storage column 'bogus'"):
        _native._C.ReplayCore(layout, {**cols, "bogus": cols["rewards"]}, True, 0)


def test_gpu_mode_plan_and_gather_run_on_the_cpu(monkeypatch):
    """GPU mode's sample path (the packed plan of slots and shifts, then the gather) with CPU
    tensors and the CPU shift kernel standing in for the CUDA one: the same batches as CPU mode."""
    from furl_fast.replay import sampling

    monkeypatch.setattr(_native._C, "random_shift_cuda", _native._C.random_shift_cpu, raising=False)
    for obs_shape in ((3, 5, 4), (3,)):
        buf = ReplayBuffer(30, obs_shape, 2, frame_stack=2, n_step=3, embedding_dim=4, seed=1)
        g = torch.Generator().manual_seed(2)
        for t in range(40):
            obs = torch.randint(0, 256, obs_shape, generator=g, dtype=torch.uint8)
            obs = obs if buf.pixels else obs.float()
            if not buf.episode_open():
                buf.start_episode(obs, embedding=torch.randn(4, generator=g))
            buf.add(obs, torch.randn(2, generator=g), float(t), t % 7 == 6, False,
                    embedding=torch.randn(4, generator=g))  # fmt: skip
        idx = buf.sample(7).indices
        shifts = torch.randint(0, 9, (7, 4), dtype=torch.int32) if buf.pixels else None
        expected = buf.gather(idx, shifts=shifts)
        plan = sampling.plan(buf._layout, 7, gpu=True)
        packed, out = sampling.packed(plan, torch.device("cpu"))
        capsules = {k: torch.utils.dlpack.to_dlpack(v) for k, v in out.items()}
        sh = None if shifts is None else torch.utils.dlpack.to_dlpack(shifts)
        buf._core.sample(7, False, torch.utils.dlpack.to_dlpack(idx), sh, capsules, 1)
        got = sampling.gather_cuda(packed, plan, buf._layout, buf._columns, 0)
        assert set(got) == {k for k, v in expected._asdict().items() if v is not None}
        for k, v in got.items():
            torch.testing.assert_close(v, getattr(expected, k), rtol=0, atol=0, equal_nan=True,
                                       msg=k)  # goal_distance: NaN, not given


def test_load_rejects_bad_files(tmp_path):
    _, path = _saved_buffer(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        ReplayBuffer.load(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        ReplayBuffer.load(bad)
    bad.write_bytes(b"not a buffer" * 4)
    with pytest.raises(ValueError, match="not a furl_fast replay buffer"):
        ReplayBuffer.load(bad)
    versioned = bytearray(data)
    versioned[8] = 99
    bad.write_bytes(bytes(versioned))
    with pytest.raises(ValueError, match="format version 99"):
        ReplayBuffer.load(bad)
    other = ReplayBuffer(
        40, (3, 6, 6), 2, frame_stack=3, n_step=2, embedding_dim=3, embedding_dtype=torch.float16
    )
    with pytest.raises(ValueError, match="different layout.*frame_stack"):
        other.restore(path)
    same = ReplayBuffer(
        40, (3, 6, 6), 2, frame_stack=2, n_step=2, embedding_dim=3, embedding_dtype=torch.float16
    )
    same.restore(path)
    assert _same(same.sample(8), ReplayBuffer.load(path).sample(8))


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, (3, 4, 4), 1)
    with pytest.raises(ValueError, match="obs_shape"):
        ReplayBuffer(10, (4, 4), 1)
    with pytest.raises(TypeError, match="embedding_dtype"):
        ReplayBuffer(10, (3,), 1, embedding_dim=2, embedding_dtype=torch.int32)
    buf = ReplayBuffer(10, (3, 4, 4), 2, seed=0)
    frame = torch.zeros(3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no open episode.*start_episode"):
        buf.add(frame, [0.0, 0.0], 0.0, False, False)
    with pytest.raises(TypeError, match="uint8"):
        buf.start_episode(frame.float())
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4\)"):
        buf.start_episode(torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="embedding_dim=0"):
        buf.start_episode(frame, embedding=torch.zeros(3))
    buf.start_episode(frame)
    with pytest.raises(ValueError, match="still has an open episode"):
        buf.start_episode(frame)
    with pytest.raises(ValueError, match="'action' must have shape"):
        buf.add(frame, [0.0], 0.0, False, False)
    with pytest.raises(TypeError, match="'action' must be floating"):
        buf.add(frame, [1, 2], 0.0, False, False)
    with pytest.raises(ValueError, match="no sampleable transition"):
        buf.sample(1)
    buf.add(frame, [0.0, 0.0], 0.0, False, True)
    with pytest.raises(ValueError, match="larger than the number"):
        buf.sample(2)
    with pytest.raises(ValueError, match="not a sampleable transition"):
        buf.gather([1])
    with pytest.raises(ValueError, match="shift"):
        buf.gather([0], shifts=torch.tensor([[0, 0, 9, 0]]))
    with pytest.raises(ValueError, match="env"):
        buf.start_episode(frame, env=3)
    vec = ReplayBuffer(10, (2,), 1, num_envs=2, seed=0)
    vec.start_episode([0.0, 0.0], env=0)  # env 1 never started: nothing may be added at all
    with pytest.raises(ValueError, match="env 1 has no open episode"):
        vec.add_batch(
            torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2), [False, False], [False, False]
        )
    assert vec.episode_open(0) and len(vec) == 0
    vec.start_episode([0.0, 0.0], env=1)
    vec.add_batch(
        torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2), [False, True], [False, False]
    )
    assert vec.episode_open(0) and not vec.episode_open(1) and len(vec) == 2
    emb_buf = ReplayBuffer(10, (2,), 1, embedding_dim=4)
    with pytest.raises(ValueError, match="'embedding' is required"):
        emb_buf.start_episode([0.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        emb_buf.start_episode([0.0, 0.0], embedding=torch.zeros(5))


def test_native_boundary_rejects_bad_tensors():
    # The native side re-checks what the facade already checked.
    buf = ReplayBuffer(10, (3, 4, 4), 2, seed=0)
    core = buf._core
    cap = torch.utils.dlpack.to_dlpack
    with pytest.raises(TypeError, match="'obs' must have dtype uint8"):
        core.start_episode(0, cap(torch.zeros(3, 4, 4)), None, 0)
    with pytest.raises(ValueError, match="'obs' must be contiguous"):
        core.start_episode(0, cap(torch.zeros(3, 4, 8, dtype=torch.uint8)[..., ::2]), None, 0)
    with pytest.raises(TypeError, match="DLPack capsule"):
        core.start_episode(0, "frame", None, 0)
    with pytest.raises(ValueError, match="must have size"):
        core.sample(2, False, None, None, {"reward": cap(torch.zeros(3))}, 0)


# ---- GPU mode ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _native.HAS_CUDA_KERNELS,
    reason="needs a CUDA GPU and the CUDA kernels",
)
def test_cuda_buffer_matches_cpu_buffer():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    kw = {
        "frame_stack": 3,
        "n_step": 2,
        "embedding_dim": 4,
        "embedding_dtype": torch.float16,
        "seed": 6,
    }
    cpu = ReplayBuffer(45, (3, 10, 9), 2, **kw)
    gpu = ReplayBuffer(45, (3, 10, 9), 2, device="cuda", **kw)
    fill(cpu, Model(45, 3, 2, 0.99), g1, 12, emb_dim=4, emb_dtype=torch.float16)
    fill(gpu, Model(45, 3, 2, 0.99), g2, 12, emb_dim=4, emb_dtype=torch.float16)
    for _ in range(3):
        a, b = cpu.sample(32), gpu.sample(32)
        assert b.obs.is_cuda and b.embedding.is_cuda
        assert _same(a, [x.cpu() if isinstance(x, torch.Tensor) else x for x in b])
    pinned = ReplayBuffer(45, (3, 10, 9), 2, pin_memory=True, **kw)
    fill(
        pinned,
        Model(45, 3, 2, 0.99),
        torch.Generator().manual_seed(3),
        12,
        emb_dim=4,
        emb_dtype=torch.float16,
    )
    assert pinned.sample(4).obs.is_pinned()
    idx = cpu.sample(8).indices
    shifts = torch.randint(0, 9, (8, 4), dtype=torch.int32)
    a, b = cpu.gather(idx, shifts=shifts), gpu.gather(idx, shifts=shifts)
    assert _same(a, [x.cpu() for x in b])


# ---- the C++ core on its own ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cpp_core_builds_and_runs_without_python(tmp_path):
    # The core must stay pure C++17: it compiles with no Python, pybind11 or torch include path.
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "replay_core_test"
    sources = [root / "csrc/replay/replay.cpp", root / "csrc/replay/test/replay_core_test.cpp"]
    cmd = ["c++", "-std=c++17", "-O1", "-pthread", f"-I{root / 'csrc/include'}", *map(str, sources)]
    subprocess.run([*cmd, "-o", str(exe)], check=True, capture_output=True, timeout=240)
    result = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_truncate_episode_closes_an_interrupted_episode():
    """Resuming a run: the interrupted episode ends where it stopped, its transitions bootstrap, and
    the n-step windows it leaves open become sampleable with sums cut at the new end."""
    from furl_fast import ReplayBuffer

    buf = ReplayBuffer(64, (2,), 1, n_step=3, gamma=0.5, seed=0)
    buf.start_episode(np.zeros(2, np.float32))
    for t in range(5):
        buf.add(np.full(2, t + 1, np.float32), np.zeros(1, np.float32), 1.0, False, False)
    assert len(buf) == 3 and buf.episode_open()  # the last two windows are still incomplete
    buf.truncate_episode()
    assert not buf.episode_open() and len(buf) == 5
    seen = {}
    for _ in range(40):
        b = buf.sample(5)
        for o, r, d, n in zip(b.obs[:, 0].tolist(), b.reward.tolist(), b.discount.tolist(),
                              b.next_obs[:, 0].tolist()):
            seen[o] = (r, d, n)
    assert seen[3.0] == (1.5, 0.25, 5.0)  # two steps left: 1 + 0.5, bootstrap gamma^2 from o_5
    assert seen[4.0] == (1.0, 0.5, 5.0)
    assert seen[0.0] == (1.75, 0.125, 3.0)  # complete windows unchanged
    buf.start_episode(np.zeros(2, np.float32))  # a new episode may start
    buf.truncate_episode()  # an episode with no step: nothing to sample
    assert len(buf) == 5
