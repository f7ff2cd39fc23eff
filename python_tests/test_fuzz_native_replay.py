"""Fuzzing the replay buffer: the ReplayCore entry points, random call sequences against a model
with save / load and damaged files, and the regressions found there (see test_fuzz_native.py for
the rules)."""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch.utils.dlpack import to_dlpack

from fuzz_strategies import (  # python_tests/ is on sys.path
    C,
    CORPUS,
    FUZZ,
    INTS,
    REPLAY_METHODS,
    SEEDS,
    SPECIAL_FLOATS,
    THREADS,
    arg,
    call,
    values,
)
from test_replay import Model, check_batch  # python_tests/ is on sys.path

from furl_fast import ReplayBuffer, _native, reference
from furl_fast.replay import file_format

pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


# ---- replay buffer: the ReplayCore entry points with fuzzed arguments ----------------------------


SAMPLE_OUTPUTS = (
    "obs", "next_obs", "embedding", "next_embedding", "step_embeddings", "step_slots",
    "step_discounts", "obs_slots", "next_slots", "shifts", "action", "reward", "discount",
    "goal_distance", "success", "indices", "episodes", "steps",
)  # fmt: skip


@st.composite
def replay_configs(draw) -> dict[str, Any]:
    capacity = draw(st.integers(2, 14))
    pixels = draw(st.booleans())
    obs_shape = (
        (draw(st.sampled_from([1, 3])), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        if pixels
        else (draw(st.integers(1, 4)),)
    )
    return {
        "capacity": capacity,
        "obs_shape": obs_shape,
        "action_dim": draw(st.integers(1, 3)),
        "frame_stack": draw(st.integers(1, min(3, capacity))),
        "n_step": draw(st.integers(1, min(3, capacity))),
        "gamma": draw(st.sampled_from([0.0, 0.5, 0.99, 1.0])),
        "num_envs": draw(st.integers(1, min(3, capacity - 1))),
        "embedding_dim": draw(st.sampled_from([0, 0, 1, 3])),
        "embedding_dtype": draw(st.sampled_from([torch.float32, torch.float16])),
        "shift_pad": draw(st.integers(0, 2)),
    }


class Source:
    """Random observations, actions and embeddings for one buffer's shapes."""

    def __init__(self, buf: ReplayBuffer, seed: int) -> None:
        self.buf, self.gen = buf, torch.Generator().manual_seed(seed)

    def obs(self, *batch: int) -> torch.Tensor:
        shape = (*batch, *self.buf.obs_shape)
        if self.buf.pixels:
            return torch.randint(0, 256, shape, generator=self.gen, dtype=torch.uint8)
        return torch.randn(shape, generator=self.gen)

    def emb(self, *batch: int) -> torch.Tensor | None:
        d = self.buf._layout.embedding_dim
        if d == 0:
            return None
        return torch.randn((*batch, d), generator=self.gen).to(self.buf._layout.embedding_dtype)

    def action(self, *batch: int) -> torch.Tensor:
        return torch.randn((*batch, self.buf._layout.action_dim), generator=self.gen)


def fill_randomly(buf: ReplayBuffer, src: Source, steps: int) -> None:
    """Valid adds through the facade: episodes of random length on every env, some left open."""
    for t in range(steps):
        env = t % buf.num_envs
        if not buf.episode_open(env):
            buf.start_episode(src.obs(), embedding=src.emb(), env=env)
        end = bool(torch.rand(1, generator=src.gen) < 0.25)
        try:
            buf.add(src.obs(), src.action(), 1.0, end, False, embedding=src.emb(), env=env)
        except ValueError:  # capacity too small for this interleaving: end that episode
            buf.truncate_episode(env)


@st.composite
def core_call(draw, buf: ReplayBuffer, src: Source):
    """One ReplayCore method with fuzzed arguments: (name, args)."""
    n, lay = buf.num_envs, buf._layout
    f, c = lay.frame_stack, buf.obs_shape[0]
    name = draw(st.sampled_from(sorted(REPLAY_METHODS - {"__init__"})))

    def cap(t: torch.Tensor | None) -> Any:
        return None if t is None or draw(st.integers(0, 5)) == 0 else draw(arg(t)).obj

    env = draw(st.integers(0, n) | INTS)
    stream = draw(st.sampled_from([0, 0, 7, 2**64 - 1]))
    floats = st.sampled_from([0.5, *SPECIAL_FLOATS])
    if name in ("__len__",):
        return name, ()
    if name in ("episode_open", "truncate_episode"):
        return name, (env,)
    if name == "start_episode":
        return name, (env, cap(src.obs()), cap(src.emb()), stream)
    if name == "add":
        flags = [draw(st.booleans()) for _ in range(3)]
        return name, (
            env,
            cap(src.obs()),
            cap(src.action()),
            draw(floats),
            *flags,
            cap(src.emb()),
            draw(floats),
            stream,
        )
    if name == "add_batch":
        bools = [torch.rand(n, generator=src.gen) < 0.3 for _ in range(3)]
        reset = draw(st.booleans())
        return name, (
            cap(src.obs(n)),
            cap(src.action(n)),
            cap(torch.randn(n)),
            *map(cap, bools),
            cap(src.emb(n)),
            cap(torch.randn(n)),
            cap(src.obs(n)) if reset else None,
            cap(src.emb(n)) if reset else None,
            stream,
        )
    b = draw(st.integers(1, 5) | INTS)
    rows = b if 1 <= b <= 64 else 3
    cap_ = buf.capacity
    indices = torch.tensor(
        [draw(st.integers(-1, cap_) | INTS.filter(lambda v: abs(v) < 2**63)) for _ in range(rows)],
        dtype=torch.int64,
    )
    if name == "earlier":
        return name, (cap(indices), draw(INTS), cap(torch.empty(rows, dtype=torch.int64)))
    shifts = torch.randint(-1, 2 * lay.shift_pad + 2, (rows, 4), generator=src.gen).int()
    emb_dtype, d = lay.embedding_dtype, lay.embedding_dim
    shapes = {
        "obs": ((rows, f * c, *buf.obs_shape[1:]), lay.obs_dtype),
        "embedding": ((rows, d), emb_dtype),
        "step_embeddings": ((rows, lay.n_step, d), emb_dtype),
        "step_slots": ((rows, lay.n_step), torch.int64),
        "step_discounts": ((rows, lay.n_step), torch.float32),
        "obs_slots": ((rows, f), torch.int64),
        "shifts": ((rows, 4), torch.int32),
        "action": ((rows, lay.action_dim), torch.float32),
        "success": ((rows,), torch.bool),
        "indices": ((rows,), torch.int64),
        "episodes": ((rows,), torch.int64),
        "steps": ((rows,), torch.int64),
    }
    for a, b_ in (
        ("next_obs", "obs"),
        ("next_embedding", "embedding"),
        ("next_slots", "obs_slots"),
    ):
        shapes[a] = shapes[b_]
    for k in ("reward", "discount", "goal_distance"):
        shapes[k] = ((rows,), torch.float32)
    names = draw(st.lists(st.sampled_from(SAMPLE_OUTPUTS + ("bogus",)), unique=True, max_size=6))
    outputs = {
        k: cap(
            torch.empty(
                *shapes.get(k, ((rows,), torch.float32))[:1][0],
                dtype=shapes.get(k, ((), torch.float32))[1],
            )
        )
        for k in names
    }
    return name, (
        b,
        draw(st.booleans()),
        cap(indices) if draw(st.booleans()) else None,
        cap(shifts) if draw(st.booleans()) else None,
        outputs,
        draw(THREADS),
    )


@FUZZ
@given(replay_configs(), SEEDS, st.integers(0, 30), st.data())
def test_replay_core_methods(cfg, seed, steps, data):
    """Fuzzed direct calls into a filled buffer's ReplayCore: results or TypeError / ValueError,
    and afterwards the buffer still passes the consistency check of a reload."""
    buf = ReplayBuffer(**cfg, seed=seed)
    src = Source(buf, seed)
    fill_randomly(buf, src, steps)
    for _ in range(4):
        name, args = data.draw(core_call(buf, src))
        call(getattr(buf._core, name), *args)
    with tempfile.TemporaryDirectory() as tmp:
        buf.save(Path(tmp) / "b.bin")
        again = ReplayBuffer.load(Path(tmp) / "b.bin")
    assert len(again) == len(buf)


@FUZZ
@given(st.lists(INTS | st.none() | st.text(max_size=3), max_size=3))
def test_replay_columns(args):
    """replay_columns() takes no argument (anything else is a TypeError) and describes the same
    columns every time, with rules from the vocabulary the facade reads."""
    columns, exc = call(C.replay_columns, *args)
    if args:
        assert isinstance(exc, TypeError)
        return
    assert exc is None and columns == C.replay_columns() and len(columns) >= 1
    assert all(len(c) == 4 and all(isinstance(v, str) for v in c) for c in columns)


LAYOUT_JUNK = st.sampled_from([-1, 0, 2**31, 2**62, 2**63 - 1, 2**64, 1.5, math.nan, "x", None])


@FUZZ
@given(replay_configs(), st.data())
def test_replay_core_constructor(cfg, data):
    """ReplayCore(layout, columns, fresh, seed) with fuzzed layouts and storage columns."""
    draw = data.draw
    buf = ReplayBuffer(**cfg, seed=0)
    lay = buf._layout
    layout = lay.native_layout(buf.device)
    for key in draw(st.lists(st.sampled_from(sorted(layout)), max_size=2, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            del layout[key]
        else:
            layout[key] = draw(LAYOUT_JUNK | st.sampled_from(["cuda", "float64"]))
    columns = {}
    for name, t in buf._columns.items():
        if draw(st.integers(0, 3)) > 0 or name == "state":  # most columns as they are
            columns[name] = to_dlpack(t)
        elif draw(st.booleans()):  # or another column's memory, or fuzzed
            columns[name] = to_dlpack(buf._columns[draw(st.sampled_from(sorted(buf._columns)))])
        else:
            columns[name] = draw(arg(t)).obj
    core, exc = call(
        C.ReplayCore, layout, columns, draw(st.booleans()), draw(st.integers(0, 2**64 - 1))
    )
    if exc is None:  # a core that was accepted must work: fill it past wrap-around and sample
        src = Source(buf, 0)
        for t in range(3 * buf.capacity):
            emb = to_dlpack(src.emb()) if lay.embedding_dim else None
            if t % 4 == 0:
                call(core.start_episode, 0, to_dlpack(src.obs()), emb)
            call(
                core.add,
                0,
                to_dlpack(src.obs()),
                to_dlpack(src.action()),
                1.0,
                t % 4 == 3,
                False,
                False,
                emb,
                0.0,
            )
            if len(core):
                out = {
                    "reward": to_dlpack(torch.empty(2)),
                    "obs": to_dlpack(
                        torch.empty(
                            2,
                            lay.frame_stack * buf.obs_shape[0],
                            *buf.obs_shape[1:],
                            dtype=lay.obs_dtype,
                        )
                    ),
                }
                call(core.sample, 2, True, None, None, out, 1)


# Sizes for the ReplayBuffer constructor: small ones, and ones absurd on any machine (a valid
# capacity times one of these is terabytes), never merely large: those would really be allocated.
REPLAY_SIZES = st.one_of(st.integers(1, 5), st.sampled_from([0, -1, 2**40, 2**62, 2**64, 1.5, "3"]))


@FUZZ
@given(
    capacity=st.integers(2, 14) | st.sampled_from([0, -1, 2**31, 2**62, 2**64, 1.5, "8", None]),
    obs_shape=st.lists(REPLAY_SIZES, min_size=0, max_size=4).map(tuple) | st.just("obs"),
    sizes=st.fixed_dictionaries(
        {k: REPLAY_SIZES for k in ("action_dim", "frame_stack", "n_step", "num_envs", "shift_pad")}
    ),
    embedding_dim=st.sampled_from([0, 3, 2**40, -1]),
    gamma=st.sampled_from([0.99, 0.0, 1.0, -0.1, 1.5, math.nan, "g"]),
)
def test_replay_buffer_constructor(capacity, obs_shape, sizes, embedding_dim, gamma):
    """ReplayBuffer(...) with fuzzed sizes: a working buffer, or an exception before any memory
    that cannot exist is allocated or written (torch may still refuse a lazy allocation)."""
    try:
        buf = ReplayBuffer(capacity, obs_shape, embedding_dim=embedding_dim, gamma=gamma, seed=0,
                           **sizes)  # fmt: skip
    except (ValueError, TypeError):
        return
    except RuntimeError as exc:  # frames or embeddings of terabytes: torch's allocator says no
        assert re.search(r"can't allocate memory|Storage size calculation overflowed", str(exc))
        return
    if buf.nbytes < 2**20:  # small enough to use: fill it and sample
        fill_randomly(buf, Source(buf, 0), 2 * buf.capacity)
        if len(buf):
            buf.sample(1)


# ---- replay buffer: random call sequences against the model, with save / load and damaged files --

MAGIC = b"FURLRPB\x00"
NASTY_INTS = [-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 13, 14, 15, 2**31 - 2, 2**31 - 1, 2**62,
              2**63 - 1]  # fmt: skip


def split_file(data: bytes) -> tuple[dict, list[bytearray]]:
    """A saved buffer as (header, the bytes of each column)."""
    size = struct.unpack_from("<I", data, len(MAGIC) + 4)[0]
    start = len(MAGIC) + 12
    header = json.loads(data[start : start + size])
    cols, pos = [], start + size
    for _, dtype, shape in header["layout"]["columns"]:
        n = math.prod(shape) * getattr(torch, dtype).itemsize
        cols.append(bytearray(data[pos : pos + n]))
        pos += n
    return header, cols


def join_file(header: dict, cols: list[bytearray], fix_crcs: bool = True) -> bytes:
    """The inverse of split_file; fix_crcs recomputes the checksums, so that damage reaches the
    layout and consistency checks behind them."""
    if fix_crcs:
        header["crc32"] = [zlib.crc32(c) for c in cols]
    blob = json.dumps(header).encode()
    version = file_format.FORMAT_VERSION
    return MAGIC + struct.pack("<III", version, len(blob), zlib.crc32(blob)) + blob + b"".join(cols)


@st.composite
def damage(draw, data: bytes) -> bytes:
    """A saved file damaged one way: cut, a flipped byte, or a column value or layout entry
    rewritten with the checksums fixed (what a bug, not a disk, would write)."""
    kind = draw(st.sampled_from(["cut", "flip", "column", "column", "column", "layout"]))
    if kind == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    header, cols = split_file(data)
    if kind == "layout":
        layout = header["layout"]
        key = draw(st.sampled_from(sorted(layout)))
        layout[key] = draw(
            st.sampled_from(
                [*NASTY_INTS, 0.5, math.nan, "float16", None, [3], [["state", "int64", [2**40]]]]
            )
        )
        return join_file(header, cols)
    names = [name for name, _, _ in header["layout"]["columns"]]
    # (Columns are empty in a file saved before the first add: nothing to rewrite there.)
    i = draw(st.sampled_from([k for k, n in enumerate(names) if n != "frames" and cols[k]]))
    dtype = getattr(np, header["layout"]["columns"][i][1])
    values = np.frombuffer(cols[i], dtype=dtype).copy()
    # Half of the time a position the next operations read for sure: the counters, or the slot of
    # an open episode's latest observation (the next add() continues from it).
    state = np.frombuffer(cols[names.index("state")], dtype=np.int64)
    capacity = header["layout"]["capacity"]
    hot = [0, 1, 2] if names[i] == "state" else [int(v) % capacity for v in state[8:] if v >= 0]
    j = draw(
        st.sampled_from(hot) if hot and draw(st.booleans()) else st.integers(0, len(values) - 1)
    )
    j = j if j < len(values) else 0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values[j] = min(max(draw(st.sampled_from(NASTY_INTS)), info.min), info.max)
    else:
        with np.errstate(over="ignore"):  # 1e38 in a float16 column: inf, as intended
            values[j] = draw(st.sampled_from(SPECIAL_FLOATS))
    cols[i] = bytearray(values.tobytes())
    return join_file(header, cols)


def load_and_use(path: Path) -> ReplayBuffer | None:
    """Loads a possibly damaged file and drives the buffer through every operation. Each step may
    raise; none may crash, and a file that loads must behave like a buffer."""
    try:
        buf = ReplayBuffer.load(path)
    except ValueError:  # the checks caught it (RuntimeError: the consistency check caught it)
        return None
    except RuntimeError as exc:
        assert "inconsistent" in str(exc), exc
        return None
    src = Source(buf, 0)

    def attempt(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except ValueError:
            pass
        except RuntimeError as exc:  # a link the load check could not see (never a crash)
            assert "inconsistent" in str(exc), exc

    for _ in range(2):
        if len(buf):
            attempt(buf.sample, min(len(buf), 4))
        for i in range(buf.capacity):
            attempt(buf.gather, [i], shifts=[[0, 0, 0, 0]] if buf.pixels else None)
            attempt(buf.earlier, [i], 2)
        for env in range(buf.num_envs):  # continue the open episodes, end them, start new ones
            for end in (False, True):
                attempt(
                    buf.add, src.obs(), src.action(), 1.0, end, False, env=env, embedding=src.emb()
                )
            attempt(buf.start_episode, src.obs(), env=env, embedding=src.emb())
        fill_randomly(buf, src, buf.capacity + 2)  # around the ring: every slot rewritten
    attempt(buf.truncate_episode, 0)
    with tempfile.TemporaryDirectory() as tmp:
        buf.save(Path(tmp) / "again.bin")
        try:
            ReplayBuffer.load(Path(tmp) / "again.bin")  # what the buffer became is consistent
        except RuntimeError as exc:  # but a counter loaded at its limit has since passed it
            assert "counters out of range" in str(exc), exc
    return buf


class ReplayMachine(RuleBasedStateMachine):
    """Random start / add / add_batch / truncate / sample / gather / earlier / save+load sequences,
    each checked against the pure-Python model of test_replay.py (errors included), plus damaged
    copies of the saved file loaded on the side."""

    @initialize(cfg=replay_configs(), seed=SEEDS)
    def create(self, cfg, seed):
        self.buf = ReplayBuffer(**cfg, seed=seed)
        self.src = Source(self.buf, seed)
        self.model = Model(cfg["capacity"], cfg["frame_stack"], cfg["n_step"], cfg["gamma"])
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "buffer.bin"

    def teardown(self):
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    # -- what the model says the buffer must do

    def add_error(self, env: int) -> str | None:
        if not 0 <= env < self.buf.num_envs:
            return "'env' must be in"
        if env not in self.model.open:
            return "no open episode"
        last = self.model.episodes[self.model.open[env]][-1]
        if last <= len(self.model.obs) - self.buf.capacity:  # its slot is the next one written
            return "was overwritten"
        return None

    def valid_slots(self) -> set[int]:
        return {seq % self.buf.capacity for seq in self.model.valid()}

    # -- rules

    @rule(env=st.integers(0, 3))
    def start(self, env):
        obs, emb = self.src.obs(), self.src.emb()
        error = (
            self.add_error(env)
            if env >= self.buf.num_envs
            else "still has an open episode"
            if env in self.model.open
            else None
        )
        if error:
            with pytest.raises(ValueError, match=error):
                self.buf.start_episode(obs, embedding=emb, env=env)
        else:
            self.buf.start_episode(obs, embedding=emb, env=env)
            self.model.start(env, obs, emb)

    @rule(
        env=st.integers(0, 3),
        end=st.sampled_from([None, None, None, "term", "trunc"]),
        reward=st.floats(-10, 10),
        success=st.booleans(),
        goal=st.none() | st.floats(0, 5),
    )
    def add(self, env, end, reward, success, goal):
        obs, action, emb = self.src.obs(), self.src.action(), self.src.emb()
        term, trunc = end == "term", end == "trunc"
        kwargs = {"success": success, "embedding": emb, "goal_distance": goal, "env": env}
        error = self.add_error(env)
        if error:
            with pytest.raises(ValueError, match=error):
                self.buf.add(obs, action, reward, term, trunc, **kwargs)
            return
        self.buf.add(obs, action, reward, term, trunc, **kwargs)
        g = math.nan if goal is None else goal
        self.model.add(env, obs, action, reward, term, trunc, success, g, emb)

    @rule(ends=st.lists(st.booleans(), min_size=3, max_size=3), reset=st.booleans())
    def add_batch(self, ends, reset):
        n = self.buf.num_envs
        obs, action, emb = self.src.obs(n), self.src.action(n), self.src.emb(n)
        reward = torch.randn(n, generator=self.src.gen)
        term = torch.tensor(ends[:n])
        reset_obs, reset_emb = (self.src.obs(n), self.src.emb(n)) if reset else (None, None)
        expected = next((e for e in (self.add_error(e) for e in range(n)) if e), None)
        if expected is None:  # the model: env by env, stopping where the ring is too small
            for e in range(n):
                expected = self.add_error(e)
                if expected:
                    break
                self.model.add(
                    e,
                    obs[e],
                    action[e],
                    float(reward[e]),
                    bool(term[e]),
                    False,
                    False,
                    math.nan,
                    None if emb is None else emb[e],
                )
                if reset and term[e]:
                    self.model.start(e, reset_obs[e], None if reset_emb is None else reset_emb[e])

        def add_batch():
            trunc = torch.zeros(n, dtype=bool)
            self.buf.add_batch(obs, action, reward, term, trunc, embedding=emb,
                               reset_obs=reset_obs, reset_embedding=reset_emb)  # fmt: skip

        if expected:
            with pytest.raises(ValueError, match=expected):
                add_batch()
        else:
            add_batch()

    @rule(env=st.integers(0, 3))
    def truncate(self, env):
        if env >= self.buf.num_envs:
            with pytest.raises(ValueError, match="'env' must be in"):
                self.buf.truncate_episode(env)
            return
        self.buf.truncate_episode(env)
        ep = self.model.open.pop(env, None)
        if ep is not None and self.model.steps[ep]:
            self.model.steps[ep][-1]["trunc"] = True

    @rule(batch=st.integers(-1, 20), augment=st.booleans())
    def sample(self, batch, augment):
        n = len(self.model.valid())
        if batch < 1 or n == 0 or batch > n:
            with pytest.raises(ValueError):
                self.buf.sample(batch, augment=augment)
            return
        b = self.buf.sample(batch, augment=augment)
        if augment and self.buf.pixels:
            assert set(b.indices.tolist()) <= self.valid_slots()
        else:
            check_batch(self.model, self.buf, b)

    @rule(data=st.data())
    def gather(self, data):
        valid = sorted(self.valid_slots())
        pick = st.sampled_from(valid) if valid else st.just(0)
        indices = data.draw(
            st.lists(pick | st.sampled_from([-1, self.buf.capacity, 2**40]), max_size=5)
        )
        pad = self.buf._layout.shift_pad
        shifts = data.draw(
            st.none()
            | st.lists(
                st.lists(st.integers(-1, 2 * pad + 1), min_size=4, max_size=4),
                min_size=len(indices),
                max_size=len(indices),
            )
        )
        ok = (
            indices
            and set(indices) <= set(valid)
            and (
                shifts is None
                or (self.buf.pixels and all(0 <= v <= 2 * pad for row in shifts for v in row))
            )
        )
        if not ok:
            with pytest.raises(ValueError):
                self.buf.gather(indices, shifts=shifts)
            return
        plain = self.buf.gather(indices)
        check_batch(self.model, self.buf, plain)
        if shifts is not None:  # (check_batch's shifted oracle assumes the default pad of 4)
            sh = torch.tensor(shifts, dtype=torch.int32)
            shifted = self.buf.gather(indices, shifts=sh)
            for got, base, cols in (
                (shifted.obs, plain.obs, 0),
                (shifted.next_obs, plain.next_obs, 2),
            ):
                expected = reference.random_shift(base, sh[:, cols : cols + 2], pad)
                torch.testing.assert_close(got, expected, rtol=0, atol=0)

    @rule(data=st.data(), k=st.integers(0, 4) | st.sampled_from([-1, 2**62, 2**70]))
    def earlier(self, data, k):
        valid = sorted(self.valid_slots())
        indices = data.draw(st.lists(st.sampled_from(valid) if valid else st.just(0), max_size=4))
        if k < 0 or not set(indices) <= set(valid):
            with pytest.raises(ValueError):
                self.buf.earlier(indices, k)
            return
        got = self.buf.earlier(indices, k).tolist()
        by_slot = {seq % self.buf.capacity: key for seq, key in self.model.valid().items()}
        for i, j in zip(indices, got):  # same episode, at most k steps back, only valid ones
            (ep, t), (ep2, t2) = by_slot[i], by_slot[j]
            assert ep == ep2 and t - min(k, t) <= t2 <= t

    @rule()
    def save_and_load(self):
        self.buf.save(self.path)
        loaded = ReplayBuffer.load(self.path)
        assert len(loaded) == len(self.buf)
        if len(loaded):  # the RNG state came along: the same draws
            a, b = self.buf.sample(1), loaded.sample(1)
            assert torch.equal(a.indices, b.indices) and torch.equal(a.obs, b.obs)
        self.buf, self.src.buf = loaded, loaded

    @precondition(lambda self: self.buf is not None)
    @rule(data=st.data())
    def load_damaged_copy(self, data):
        self.buf.save(self.path)
        damaged = self.path.with_name("damaged.bin")
        damaged.write_bytes(data.draw(damage(self.path.read_bytes())))
        load_and_use(damaged)

    @invariant()
    def same_size_as_model(self):
        if hasattr(self, "model"):
            assert len(self.buf) == len(self.model.valid())


ReplayMachine.TestCase.settings = settings(FUZZ, stateful_step_count=25)
test_replay_call_sequences = ReplayMachine.TestCase


@pytest.mark.parametrize("path", sorted(CORPUS.glob("replay/*.bin")), ids=lambda p: p.name)
def test_damaged_replay_files_from_the_corpus(path):
    load_and_use(path)


# ---- regressions: what the fuzzer and the sanitizers found (issue 11) ---------------------------
# The fuzz tests above draw these inputs too; these name each one and its expected error, so that
# every fix has a test that fails without it in any build (the first ones as @example-like direct
# calls, the damaged files as a committed corpus).


def _base_file() -> bytes:
    """A small saved buffer: one finished episode and one open one (its latest slot is 5)."""
    buf = ReplayBuffer(8, (2,), 1, n_step=2, seed=0)
    buf.start_episode([0.0, 0.0])
    for t in range(3):
        buf.add([t + 1.0, 0.0], [0.5], 1.0, t == 2, False)
    buf.start_episode([9.0, 9.0])
    buf.add([10.0, 9.0], [0.5], 1.0, False, False)
    with tempfile.TemporaryDirectory() as tmp:
        buf.save(Path(tmp) / "b.bin")
        return (Path(tmp) / "b.bin").read_bytes()


def _set(*edits: tuple[str, int | slice, int]):
    """Column values rewritten (checksums then fixed): (column, index, value) each."""

    def recipe(header, cols):
        names = [n for n, _, _ in header["layout"]["columns"]]
        for name, index, value in edits:
            i = names.index(name)
            dtype = getattr(np, header["layout"]["columns"][i][1])
            values = np.frombuffer(cols[i], dtype=dtype).copy()
            values[index] = value
            cols[i] = bytearray(values.tobytes())
        return join_file(header, cols)

    return recipe


def _edit_header(edit):
    """The header edited (its own checksum fixed, the column checksums kept)."""

    def recipe(header, cols):
        edit(header)
        return join_file(header, cols, fix_crcs=False)

    return recipe


# file name -> (how it was made from _base_file(), what loading and using it must do)
CORPUS_CASES = {
    # UBSan: signed overflow of steps[slot] + 1 in ReplayCore::add_locked.
    "steps_at_int32_max.bin": (_set(("steps", 5, 2**31 - 1)), "add: .* 2\\^31 - 1 steps"),
    # UBSan: signed overflow of the episode counter in start_episode.
    "episode_counter_at_int64_max.bin": (_set(("state", 1, 2**63 - 1)), "counters out of range"),
    # UBSan: signed overflow of the write counter in write_observation (no valid transition left,
    # so no n-step window check saw the counter).
    "write_counter_at_int64_max.bin": (
        _set(("state", 0, 2**63 - 1), ("state", 2, 0), ("valid_pos", slice(None), -1)),
        "counters out of range",
    ),
    "valid_list_out_of_range.bin": (_set(("valid_list", 0, 8)), "inconsistent \\(valid"),
    "next_link_ahead_of_the_writes.bin": (_set(("next", 0, 7)), "inconsistent"),
    # Before: an IndexError-free zip read only the first columns, the rest stayed uninitialised.
    "header_with_fewer_checksums.bin": (
        _edit_header(lambda h: h["crc32"].pop()),
        "unknown structure",
    ),
    # Before: a 32 GiB allocation (torch RuntimeError, or an abort under ASan) before the checks.
    "header_with_huge_embedding_dim.bin": (
        _edit_header(lambda h: h["layout"].update(embedding_dim=2**31 - 2)),
        "storage layout",
    ),
    "header_with_huge_column.bin": (
        _edit_header(lambda h: h["layout"]["columns"][0].__setitem__(2, [2**40, 2])),
        "truncated",
    ),
    # Before: a KeyError.
    "header_without_layout.bin": (_edit_header(lambda h: h.pop("layout")), "unknown structure"),
}


def write_corpus() -> None:
    """Regenerates python_tests/fuzz_corpus/replay/ from CORPUS_CASES:
    `cd python_tests && python -c "import test_fuzz_native_replay as t; t.write_corpus()"`."""
    (CORPUS / "replay").mkdir(parents=True, exist_ok=True)
    for name, (recipe, _) in CORPUS_CASES.items():
        (CORPUS / "replay" / name).write_bytes(recipe(*split_file(_base_file())))


@pytest.mark.parametrize("name", sorted(CORPUS_CASES))
def test_damaged_replay_file_regressions(name):
    path = CORPUS / "replay" / name
    assert path.exists(), "run write_corpus() (see its docstring)"
    expected = CORPUS_CASES[name][1]
    try:
        buf = ReplayBuffer.load(path)
    except (ValueError, RuntimeError) as exc:
        assert re.search(expected, str(exc)), exc
        return
    with pytest.raises(ValueError, match=expected):  # loads: the damage shows when it is used
        buf.add([1.0, 1.0], [0.5], 1.0, False, False)


def _filled_buffer(**kwargs) -> ReplayBuffer:
    buf = ReplayBuffer(8, (2,), 1, seed=0, **kwargs)
    buf.start_episode([0.0, 0.0])
    for t in range(4):
        buf.add([t + 1.0, 0.0], [0.5], 1.0, t == 3, False)
    return buf


def test_earlier_refuses_unaligned_indices():
    # The indices were read as int64 without an alignment check: UB (UBSan).
    core = _filled_buffer()._core
    raw = np.zeros(8 * 2 + 1, np.uint8)
    unaligned = np.frombuffer(raw, dtype=np.int64, offset=1, count=2)
    with pytest.raises(
        ValueError, match=r"earlier: argument 'indices' has a data pointer not aligned"
    ):
        core.earlier(
            unaligned.__dlpack__(max_version=(1, 0)),
            1,
            to_dlpack(torch.empty(2, dtype=torch.int64)),
        )


def test_env_errors_name_the_op_and_the_range():
    core = _filled_buffer()._core
    for method in ("episode_open", "truncate_episode"):
        with pytest.raises(ValueError, match=rf"^{method}: 'env' must be in \[0, 1\), got 5\.$"):
            getattr(core, method)(5)


def test_frame_stack_and_n_step_beyond_the_capacity():
    # frame_stack = 2^31 made sample() zero-fill a 16 GiB vector per stack.
    with pytest.raises(ValueError, match=r"'frame_stack' must be an int in \[1, 8\]"):
        ReplayBuffer(8, (2,), 1, frame_stack=9)
    with pytest.raises(ValueError, match=r"'n_step' must be an int in \[1, 8\]"):
        ReplayBuffer(8, (2,), 1, n_step=2**31)
    buf = ReplayBuffer(8, (2,), 1, seed=0)
    layout = _layout_dict(buf, frame_stack=2**31)
    with pytest.raises(
        ValueError, match=r"ReplayBuffer: 'frame_stack' must be in \[1, capacity = 8\]"
    ):
        C.ReplayCore(layout, {k: to_dlpack(t) for k, t in buf._columns.items()}, True, 0)


def _layout_dict(buf: ReplayBuffer, **changes) -> dict[str, Any]:
    return {**buf._layout.native_layout(buf.device), **changes}


def test_replay_layout_entries_are_checked():
    # Before: KeyError for a missing entry, pybind11's RuntimeError for a wrong type.
    buf = ReplayBuffer(8, (2,), 1, seed=0)
    cols = {k: to_dlpack(t) for k, t in buf._columns.items()}
    layout = _layout_dict(buf)
    del layout["n_step"]
    with pytest.raises(ValueError, match=r"ReplayBuffer: layout entry 'n_step' is missing\."):
        C.ReplayCore(layout, cols, True, 0)
    for key, value in (("capacity", "8"), ("capacity", 8.0), ("capacity", 2**64), ("pixels", 1)):
        with pytest.raises(TypeError, match=rf"ReplayBuffer: layout entry '{key}' must be"):
            C.ReplayCore(_layout_dict(buf, **{key: value}), cols, True, 0)


def test_storage_columns_may_not_share_memory():
    # prev and next (or steps and valid_list) as one tensor: writes to one corrupt the indices kept
    # in the other, and sample() then read outside the columns (ASan: heap-buffer-overflow).
    buf = ReplayBuffer(8, (2,), 1, seed=0)
    cols = {k: to_dlpack(t) for k, t in buf._columns.items()}
    cols["valid_list"] = to_dlpack(buf._columns["steps"])
    with pytest.raises(ValueError, match=r"storage columns 'steps' and 'valid_list' share memory"):
        C.ReplayCore(_layout_dict(buf), cols, True, 0)


def test_arguments_may_not_point_into_the_storage():
    buf = _filled_buffer()
    core, cols = buf._core, buf._columns
    with pytest.raises(
        ValueError, match=r"sample: argument 'reward' points into the buffer's 'rewards'"
    ):
        core.sample(2, False, None, None, {"reward": to_dlpack(cols["rewards"][:2])}, 1)
    buf.start_episode([0.0, 0.0])
    with pytest.raises(
        ValueError, match=r"add: argument 'next_obs' points into the buffer's 'frames'"
    ):
        core.add(
            0,
            to_dlpack(cols["frames"][5]),
            to_dlpack(torch.zeros(1)),
            0.0,
            False,
            False,
            False,
            None,
            0.0,
        )


def test_replay_sizes_that_cannot_exist_raise_before_allocating():
    # capacity 2^31 - 1 with 2^20-wide actions: 8 PiB of bookkeeping that construction would write.
    with pytest.raises(ValueError, match=r"GiB of bookkeeping"):
        ReplayBuffer(2**31 - 1, (1,), 2**20)
    with pytest.raises(ValueError, match=r"more than 2\^60 bytes"):
        ReplayBuffer(2**31 - 1, (2**20, 2**20, 4), 1)
    with pytest.raises(ValueError, match=r"'capacity' must be an int in \[1, 2147483647\]"):
        ReplayBuffer(2**31, (1,), 1)


def test_saved_files_hold_no_uninitialised_memory(tmp_path):
    # Slots never written were saved as whatever torch.empty found there: two identical buffers
    # gave different files (and leaked other memory of the process into them).
    for name in ("a.bin", "b.bin"):
        buf = ReplayBuffer(16, (3, 4, 4), 1, embedding_dim=2, seed=0)
        torch.empty(1 << 16, dtype=torch.uint8).fill_(0xAB)  # leave something behind to find
        buf.start_episode(torch.ones(3, 4, 4, dtype=torch.uint8), embedding=torch.ones(2))
        buf.save(tmp_path / name)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_earlier_takes_any_k():
    buf = _filled_buffer()
    idx = buf.gather([3]).indices
    assert buf.earlier(idx, 2**70).tolist() == [0]  # was pybind11's TypeError beyond int64
