"""CUDA paths the other tests do not reach: grid-stride loops past 65,535 blocks, the 32-row and
>48 KB shared-memory paths of mlp_cosine_reward, kernels under CUDA graph capture (a launch on the
legacy default stream during capture fails), GPU replay mode's single plan copy and its adds that
do not wait for queued work. All marked `cuda` (skipped without a GPU), except the CPU checks of the
replay buffer's packed plan."""

from __future__ import annotations

import math
import time

import pytest
import torch

from furl_fast import ReplayBuffer, ops, reference
from furl_fast.replay import _packed


def _mlp(n, d, h, p, k, device="cuda"):
    g = torch.Generator().manual_seed(n + p)
    ts = (torch.randn(n, d, generator=g), torch.randn(d, h, generator=g) / math.sqrt(d),
          torch.randn(h, generator=g) * 0.1, torch.randn(h, p, generator=g) / math.sqrt(h),
          torch.randn(p, generator=g) * 0.1, torch.randn(k, p, generator=g))
    return [t.to(device) for t in ts]


@pytest.mark.cuda
@pytest.mark.parametrize("n,p", [(9000, 64), (256, 600), (9000, 600), (9000, 2000), (256, 2000)])
def test_mlp_cosine_shared_memory_paths(n, p):
    """N = 9,000 takes 32-row blocks; P = 600 needs > 48 KB of shared memory at 32 rows; P = 2,000
    fits only 16-row blocks (the fallback at any N)."""
    args = _mlp(n, 128, 96, p, 3)
    got = ops.mlp_cosine_reward(*args)
    expected = reference.mlp_cosine_reward(*[a.double() for a in args])
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_preprocess_more_frames_than_grid_blocks():
    frames = torch.randint(0, 256, (70_000, 4, 5, 3), dtype=torch.uint8, device="cuda")
    got = ops.preprocess_frames(frames, size=3)
    torch.testing.assert_close(got, reference.preprocess_frames(frames, size=3), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.cuda
def test_random_shift_more_elements_than_grid_threads():
    """300 x 9 x 84 x 84 bytes: more than 65,535 blocks x 256 threads, so the grid-stride loop runs."""
    frames = torch.randint(0, 256, (300, 9, 84, 84), dtype=torch.uint8, device="cuda")
    assert frames.numel() > 65_535 * 256
    shifts = torch.randint(0, 9, (300, 2), device="cuda")
    assert torch.equal(ops.random_shift(frames, shifts, 4), reference.random_shift(frames, shifts, 4))


@pytest.mark.cuda
def test_ops_under_cuda_graph_capture():
    """Capture on a side stream: a kernel that launched on the legacy default stream would fail the
    capture; replaying the graph must give the eager results."""
    frames = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, device="cuda")
    emb, text = torch.randn(64, 32, device="cuda"), torch.randn(5, 32, device="cuda")
    mlp = _mlp(64, 32, 48, 16, 2)

    def run():
        return (ops.preprocess_frames(frames, size=16, flip_vertical=True),
                ops.clip_similarity(emb, text),
                ops.goal_baseline_reward(emb, text[0], text[1], 0.5),
                ops.softmax_goal_reward(emb, text, 1, temperature=0.1),
                ops.mlp_cosine_reward(*mlp),
                ops.random_shift(frames.permute(0, 3, 1, 2).contiguous(),
                                 torch.full((4, 2), 3, device="cuda"), 4))

    eager = run()  # also runs each kernel's self-check, which synchronises (not allowed in capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)


def _pixel_buffer(**kw):
    buf = ReplayBuffer(64, (3, 12, 12), 2, frame_stack=2, seed=0, **kw)
    g = torch.Generator().manual_seed(0)
    frame = lambda: torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=g)  # noqa: E731
    buf.start_episode(frame())
    for t in range(20):
        buf.add(frame(), torch.randn(2, generator=g), 0.5, False, t == 19)
    return buf


@pytest.mark.cuda
def test_gpu_replay_with_pinned_memory_matches_cpu():
    cpu, gpu = _pixel_buffer(), _pixel_buffer(device="cuda", pin_memory=True)
    a, b = cpu.sample(16), gpu.sample(16)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert y.is_cuda and torch.equal(x, y.cpu())


@pytest.mark.cuda
def test_gpu_replay_sample_copies_the_plan_once():
    buf = _pixel_buffer(device="cuda")
    buf.sample(16)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        buf.sample(16)
        torch.cuda.synchronize()
    copies = [e for e in prof.events() if "Memcpy HtoD" in e.name]
    assert len(copies) == 1, [e.name for e in prof.events()]


@pytest.mark.cuda
def test_gpu_replay_add_does_not_wait_for_queued_kernels():
    buf = _pixel_buffer(device="cuda")
    frame = torch.zeros(3, 12, 12, dtype=torch.uint8)
    buf.start_episode(frame)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued on the current stream
    t0 = time.perf_counter()
    buf.add(frame, torch.zeros(2), 0.0, False, False)
    returned = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert returned < 0.2, returned


def test_packed_plan_views_are_aligned_and_disjoint():
    plan = {"a": ((3, 5), torch.float32), "b": ((7,), torch.bool), "c": ((2, 3), torch.int64),
            "d": ((4,), torch.int32)}
    buf, views = _packed(plan, torch.device("cpu"))
    for name, (shape, dtype) in plan.items():
        v = views[name]
        assert v.shape == shape and v.dtype == dtype and v.data_ptr() % 8 == 0
        v.fill_(1 if dtype != torch.bool else True)
    assert buf.numel() == 64 + 8 + 48 + 16
    views["b"].fill_(False)  # writes to one view leave the others intact
    assert views["a"].eq(1).all() and views["c"].eq(1).all() and views["d"].eq(1).all()
    copy, again = _packed(plan, torch.device("cpu"), source=buf.clone())
    assert all(torch.equal(views[k], again[k]) for k in plan)


@pytest.mark.cuda
def test_first_call_during_capture_is_a_clear_error(monkeypatch):
    from furl_fast import _native

    monkeypatch.setattr(_native, "_checks", {})
    x, t = torch.randn(4, 8, device="cuda"), torch.randn(2, 8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot run during CUDA graph capture"):
        with torch.cuda.graph(graph):
            ops.clip_similarity(x, t)
