"""Fused reward heads (furl_fast.ops) against their pure-PyTorch references (furl_fast.reference)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from furl_fast import _native, ops, reference

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")

P = 64
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Pairwise covering array of N x D x H x K (every pair of values appears in some case): the full
# product (48 cases) buys no extra coverage for this code and takes too long on 2 cores.
CASES = [
    (1, 512, 256, 1), (1, 1024, 257, 3), (1, 512, 257, 11),
    (7, 1024, 256, 1), (7, 512, 257, 3), (7, 1024, 256, 11),
    (256, 512, 257, 1), (256, 1024, 256, 3), (256, 1024, 257, 11),
    (4099, 1024, 257, 1), (4099, 512, 256, 3), (4099, 512, 256, 11),
]  # fmt: skip
# CPU float16/bfloat16 matmul in the same-dtype reference takes seconds at N = 4099, so the
# half-precision comparisons use the other cases (the native code after the float32 conversion is the
# same for every dtype, and float32 covers N = 4099).
HALF_CASES = [c for c in CASES if c[0] <= 256]
SIM_CASES = [(n, d, k) for n, d, _, k in CASES]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_inputs(n: int, d: int, h: int, k: int, seed: int, device: str = "cpu"):
    """Embeddings of CLIP-like scale and nn.Linear-like weights; target (P,) when k == 1."""
    g = _gen(seed)
    emb = torch.randn(n, d, generator=g)
    w1 = torch.randn(d, h, generator=g) / math.sqrt(d)
    b1 = torch.randn(h, generator=g) * 0.1
    w2 = torch.randn(h, P, generator=g) / math.sqrt(h)
    b2 = torch.randn(P, generator=g) * 0.1
    target = torch.randn(P, generator=g) if k == 1 else torch.randn(k, P, generator=g)
    return [t.to(device) for t in (emb, w1, b1, w2, b2, target)]


def text_inputs(n: int, d: int, k: int, seed: int, device: str = "cpu"):
    g = _gen(seed)
    return torch.randn(n, d, generator=g).to(device), torch.randn(k, d, generator=g).to(device)


def goal_inputs(d: int, seed: int, device: str = "cpu"):
    """g and b as the spec builds them: means of L2-normalised prompt embeddings (3 and 2 prompts)."""
    g = _gen(seed)
    goal = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1).mean(0)
    base = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1).mean(0)
    return goal.to(device), base.to(device)


def _f64(ts):
    return [t.double() for t in ts]


def assert_half_within_2x(native: torch.Tensor, ref_same_dtype: torch.Tensor, ref64: torch.Tensor):
    """The house rule: native error vs float64 at most 2x the same-dtype reference's error.

    The 1e-5 floor covers outputs the half reference happens to get exactly right (K = 1 softmax is
    1, zero rows are 0) where the native float32 rounding is the only error left.
    """
    err_native = (native.double() - ref64).abs().max().item()
    err_ref = (ref_same_dtype.double() - ref64).abs().max().item()
    assert err_native <= 2 * err_ref + 1e-5, (err_native, err_ref)


# ---- mlp_cosine_reward --------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,h,k", CASES)
def test_mlp_cosine_float32(n, d, h, k):
    args = mlp_inputs(n, d, h, k, seed=n * 7 + d + h + k)
    out = ops.mlp_cosine_reward(*args)
    assert out.dtype == torch.float32 and out.shape == ((n,) if k == 1 else (n, k))
    torch.testing.assert_close(out, reference.mlp_cosine_reward(*args))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d,h,k", HALF_CASES)
def test_mlp_cosine_half(n, d, h, k, dtype):
    emb, *weights = mlp_inputs(n, d, h, k, seed=n + d + h + k)
    emb = emb.to(dtype)
    out = ops.mlp_cosine_reward(emb, *weights)
    assert out.dtype == torch.float32
    ref_half = reference.mlp_cosine_reward(emb, *weights)
    ref64 = reference.mlp_cosine_reward(*_f64([emb, *weights]))
    assert_half_within_2x(out, ref_half, ref64)


def test_mlp_cosine_target_shapes_and_threads():
    emb, w1, b1, w2, b2, target = mlp_inputs(97, 512, 257, 3, seed=1)
    full = ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target)
    one = ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target[1:2])
    vec = ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target[1])
    assert one.shape == (97, 1) and vec.shape == (97,)
    torch.testing.assert_close(one[:, 0], full[:, 1])
    torch.testing.assert_close(vec, full[:, 1])
    # Threads split rows, never a reduction, so the result is bit-identical.
    assert torch.equal(ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target, num_threads=1), full)


def test_mlp_cosine_weights_other_dtypes_and_layouts():
    emb, w1, b1, w2, b2, target = mlp_inputs(33, 512, 256, 3, seed=2)
    expected = reference.mlp_cosine_reward(emb, w1, b1, w2, b2, target)
    # float64 weights are used as float32; a transposed nn.Linear weight view is non-contiguous.
    w1_view = w1.t().contiguous().t()
    out = ops.mlp_cosine_reward(emb, w1_view, b1.double(), w2.double(), b2, target.double())
    torch.testing.assert_close(out, expected)
    emb_view = torch.cat([emb, emb], dim=1)[:, :512]
    torch.testing.assert_close(ops.mlp_cosine_reward(emb_view, w1, b1, w2, b2, target), expected)


def test_mlp_cosine_matches_nn_modules():
    """w1 / w2 are nn.Linear weights transposed: the op equals FuRL's head built from modules."""
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, P))
    emb, target = torch.randn(20, 512), torch.randn(P)
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(head(emb), target[None], dim=-1)
    lin1, lin2 = head[0], head[2]
    out = ops.mlp_cosine_reward(emb, lin1.weight.T, lin1.bias, lin2.weight.T, lin2.bias, target)
    torch.testing.assert_close(out, expected)


def test_mlp_cosine_zero_vectors_give_zero():
    emb, w1, b1, _, _, target = mlp_inputs(9, 512, 256, 3, seed=4)
    w2, b2 = torch.zeros(256, P), torch.zeros(P)  # every projected row is exactly zero
    out = ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target)
    assert torch.equal(out, torch.zeros(9, 3))
    assert torch.equal(reference.mlp_cosine_reward(emb, w1, b1, w2, b2, target), out)
    emb, w1, b1, w2, b2, target = mlp_inputs(9, 512, 256, 3, seed=5)
    target[1] = 0
    out = ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target)
    assert torch.equal(out[:, 1], torch.zeros(9)) and torch.isfinite(out).all()


def test_mlp_cosine_nan_propagates():
    emb, w1, b1, w2, b2, target = mlp_inputs(13, 512, 257, 3, seed=6)
    w1[5, 200] = float("nan")  # hidden unit 200 is NaN for every row -> every output NaN
    assert ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target).isnan().all()
    emb, w1, b1, w2, b2, target = mlp_inputs(13, 512, 257, 3, seed=6)
    emb[4, 0] = float("nan")
    out = ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target)
    torch.testing.assert_close(
        out, reference.mlp_cosine_reward(emb, w1, b1, w2, b2, target), equal_nan=True
    )
    assert out[4].isnan().all() and not out[torch.arange(13) != 4].isnan().any()


def test_mlp_cosine_matches_furl_reward_model():
    """The fused op on FuRLReward.fused_params() equals the reward model's own PyTorch path."""
    from furl_fast.rewards.furl import FuRLReward

    torch.manual_seed(18)
    model = FuRLReward(1024, torch.randn(1024))
    img = torch.randn(300, 1024)
    torch.testing.assert_close(ops.mlp_cosine_reward(img, *model.fused_params()), model.reward(img))
    half = img.half()  # the model upcasts to float32 first; the op reads float16 in place
    torch.testing.assert_close(
        ops.mlp_cosine_reward(half, *model.fused_params()), model.reward(half)
    )


# ---- clip_similarity ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,k", SIM_CASES)
def test_clip_similarity_float32(n, d, k):
    img, text = text_inputs(n, d, k, seed=n + d + k)
    out = ops.clip_similarity(img, text)
    assert out.shape == (n, k) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference.clip_similarity(img, text))
    torch.testing.assert_close(
        out, torch.nn.functional.cosine_similarity(img[:, None], text[None], dim=-1)
    )
    # Unnormalised: rows of unit scale (as CLIP embeddings are); with unit-variance entries the dot
    # products reach ~30 and float32 summation order alone differs by more than assert_close's atol.
    img_u, text_u = img / math.sqrt(d), text / math.sqrt(d)
    torch.testing.assert_close(
        ops.clip_similarity(img_u, text_u, normalize=False),
        reference.clip_similarity(img_u, text_u, normalize=False),
    )


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d,k", SIM_CASES)
def test_clip_similarity_half(n, d, k, dtype):
    img, text = text_inputs(n, d, k, seed=n + d + k + 1)
    img = img.to(dtype)
    ref64 = reference.clip_similarity(img.double(), text.double())
    assert_half_within_2x(
        ops.clip_similarity(img, text), reference.clip_similarity(img, text), ref64
    )


def test_clip_similarity_zero_and_nan():
    img, text = text_inputs(10, 512, 4, seed=7)
    img[3] = 0
    text[2] = 0
    out = ops.clip_similarity(img, text)
    assert torch.equal(out[3], torch.zeros(4)) and torch.equal(out[:, 2], torch.zeros(10))
    torch.testing.assert_close(out, reference.clip_similarity(img, text))
    text[1, 7] = float("nan")
    out = ops.clip_similarity(img, text)
    assert out[:, 1].isnan().all() and not out[:, [0, 2, 3]].isnan().any()


# ---- goal_baseline_reward -----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("n,d,k", SIM_CASES[::2])
def test_goal_baseline_float32(n, d, k, alpha):
    img, _ = text_inputs(n, d, k, seed=n + d)
    goal, base = goal_inputs(d, seed=d + k)
    out = ops.goal_baseline_reward(img, goal, base, alpha)
    assert out.shape == (n,) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference.goal_baseline_reward(img, goal, base, alpha))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d", [(7, 512), (256, 1024), (4099, 512)])
def test_goal_baseline_half(n, d, dtype):
    img, _ = text_inputs(n, d, 1, seed=n + d + 3)
    img = img.to(dtype)
    goal, base = goal_inputs(d, seed=d)
    ref64 = reference.goal_baseline_reward(img.double(), goal.double(), base.double(), 0.5)
    assert_half_within_2x(
        ops.goal_baseline_reward(img, goal, base, 0.5),
        reference.goal_baseline_reward(img, goal, base, 0.5),
        ref64,
    )


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_goal_baseline_equals_explicit_projection(alpha):
    """The rank-one algebra equals 1 - 0.5 |(x - g) P|^2 with the D x D matrix P formed (float64)."""
    d = 48
    img, _ = text_inputs(11, d, 1, seed=8)
    goal, base = goal_inputs(d, seed=9)
    x = torch.nn.functional.normalize(img.double(), dim=-1)
    g, dvec = goal.double(), (goal - base).double()
    proj = alpha * torch.outer(dvec, dvec) / dvec.dot(dvec) + (1 - alpha) * torch.eye(
        d, dtype=torch.float64
    )
    expected = 1 - 0.5 * ((x - g) @ proj).square().sum(-1)
    torch.testing.assert_close(
        reference.goal_baseline_reward(img.double(), g, base.double(), alpha), expected
    )
    torch.testing.assert_close(ops.goal_baseline_reward(img, goal, base, alpha), expected.float())


def test_goal_baseline_alpha0_is_affine_cosine():
    img, _ = text_inputs(300, 1024, 1, seed=10)
    goal, base = goal_inputs(1024, seed=11)
    gnorm = goal.norm()
    cos = ops.clip_similarity(img, goal[None])[:, 0]
    # alpha = 0: 1 - 0.5 |x - g|^2 = 0.5 + |g| cos(img, g) - 0.5 |g|^2.
    expected = 0.5 - 0.5 * gnorm**2 + gnorm * cos
    torch.testing.assert_close(ops.goal_baseline_reward(img, goal, base, 0.0), expected)
    # ... and with a single normalised goal prompt it is the cosine itself.
    unit = goal / gnorm
    torch.testing.assert_close(
        ops.goal_baseline_reward(img, unit, base, 0.0), ops.clip_similarity(img, unit[None])[:, 0]
    )


def test_goal_baseline_degenerate_inputs():
    img, _ = text_inputs(6, 512, 1, seed=12)
    goal, base = goal_inputs(512, seed=13)
    img[2] = 0  # x = 0 by the eps rule
    for b in (base, goal.clone()):  # goal == baseline: d = 0, u = 0
        out = ops.goal_baseline_reward(img, goal, b, 0.7)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference.goal_baseline_reward(img, goal, b, 0.7))


# ---- softmax_goal_reward ------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 0.4])
@pytest.mark.parametrize("n,d,k", SIM_CASES)
def test_softmax_goal_float32(n, d, k, threshold):
    img, text = text_inputs(n, d, k, seed=n + d + k + 2)
    goal = k // 2
    # temperature 0.1 rather than CLIP's 0.01: with random embeddings the cosines are ~0.03 apart, so a
    # sharp temperature would push nearly every probability to 0 or 1 and test nothing.
    out = ops.softmax_goal_reward(img, text, goal, temperature=0.1, threshold=threshold)
    expected = reference.softmax_goal_reward(img, text, goal, temperature=0.1, threshold=threshold)
    assert out.shape == (n,) and out.dtype == torch.float32
    if threshold is None:
        torch.testing.assert_close(out, expected)
    else:
        # A probability within float32 rounding of the threshold may fall either side of it.
        p = reference.softmax_goal_reward(img, text, goal, temperature=0.1)
        decided = (p - threshold).abs() > 1e-5
        assert torch.equal(out[decided], expected[decided])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d,k", SIM_CASES)
def test_softmax_goal_half(n, d, k, dtype):
    img, text = text_inputs(n, d, k, seed=n + d + k + 5)
    img = img.to(dtype)
    ref64 = reference.softmax_goal_reward(img.double(), text.double(), 0, temperature=0.05)
    assert_half_within_2x(
        ops.softmax_goal_reward(img, text, 0, temperature=0.05),
        reference.softmax_goal_reward(img, text, 0, temperature=0.05),
        ref64,
    )


def test_softmax_goal_zero_row_and_nan():
    img, text = text_inputs(5, 512, 4, seed=14)
    img[1] = 0  # every cosine 0 -> uniform
    out = ops.softmax_goal_reward(img, text, 2, temperature=0.01)
    assert out[1].item() == pytest.approx(0.25)
    img[3, 0] = float("nan")
    out = ops.softmax_goal_reward(img, text, 2, temperature=0.01, threshold=0.5)
    assert out[3].isnan() and not out[[0, 1, 2, 4]].isnan().any()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 40),
    k=st.integers(1, 6),
    temperature=st.floats(0.005, 5.0),
    threshold=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_softmax_goal_range(n, d, k, temperature, threshold, seed):
    img, text = text_inputs(n, d, k, seed=seed)
    goal = seed % k
    p = ops.softmax_goal_reward(img, text, goal, temperature=temperature)
    assert ((p >= 0) & (p <= 1)).all()
    binary = ops.softmax_goal_reward(img, text, goal, temperature=temperature, threshold=threshold)
    assert torch.equal(binary, (p > threshold).float())


@settings(max_examples=40, deadline=None)
@given(
    others=st.lists(st.floats(-0.5, 0.5), min_size=1, max_size=3),
    goal_cos=st.lists(st.floats(-0.5, 0.5), min_size=2, max_size=8),
    temperature=st.floats(0.01, 2.0),
)
def test_softmax_goal_monotone_in_goal_similarity(others, goal_cos, temperature):
    """With the negatives' cosines held fixed, p(goal) never decreases as cos(image, goal) grows."""
    k, d = len(others) + 1, len(others) + 2
    text = torch.eye(k, d)  # orthonormal prompts: cos(image, text_j) is the image's j-th coordinate
    rows = []
    for c in sorted(goal_cos):
        coords = [c, *others]
        rest = 1.0 - sum(v * v for v in coords)  # >= 0: at most 4 coordinates of size <= 0.5
        rows.append([*coords, math.sqrt(max(rest, 0.0))])  # unit norm: coordinates are cosines
    img = torch.tensor(rows)
    p = ops.softmax_goal_reward(img, text, 0, temperature=temperature)
    assert (p[1:] >= p[:-1] - 1e-6).all(), p
    torch.testing.assert_close(
        p, reference.softmax_goal_reward(img, text, 0, temperature=temperature)
    )


# ---- threads and processes -----------------------------------------------------------------------


def test_concurrent_callers_get_identical_results():
    """Python threads call the ops at once (the GIL is released); each result is bit-identical."""
    from concurrent.futures import ThreadPoolExecutor

    args = mlp_inputs(300, 512, 257, 3, seed=15)
    img, text = text_inputs(300, 512, 11, seed=16)
    expected = (ops.mlp_cosine_reward(*args), ops.clip_similarity(img, text))
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(lambda: (ops.mlp_cosine_reward(*args), ops.clip_similarity(img, text)))
            for _ in range(8)
        ]
        for f in futures:
            got = f.result()
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _child_mlp(queue, args):
    queue.put(ops.mlp_cosine_reward(*args).tolist())  # a plain list: no shared-memory handoff


def test_ops_work_in_a_forked_child():
    """The CPU helper threads do not survive fork(); a child must still compute (and exit) cleanly."""
    import multiprocessing as mp

    args = mlp_inputs(200, 512, 256, 1, seed=17)
    expected = ops.mlp_cosine_reward(*args)  # starts the parent's helper threads
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_mlp, args=(queue, args))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert torch.equal(torch.tensor(got), expected)


# ---- bad input ----------------------------------------------------------------------------------


def _mlp_args(**over):
    emb, w1, b1, w2, b2, target = mlp_inputs(4, 32, 16, 1, seed=0)
    args = {"emb": emb, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "target": target}
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"w1": torch.randn(31, 16)}, ValueError, "'w1'.*D"),
        ({"b1": torch.randn(15)}, ValueError, "'b1'"),
        ({"w2": torch.randn(17, P)}, ValueError, "'w2'"),
        ({"b2": torch.randn(P + 1)}, ValueError, "'b2'"),
        ({"target": torch.randn(P - 1)}, ValueError, "'target'"),
        ({"target": torch.randn(2, 2, P)}, ValueError, "'target'"),
        ({"emb": torch.randn(32)}, ValueError, "'emb' must have shape"),
        ({"emb": torch.randn(0, 32)}, ValueError, "'emb' must not be empty"),
        ({"emb": torch.ones(4, 32, dtype=torch.int64)}, TypeError, "'emb'.*int64"),
        ({"emb": torch.ones(4, 32, dtype=torch.float64)}, TypeError, "'emb'.*float64"),
        ({"w1": torch.ones(32, 16, dtype=torch.int32)}, TypeError, "'w1'.*floating"),
        ({"target": [0.0] * P}, TypeError, "'target' must be a torch.Tensor"),
        ({"b1": torch.randn(16, device="meta")}, ValueError, "'b1' is on meta"),
    ],
)
def test_mlp_cosine_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        ops.mlp_cosine_reward(**_mlp_args(**over))


@pytest.mark.parametrize("op", ["clip_similarity", "softmax_goal_reward"])
@pytest.mark.parametrize(
    "img,text,exc,match",
    [
        (torch.randn(4, 32), torch.randn(3, 31), ValueError, "'text_emb'.*D"),
        (torch.randn(4, 32), torch.randn(32), ValueError, "'text_emb' must have shape"),
        (torch.randn(2, 4, 32), torch.randn(3, 32), ValueError, "'img_emb' must have shape"),
        (torch.ones(4, 32, dtype=torch.uint8), torch.randn(3, 32), TypeError, "'img_emb'.*uint8"),
        (torch.randn(4, 32), torch.ones(3, 32, dtype=torch.int64), TypeError, "'text_emb'"),
        (torch.randn(4, 32), torch.randn(0, 32), ValueError, "'text_emb' must not be empty"),
    ],
)
def test_text_ops_bad_input(op, img, text, exc, match):
    kwargs = {"temperature": 0.01} if op == "softmax_goal_reward" else {}
    args = (img, text, 0) if op == "softmax_goal_reward" else (img, text)
    with pytest.raises(exc, match=match):
        getattr(ops, op)(*args, **kwargs)


def test_scalar_arguments_rejected():
    img, text = text_inputs(4, 32, 3, seed=0)
    goal, base = goal_inputs(32, seed=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="'alpha'"):
            ops.goal_baseline_reward(img, goal, base, bad)
    with pytest.raises(ValueError, match="'goal_emb'.*D"):
        ops.goal_baseline_reward(img, goal[:31], base, 0.5)
    with pytest.raises(ValueError, match="'baseline_emb' must have shape"):
        ops.goal_baseline_reward(img, goal, base[None], 0.5)
    with pytest.raises(TypeError, match="'goal_emb'"):
        ops.goal_baseline_reward(img, goal.long(), base, 0.5)
    for bad in (3, -1, 1.0):
        with pytest.raises(ValueError, match="'goal_index'"):
            ops.softmax_goal_reward(img, text, bad, temperature=0.01)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="'temperature'"):
            ops.softmax_goal_reward(img, text, 0, temperature=bad)
    with pytest.raises(ValueError, match="'threshold'"):
        ops.softmax_goal_reward(img, text, 0, temperature=0.01, threshold=float("nan"))


def test_native_entry_points_validate_on_their_own():
    """The C++ side re-checks what it relies on: misuse past ops.py is an exception, not a crash."""
    from torch.utils.dlpack import to_dlpack as cap

    c = _native._C
    img, text = text_inputs(4, 32, 3, seed=0)
    with pytest.raises(ValueError, match="'out'.*size 3 in dimension 1"):
        c.clip_similarity_cpu(cap(img), cap(text), cap(torch.empty(4, 2)), True)
    with pytest.raises(ValueError, match="'img_emb' must be contiguous"):
        c.clip_similarity_cpu(
            cap(img.t().contiguous().t()), cap(text), cap(torch.empty(4, 3)), True
        )
    with pytest.raises(TypeError, match="'text_emb' must have dtype float32"):
        c.clip_similarity_cpu(cap(img), cap(text.double()), cap(torch.empty(4, 3)), True)
    with pytest.raises(TypeError, match="'out' must be a DLPack capsule"):
        c.softmax_goal_reward_cpu(cap(img), cap(text), torch.empty(4), 0, 0.01, None)
    with pytest.raises(ValueError, match="'goal_index'"):
        c.softmax_goal_reward_cpu(cap(img), cap(text), cap(torch.empty(4)), 5, 0.01, None)
    goal, base = goal_inputs(32, seed=0)
    with pytest.raises(ValueError, match="'alpha'"):
        c.goal_baseline_reward_cpu(cap(img), cap(goal), cap(base), cap(torch.empty(4)), 2.0)
    emb, w1, b1, w2, b2, target = mlp_inputs(4, 32, 16, 3, seed=0)
    with pytest.raises(ValueError, match="'w2'.*H"):
        c.mlp_cosine_reward_cpu(*map(cap, (emb, w1, b1, w2[:15], b2, target, torch.empty(4, 3))))


def test_reference_fallback_without_native(monkeypatch):
    monkeypatch.setattr(_native, "HAS_NATIVE", False)
    args = mlp_inputs(5, 64, 16, 3, seed=1)
    torch.testing.assert_close(ops.mlp_cosine_reward(*args), reference.mlp_cosine_reward(*args))
    img, text = text_inputs(5, 64, 3, seed=2)
    torch.testing.assert_close(ops.clip_similarity(img, text), reference.clip_similarity(img, text))


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------


@pytest.fixture
def cuda():
    if not (_native.HAS_CUDA_KERNELS and torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and furl_fast built with CUDA kernels")
    return torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("n,d,h,k", CASES)
def test_cuda_mlp_cosine(cuda, n, d, h, k, dtype):
    emb, *weights = mlp_inputs(n, d, h, k, seed=n + d + h + k, device=cuda)
    emb = emb.to(dtype)
    out = ops.mlp_cosine_reward(emb, *weights)
    assert out.device == emb.device and out.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference.mlp_cosine_reward(emb, *weights))
    else:
        ref64 = reference.mlp_cosine_reward(*_f64([emb, *weights]))
        assert_half_within_2x(out, reference.mlp_cosine_reward(emb, *weights), ref64)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("n,d,k", SIM_CASES)
def test_cuda_similarity_heads(cuda, n, d, k, dtype):
    img, text = text_inputs(n, d, k, seed=n + d + k, device=cuda)
    img = img.to(dtype)
    goal, base = goal_inputs(d, seed=d, device=cuda)
    cases = [
        (
            lambda x: ops.clip_similarity(x, text),
            lambda x: reference.clip_similarity(x, text.to(x.dtype)),
        ),
        (
            lambda x: ops.softmax_goal_reward(x, text, k - 1, temperature=0.05),
            lambda x: reference.softmax_goal_reward(x, text.to(x.dtype), k - 1, temperature=0.05),
        ),
        (
            lambda x: ops.goal_baseline_reward(x, goal, base, 0.3),
            lambda x: reference.goal_baseline_reward(x, goal.to(x.dtype), base.to(x.dtype), 0.3),
        ),
    ]
    for native, ref in cases:
        out = native(img)
        assert out.device == img.device and out.dtype == torch.float32
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref(img))
        else:
            assert_half_within_2x(out, ref(img), ref(img.double()))
    torch.testing.assert_close(
        ops.softmax_goal_reward(img, text, 0, temperature=0.05, threshold=0.3),
        (ops.softmax_goal_reward(img, text, 0, temperature=0.05) > 0.3).float(),
    )


@pytest.mark.cuda
def test_cuda_edge_cases_and_stream(cuda):
    emb, w1, b1, w2, b2, target = mlp_inputs(37, 512, 257, 3, seed=20, device=cuda)
    w1[3, 9] = float("nan")
    assert ops.mlp_cosine_reward(emb, w1, b1, w2, b2, target).isnan().all()
    img, text = text_inputs(9, 512, 3, seed=21, device=cuda)
    img[4] = 0
    assert torch.equal(ops.clip_similarity(img, text)[4], torch.zeros(3, device=cuda))
    # Runs on the caller's current stream: a side stream's result is complete after its sync.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = ops.clip_similarity(img, text)
    side.synchronize()
    torch.testing.assert_close(out, ops.clip_similarity(img, text))
    with pytest.raises(ValueError, match="'text_emb' is on cpu"):
        ops.clip_similarity(img, text.cpu())
