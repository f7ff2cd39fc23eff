"""Fuzzing random_shift_cpu (see test_fuzz_native.py for the rules)."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, strategies as st

from fuzz_strategies import (  # python_tests/ is on sys.path
    C,
    FUZZ,
    INTS,
    SEEDS,
    THREADS,
    arg,
    call,
    values,
)

from furl_fast import _native, reference

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


@FUZZ
@given(st.data())
def test_random_shift_cpu(data):
    """Fuzzed frames / slots / shifts / out / pad: the reference's result (per slot) or a
    TypeError / ValueError, never a crash or an out-of-bounds read."""
    draw = data.draw
    gen = torch.Generator().manual_seed(draw(SEEDS))
    cap, b, f = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    pad = draw(st.sampled_from([0, 1, 2, 4, -1, 1025]) | INTS)
    frames = draw(arg(values(gen, (cap, c, h, w), torch.uint8, "normal")))
    slots = draw(arg(torch.randint(-1, cap + 1, (b, f), generator=gen)))
    top = max(2 * pad, 0) if abs(pad) < 2**20 else 8
    shifts = draw(arg(torch.randint(-1, top + 2, (b, 2), generator=gen).to(torch.int32)))
    out = draw(arg(torch.empty(b, f * c, h, w, dtype=torch.uint8)))
    _, exc = call(C.random_shift_cpu, frames.obj, slots.obj, shifts.obj, out.obj, pad,
                  draw(THREADS))
    if exc is not None:
        return
    fr, sl, sh = frames.tensor, slots.tensor.long(), shifts.tensor
    expected = torch.cat([reference.random_shift(fr[sl[:, j]], sh, pad) for j in range(f)], 1)
    assert torch.equal(out.tensor, expected)
