"""Fuzzing the reward heads' CPU entry points and the public ops' thread argument (see
test_fuzz_native.py for the rules)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from fuzz_strategies import (  # python_tests/ is on sys.path
    Arg,
    C,
    FLOATS,
    FUZZ,
    INTS,
    SPECIAL_FLOATS,
    as_f32,
    call,
    expect,
    moderate,
    reward_case,
)

from furl_fast import _native, ops, reference

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


def emb_ok(a: Arg) -> bool:
    return a.tensor is not None and a.tensor.dim() == 2 and a.ok(tuple(a.tensor.shape), FLOATS)


def f64(args: list[Arg]) -> list[torch.Tensor]:
    return [a.tensor.double() for a in args]


@FUZZ
@given(reward_case("mlp_cosine"))
def test_mlp_cosine_reward_cpu(case):
    args, threads = case
    emb, w1, b1, w2, b2, target, out = args
    f32 = (torch.float32,)
    valid = emb_ok(emb) and w1.tensor is not None and w1.tensor.dim() == 2
    if valid:
        (n, d), h = emb.tensor.shape, w1.tensor.shape[1]
        p = w2.tensor.shape[-1] if w2.tensor is not None and w2.tensor.dim() == 2 else -1
        k = target.tensor.shape[0] if target.tensor is not None and target.tensor.dim() else -1
        valid = (
            w1.ok((d, h), f32)
            and b1.ok((h,), f32)
            and w2.ok((h, p), f32)
            and b2.ok((p,), f32)
            and target.ok((k, p), f32)
            and out.ok((n, k), f32, True)
        )
    _, exc = call(C.mlp_cosine_reward_cpu, *[a.obj for a in args], threads)
    expect(valid, exc, "mlp_cosine_reward_cpu")
    if valid and moderate(*(a.tensor for a in args[:-1])):
        e, a1, c1, a2, c2, t = f64(args[:-1])
        expected = reference.mlp_cosine_reward(e, a1, c1, a2, c2, t)
        # Float32 error of the cosine: eps times the magnitude of the terms summed into z over |z|.
        z = torch.relu(e @ a1 + c1) @ a2 + c2
        z_abs = torch.relu(e.abs() @ a1.abs() + c1.abs()) @ a2.abs() + c2.abs()
        tol = 1e-5 + 1e-4 * z_abs.norm(dim=1) / z.norm(dim=1).clamp_min(reference.NORM_EPS)
        assert ((out.tensor.double() - expected).abs() <= tol[:, None]).all()


@FUZZ
@given(reward_case("clip_similarity"), st.booleans())
def test_clip_similarity_cpu(case, normalize):
    (img, text, out), threads = case
    valid = emb_ok(img)
    if valid:
        n, d = img.tensor.shape
        k = text.tensor.shape[0] if text.tensor is not None and text.tensor.dim() else -1
        valid = text.ok((k, d), (torch.float32,)) and out.ok((n, k), (torch.float32,), True)
    _, exc = call(C.clip_similarity_cpu, img.obj, text.obj, out.obj, normalize, threads)
    expect(valid, exc, "clip_similarity_cpu")
    if valid and moderate(img.tensor, text.tensor):
        i, t = f64([img, text])
        expected = reference.clip_similarity(i, t, normalize=normalize)
        scale = 1.0 if normalize else i.abs() @ t.abs().T
        assert ((out.tensor.double() - expected).abs() <= 1e-5 + 1e-4 * scale).all()


@FUZZ
@given(reward_case("goal_baseline"), st.sampled_from([0.0, 0.3, 1.0, -0.1, 1.5, math.nan, 1e300]))
def test_goal_baseline_reward_cpu(case, alpha):
    (img, goal, base, out), threads = case
    valid = emb_ok(img) and 0.0 <= as_f32(alpha) <= 1.0
    if valid:
        n, d = img.tensor.shape
        f32 = (torch.float32,)
        valid = goal.ok((d,), f32) and base.ok((d,), f32) and out.ok((n,), f32, True)
    _, exc = call(C.goal_baseline_reward_cpu, img.obj, goal.obj, base.obj, out.obj, alpha, threads)
    expect(valid, exc, "goal_baseline_reward_cpu")
    if valid and moderate(img.tensor, goal.tensor, base.tensor):
        i, g, b = f64([img, goal, base])
        expected = reference.goal_baseline_reward(i, g, b, alpha)
        tol = 1e-4 * (1 + g.norm() + b.norm()) ** 2
        assert ((out.tensor.double() - expected).abs() <= tol).all()


@FUZZ
@given(
    reward_case("softmax_goal"),
    INTS,
    st.sampled_from([0.01, 0.1, 1.0, 10.0, 0.0, -1.0, 1e-50, *SPECIAL_FLOATS]),
    st.sampled_from([None, None, 0.5, 0.0, math.nan, math.inf, 1e300]),
)
def test_softmax_goal_reward_cpu(case, goal_index, temperature, threshold):
    (img, text, out), threads = case
    temp32 = as_f32(temperature)
    valid = (
        emb_ok(img)
        and text.tensor is not None
        and text.tensor.dim() == 2
        and 0 <= goal_index < text.tensor.shape[0]
        and temp32 > 0
        and math.isfinite(temp32)
        and (threshold is None or math.isfinite(as_f32(threshold)))
    )
    if valid:
        n, d = img.tensor.shape
        valid = text.ok((text.tensor.shape[0], d), (torch.float32,)) and out.ok(
            (n,), (torch.float32,), True
        )
    _, exc = call(
        C.softmax_goal_reward_cpu,
        img.obj,
        text.obj,
        out.obj,
        goal_index,
        temperature,
        threshold,
        threads,
    )
    expect(valid, exc, "softmax_goal_reward_cpu")
    # A tiny temperature overflows the float32 logits to inf (NaN after the softmax), as in the
    # float32 reference: compared against the float64 oracle only where float32 has the range.
    if valid and moderate(img.tensor, text.tensor) and temp32 >= 1e-3:
        i, t = f64([img, text])
        prob = reference.softmax_goal_reward(i, t, goal_index, temperature=temp32)
        tol = 1e-5 + 1e-5 * t.shape[1] / temp32  # float32 logits, scaled by 1 / temperature
        got = out.tensor.double()
        if threshold is None:
            assert ((got - prob).abs() <= tol).all()
        else:  # exact 0 / 1 except where the probability is within rounding of the threshold
            clear = (prob - as_f32(threshold)).abs() > tol
            assert (got[clear] == (prob[clear] > as_f32(threshold)).double()).all()


def test_public_reward_ops_check_num_threads():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"clip_similarity: 'num_threads' must be None"):
        ops.clip_similarity(x, x, num_threads=0)
