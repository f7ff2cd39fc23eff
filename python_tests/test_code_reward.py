"""Tests for code-as-reward (furl_fast.rewards.code): sandbox (incl. hostile programs), progress rule,
verifier on real Meta-World rollouts, dense reward, generation client against a loopback server.

Rollouts here are state-only: frames are tiny (T+1, 8, 8, 3) zero dummies, because rendering is slow
on the CPU machines and the reference programs read only the state.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from fake_vlm import FakeVLM  # python_tests/ is on sys.path

from furl_fast.rewards.code import (
    REFERENCE_PROGRAM_SETS,
    CodeReward,
    GenerationError,
    ProgramSet,
    Sandbox,
    SandboxLimits,
    VerifierConfig,
    VLMConfig,
    check_source,
    encode_png,
    evaluate_programs,
    generate_program_set,
    parse_program_set,
    progress_from_done,
    reference_program_set,
    verify,
)

# Small limits keep the hostile cases quick; the deadlines still bound every call.
FAST = SandboxLimits(
    time_limit_s=0.3, grace_s=0.3, memory_limit_mb=256, max_batch_mb=64, slack_s=5.0
)


# ------------------------------------------------------------------------------------------------
# Rollouts (same layout as furl_fast.envs' Rollout: states (T+1, 39), frames (T+1, H, W, 3) uint8,
# successes (T,) bool), produced with gymnasium + metaworld directly.
# ------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    states: np.ndarray
    frames: np.ndarray
    successes: np.ndarray


def _rollouts(task: str, seed: int, n_expert: int, n_random: int, steps: int = 200):
    """Expert and random-action rollouts from one env (building a Meta-World env costs ~1-2 s here;
    each reset of the MT1 env draws a new task variation, e.g. a new drawer or goal position)."""
    import gymnasium as gym
    import metaworld  # noqa: F401 - registers the Meta-World ids
    from metaworld import policies

    env = gym.make("Meta-World/MT1", env_name=task, seed=seed, disable_env_checker=True)
    name = "Sawyer" + "".join(w.capitalize() for w in task[:-3].split("-")) + "V3Policy"
    policy = getattr(policies, name)()
    rng = np.random.default_rng(seed)
    out: tuple[list[Rollout], list[Rollout]] = ([], [])
    for i in range(n_expert + n_random):
        expert = i < n_expert
        obs, _ = env.reset(seed=seed) if i == 0 else env.reset()
        states, successes = [obs], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the scripted policies warn about clipped actions
            for _ in range(steps):
                action = policy.get_action(obs) if expert else rng.uniform(-1, 1, 4)
                obs, _, _, _, info = env.step(np.clip(action, -1, 1).astype(np.float32))
                states.append(obs)
                successes.append(bool(info["success"]))
        states = np.asarray(states, dtype=np.float32)
        frames = np.zeros((len(states), 8, 8, 3), np.uint8)  # dummy: the programs read the state
        out[0 if expert else 1].append(Rollout(states, frames, np.asarray(successes)))
    env.close()
    return out


@pytest.fixture(scope="module")
def rollouts() -> dict[str, tuple[list[Rollout], list[Rollout]]]:
    """Per task: 5 expert rollouts and 10 random-action rollouts of 200 steps."""
    return {
        task: _rollouts(task, i, 5, 10) for i, task in enumerate(sorted(REFERENCE_PROGRAM_SETS))
    }


def _episode(n: int, seed: int = 0, dim: int = 39) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.standard_normal((n, dim))


def _run(source: str, n: int = 4, **kwargs):
    frames, states = _episode(n)
    with Sandbox(source, FAST, **kwargs) as box:
        return box.run_episode(frames, states)


# ------------------------------------------------------------------------------------------------
# Sandbox: correct programs
# ------------------------------------------------------------------------------------------------

STATEFUL = """
import numpy as np
first = None
count = 0

def done(frame, state):
    global first, count
    count += 1
    if first is None:
        first = float(state[0])
    return bool(state[0] > first and count % 2 == 0)
"""


def _stateful_expected(x: np.ndarray) -> np.ndarray:
    count = np.arange(1, len(x) + 1)
    return (x > x[0]) & (count % 2 == 0)


def test_sandbox_batch_matches_numpy_and_keeps_episode_state() -> None:
    frames, states = _episode(997, seed=1)
    with Sandbox(STATEFUL, FAST) as box:
        r = box.run_episode(frames, states)
        assert r.ok, r.error
        np.testing.assert_array_equal(r.done, _stateful_expected(states[:, 0]))
        # A second episode re-instantiates the module: same answers again.
        r2 = box.run_episode(frames, states)
        np.testing.assert_array_equal(r2.done, r.done)


def test_sandbox_slots_and_resets_interleave_episodes() -> None:
    frames, states = _episode(40, seed=2)
    slots = np.tile([0, 1], 20)
    resets = np.zeros(40, bool)
    resets[20] = True  # slot 0 starts a new episode at item 20
    with Sandbox(STATEFUL, FAST) as box:
        r = box.run(frames, states, slots, resets)
    assert r.ok, r.error
    x = states[:, 0]
    expected = np.zeros(40, bool)
    expected[1::2] = _stateful_expected(x[1::2])
    expected[0:20:2] = _stateful_expected(x[0:20:2])
    expected[20::2] = _stateful_expected(x[20::2])
    np.testing.assert_array_equal(r.done, expected)


def test_sandbox_chunks_large_batches_without_losing_state() -> None:
    frames, states = _episode(300, seed=3)
    frames = np.repeat(np.repeat(frames, 16, axis=1), 16, axis=2)  # (300, 128, 128, 3): ~14.7 MB
    limits = SandboxLimits(time_limit_s=1.0, memory_limit_mb=64, max_batch_mb=2)  # ~40 per message
    with Sandbox(STATEFUL, limits) as box:
        r = box.run_episode(frames, states)
    assert r.ok, r.error
    np.testing.assert_array_equal(r.done, _stateful_expected(states[:, 0]))


def test_sandbox_program_sees_the_frames_read_only() -> None:
    frames, states = _episode(50, seed=4)
    src = "def done(frame, state):\n    return bool(frame[3, 5, 1] > 127 and frame.shape == (8, 8, 3))\n"
    with Sandbox(src, FAST) as box:
        r = box.run_episode(frames, states)
    assert r.ok, r.error
    np.testing.assert_array_equal(r.done, frames[:, 3, 5, 1] > 127)
    r = _run("def done(frame, state):\n    frame[0, 0, 0] = 1\n    return True\n")
    assert not r.ok and "read-only" in r.error


def test_numpy_internals_work_inside_the_sandbox() -> None:
    # ndarray.mean, printing and linalg import numpy internals lazily through the program's builtins.
    src = (
        "import numpy as np\nimport math\n"
        "def done(frame, state):\n"
        "    text = str(frame[:2, :2, 0]) + repr(state[:3].round(2))\n"
        "    m = float(frame[::2, ::2, 0].mean()) + float(np.linalg.norm(state)) * 0\n"
        "    return bool(m > 127 and len(text) > 0 and math.isfinite(m))\n"
    )
    frames, states = _episode(20, seed=9)
    with Sandbox(src, FAST) as box:
        r = box.run_episode(frames, states)
    assert r.ok, r.error
    np.testing.assert_array_equal(r.done, frames[:, ::2, ::2, 0].mean(axis=(1, 2)) > 127)


def test_state_only_programs_get_dummy_frames_with_the_same_answers() -> None:
    frames, states = _episode(30, seed=8)
    state_only = "def done(frame, state):\n    return bool(state[1] > 0)\n"
    rebound = state_only + "def other(frame, state):\n    return bool(frame[0, 0, 0] > 127)\n"
    rebound += "done = other\n"
    with Sandbox(state_only, FAST) as a, Sandbox(rebound, FAST) as b:
        assert not a.reads_frame and b.reads_frame
        np.testing.assert_array_equal(a.run_episode(frames, states).done, states[:, 1] > 0)
        np.testing.assert_array_equal(b.run_episode(frames, states).done, frames[:, 0, 0, 0] > 127)


def test_sandbox_recovers_after_a_fatal_program() -> None:
    # Swallows the time-limit interrupt only when state[0] > 0: the worker is ended and the next
    # call starts a fresh one.
    src = (
        "def done(frame, state):\n"
        "    if state[0] > 0:\n"
        "        while True:\n"
        "            try:\n"
        "                while True:\n"
        "                    pass\n"
        "            except:\n"
        "                pass\n"
        "    return True\n"
    )
    frames, states = _episode(3)
    states[:, 0] = [-1.0, 1.0, -1.0]
    with Sandbox(src, FAST) as box:
        r = box.run_episode(frames, states)
        assert not r.ok and "time limit" in r.error
        assert r.done.tolist() == [True, False, False]
        r = box.run_episode(frames[[0]], states[[0]])
        assert r.ok and r.done.tolist() == [True]


def test_sandbox_validates_its_inputs() -> None:
    frames, states = _episode(3)
    with Sandbox("def done(frame, state):\n    return True\n", FAST) as box:
        with pytest.raises(ValueError, match="frames"):
            box.run(frames.astype(np.float32), states)
        with pytest.raises(ValueError, match="states"):
            box.run(frames, states.astype(np.int32))
        with pytest.raises(ValueError, match="items"):
            box.run(frames[:2], states)
        with pytest.raises(ValueError, match="resets"):
            box.run(frames, states, resets=np.zeros(3, np.int8))
    with pytest.raises(ValueError, match="memory_limit_mb"):
        SandboxLimits(memory_limit_mb=100, max_batch_mb=128)


# ------------------------------------------------------------------------------------------------
# Sandbox: hostile programs. Every one is a failed program with a reason, never a caller failure.
# ------------------------------------------------------------------------------------------------

HOSTILE = {
    "infinite loop": ("def done(frame, state):\n    while True:\n        pass\n", "time limit"),
    "loop at top level": (
        "while True:\n    pass\ndef done(frame, state):\n    return True\n",
        "time limit",
    ),
    "swallows the interrupt": (
        (
            "def done(frame, state):\n    while True:\n        try:\n            while True:\n"
            "                pass\n        except:\n            pass\n"
        ),
        "time limit",
    ),
    "numpy memory bomb": (
        "import numpy as np\ndef done(frame, state):\n    return bool(np.ones(10**11).sum() > 0)\n",
        "MemoryError",
    ),
    "list memory bomb": (
        "def done(frame, state):\n    x = [0] * 10**10\n    return True\n",
        "MemoryError",
    ),
    "growing memory": (
        "keep = []\ndef done(frame, state):\n    while True:\n        keep.append(bytes(10**7))\n",
        "MemoryError",
    ),
    "crash": ("def done(frame, state):\n    return 1 / 0\n", "ZeroDivisionError"),
    "recursion": ("def done(frame, state):\n    return done(frame, state)\n", "RecursionError"),
    "returns int": ("def done(frame, state):\n    return 1\n", "returned int, expected bool"),
    "returns None": ("def done(frame, state):\n    pass\n", "returned NoneType, expected bool"),
    "returns array": (
        "def done(frame, state):\n    return state > 0\n",
        "returned ndarray, expected bool",
    ),
    "import os": ("import os\ndef done(frame, state):\n    return True\n", "rejected"),
    "import socket": ("import socket\ndef done(frame, state):\n    return True\n", "rejected"),
    "from subprocess": (
        "from subprocess import run\ndef done(frame, state):\n    return True\n",
        "rejected",
    ),
    "__import__": ("def done(frame, state):\n    __import__('os')\n    return True\n", "rejected"),
    "dunder escape": (
        "def done(frame, state):\n    return ().__class__.__base__ is None\n",
        "rejected",
    ),
    "open for writing": (
        "def done(frame, state):\n    open('/tmp/x', 'w')\n    return True\n",
        "rejected",
    ),
    "numpy file write": (
        (
            "import numpy as np\ndef done(frame, state):\n"
            "    np.save('/tmp/x.npy', state)\n    return True\n"
        ),
        "rejected",
    ),
    "eval": ("def done(frame, state):\n    return eval('True')\n", "rejected"),
    "syntax error": ("def done(frame, state)\n    return True\n", "rejected"),
    "no done": ("def check(frame, state):\n    return True\n", "rejected"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_a_failed_program(name: str) -> None:
    source, reason = HOSTILE[name]
    r = _run(source)
    assert not r.ok
    assert reason in r.error, r.error
    assert not r.done.any()


# Reaches the real builtins and the os module through object.__subclasses__(), i.e. past the static
# check (which is disabled here), to show that the run-time barriers hold on their own.
ESCAPE = """
def _os_globals():
    for c in ().__class__.__base__.__subclasses__():
        if c.__name__ == '_wrap_close':
            return c.__init__.__globals__

def done(frame, state):
    g = _os_globals()
    real_import = g['__builtins__']['__import__']
"""

RUNTIME_HOSTILE = {
    "import socket": ("    import socket\n    return True\n", "not allowed"),
    "socket via real import": (
        "    real_import('socket').socket()\n    return True\n",
        "import of 'socket' is not allowed",
    ),
    "open for writing": (
        "    g['__builtins__']['open']('{victim}.new', 'w')\n    return True\n",
        "for writing is not allowed",
    ),
    "os.open for writing": (
        "    g['open']('{victim}.new', g['O_WRONLY'] | g['O_CREAT'])\n    return True\n",
        "for writing is not allowed",
    ),
    "append to a file": (
        "    g['__builtins__']['open']('{victim}', 'a')\n    return True\n",
        "for writing is not allowed",
    ),
    "os.remove": ("    g['remove']('{victim}')\n    return True\n", "os.remove is not allowed"),
    "os.system": (
        "    g['system']('touch {victim}.new')\n    return True\n",
        "os.system is not allowed",
    ),
    "subprocess": (
        "    real_import('subprocess').run(['true'])\n    return True\n",
        "not allowed",
    ),
    "kill the parent": (
        "    g['kill'](g['getppid'](), 9)\n    return True\n",
        "os.kill is not allowed",
    ),
    "ctypes": ("    real_import('ctypes').string_at(0)\n    return True\n", "ctypes"),
    "raise the limits": (
        "    real_import('resource').setrlimit(9, (-1, -1))\n    return True\n",
        "not allowed",
    ),
    "exit the worker": ("    g['_exit'](0)\n    return True\n", "worker failed"),
}


@pytest.mark.parametrize("name", sorted(RUNTIME_HOSTILE))
def test_runtime_barriers_without_the_static_check(name: str, tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    body, reason = RUNTIME_HOSTILE[name]
    r = _run(ESCAPE + body.replace("{victim}", str(victim)), static_check=False)
    assert not r.ok
    assert reason in r.error, r.error
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_program_stuck_in_c_code_is_killed_by_the_parent_deadline() -> None:
    # sum() over a range loops inside C for minutes without checking for signals, so the per-call
    # interrupt cannot reach it.
    src = "def done(frame, state):\n    return sum(range(10**11)) > 0\n"
    frames, states = _episode(1)
    limits = SandboxLimits(
        time_limit_s=0.2, grace_s=0.2, memory_limit_mb=256, max_batch_mb=64, slack_s=1.0
    )
    with Sandbox(src, limits) as box:
        r = box.run_episode(frames, states)
        assert not r.ok and "timed out" in r.error, r.error
        assert box._proc is None  # killed and reaped


def test_check_source_allows_the_whitelist_only() -> None:
    ok = (
        "import math\nimport numpy as np\nfrom numpy import linalg\ndef done(frame, state):\n"
        "    return bool(math.isfinite(float(np.linalg.norm(state))))\n"
    )
    assert check_source(ok) is None
    assert "import of 'pickle'" in check_source("import pickle\ndef done(f, s):\n    return True\n")
    assert "attribute '_core'" in check_source(
        "import numpy as np\ndef done(f, s):\n    return np._core is None\n"
    )
    assert "two positional" in check_source("def done(frame):\n    return True\n")
    # Module attributes cannot be patched (state that would survive the per-episode reset).
    patch = "import numpy as np\nnp.linalg.norm = abs\ndef done(f, s):\n    return True\n"
    assert "module 'np'" in check_source(patch)
    own_class = (
        "class Counter:\n    def __init__(self):\n        self.n = 0\n"
        "c = Counter()\ndef done(frame, state):\n    c.n += 1\n    return c.n > 2\n"
    )
    assert "'__init__'" in check_source(own_class)  # dunder methods are out, plain ones are fine
    own_class = own_class.replace("__init__", "setup").replace(
        "c = Counter()", "c = Counter()\nc.setup()"
    )
    assert check_source(own_class) is None


# ------------------------------------------------------------------------------------------------
# Progress rule and program sets
# ------------------------------------------------------------------------------------------------


def test_progress_counts_subtasks_in_order_only() -> None:
    d = np.zeros((6, 3), bool)
    d[0, 1] = True  # sub-task 2 before sub-task 1: does not count
    d[2, 0] = True
    d[2, 1] = True  # sub-tasks 1 and 2 on the same step
    d[3, 0] = False
    d[4, 2] = True
    np.testing.assert_array_equal(progress_from_done(d), [0, 0, 2, 2, 3, 3])
    d2 = np.zeros((4, 2), bool)
    d2[1, 1] = True  # sub-task 2 only ever before sub-task 1
    d2[3, 0] = True
    np.testing.assert_array_equal(progress_from_done(d2), [0, 0, 0, 1])
    with pytest.raises(ValueError):
        progress_from_done(np.zeros(5, bool))


def test_program_set_round_trip(tmp_path) -> None:
    ps = reference_program_set("drawer-open")
    ps.save(tmp_path / "set.json")
    assert ProgramSet.load(tmp_path / "set.json") == ps
    assert [p.name for p in tmp_path.iterdir()] == ["set.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="programs"):
        ProgramSet("t", ["a", "b"], ["x"])
    with pytest.raises(KeyError, match="available"):
        reference_program_set("no-such-task")


# ------------------------------------------------------------------------------------------------
# Verifier on Meta-World rollouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(REFERENCE_PROGRAM_SETS))
def test_reference_programs_pass_verification(task: str, rollouts) -> None:
    expert, random = rollouts[task]
    assert all(r.successes.any() for r in expert), "the scripted expert must succeed"
    report = verify(reference_program_set(task), expert, random)
    assert report.accepted, report.summary()
    assert report.expert_rate == 1.0 and report.random_rate <= 0.1
    assert all(p.expert_rate == 1.0 and not p.errors for p in report.programs)


@pytest.mark.parametrize("task", sorted(REFERENCE_PROGRAM_SETS))
def test_reference_programs_complete_when_metaworld_reports_success(task: str, rollouts) -> None:
    # The programs mirror each task's own success test: the last sub-task completes within a few
    # steps of Meta-World's first success flag (states are float32 here, the env uses float64).
    ps = reference_program_set(task)
    expert, _ = rollouts[task]
    done, _ = evaluate_programs(ps.programs, expert)
    for d, r in zip(done, expert):
        completed = int(np.argmax(progress_from_done(d) == len(ps)))
        first_success = int(np.argmax(r.successes)) + 1  # successes[t] belongs to states[t + 1]
        assert abs(completed - first_success) <= 5, (completed, first_success)


@pytest.mark.parametrize("task", sorted(set(REFERENCE_PROGRAM_SETS) - {"reach-v3"}))
def test_reference_programs_give_a_random_explorer_signal(task: str, rollouts) -> None:
    # A learner starts from random actions: if no sub-task ever completes for them, the code reward
    # is 0 everywhere and teaches nothing. The first stage must fire on a good share of random
    # rollouts (while all stages together stay under the verifier's 10%, tested above).
    ps = reference_program_set(task)
    _, random = rollouts[task]
    done, _ = evaluate_programs(ps.programs, random)
    first_stage = np.mean([progress_from_done(d)[-1] >= 1 for d in done])
    assert first_stage >= 0.3, f"first sub-task on only {first_stage:.0%} of random rollouts"


def test_verifier_rejects_bad_program_sets(rollouts) -> None:
    expert, random = rollouts["drawer-open-v3"]
    always = ProgramSet(
        "drawer-open-v3", ["anything"], ["def done(frame, state):\n    return True\n"]
    )
    report = verify(always, expert, random)
    assert not report.accepted and report.random_rate == 1.0
    assert "random rollouts" in report.reasons[0]
    # The random threshold is configurable.
    assert verify(always, expert, random, VerifierConfig(random_max_rate=1.0)).accepted

    never = ProgramSet("drawer-open-v3", ["never"], ["def done(frame, state):\n    return False\n"])
    report = verify(never, expert, random)
    assert not report.accepted and report.expert_rate == 0.0
    assert report.programs[0].missed_expert == list(range(len(expert)))

    # Order matters: the hand leaves its start position and never comes back, so "hand at its start
    # position" can only come before "drawer open".
    at_start = (
        "import numpy as np\nstart = None\ndef done(frame, state):\n    global start\n"
        "    if start is None:\n        start = state[0:3].copy()\n"
        "    return bool(np.linalg.norm(state[0:3] - start) < 0.01)\n"
    )
    ref = reference_program_set("drawer-open-v3")
    opened = ref.programs[-1]  # "pull the drawer open"
    in_order = ProgramSet(ref.task, ["hand at start", "open"], [at_start, opened])
    assert verify(in_order, expert, random).accepted
    swapped = ProgramSet(ref.task, ["open", "hand at start"], [opened, at_start])
    report = verify(swapped, expert, random)
    assert not report.accepted and report.expert_rate == 0.0
    assert report.programs[0].expert_rate == 1.0 and report.programs[1].expert_rate == 0.0
    assert report.programs[1].expert_any_rate == 1.0  # it was True, just not in order

    crashing = ProgramSet(
        ref.task,
        [*ref.subtasks, "crash"],
        [*ref.programs, "def done(frame, state):\n    return state[999] > 0\n"],
    )
    report = verify(crashing, expert, random, VerifierConfig(limits=FAST))
    assert not report.accepted
    crash = len(ref.programs)
    assert "IndexError" in report.programs[crash].errors[0]
    assert "expert rollout 0, step 0" in report.programs[crash].errors[0]
    assert "failure: expert rollout 0, step 0: IndexError" in report.summary()


# ------------------------------------------------------------------------------------------------
# Dense reward
# ------------------------------------------------------------------------------------------------


def test_dense_reward_matches_offline_progress_across_vector_envs(rollouts) -> None:
    ps = reference_program_set("button-press-topdown-v3")
    expert, random = rollouts["button-press-topdown-v3"]
    episodes = [expert[0], random[0], expert[1], expert[2]]
    done, _ = evaluate_programs(ps.programs, episodes)
    offline = [progress_from_done(d) / len(ps) for d in done]
    # Two envs: env 0 plays episodes 0 then 2, env 1 plays 1 then 3 (auto-reset between them).
    t_len = len(episodes[0].states)
    with CodeReward(ps, num_envs=2, limits=FAST) as reward:
        got = {0: [], 1: [], 2: [], 3: []}
        for pair in ((0, 1), (2, 3)):
            reward.reset()
            for t in range(t_len):
                frames = np.stack([episodes[e].frames[t] for e in pair])
                states = np.stack([episodes[e].states[t] for e in pair])
                r = reward.batch(frames, states)
                for e, value in zip(pair, r):
                    got[e].append(value)
    for e in range(4):
        np.testing.assert_allclose(got[e], offline[e])
    assert got[0][-1] == 1.0 and got[1][-1] < 1.0  # the random episode never finishes
    assert np.all(np.diff(got[0]) >= 0)


def test_dense_reward_scores_one_env_reset_while_the_other_runs_on(rollouts) -> None:
    # The trainer's pattern: every step scores all envs; an env whose episode ended is reset and
    # its reset observation scored alone (env_ids), while the other env's episode goes on.
    ps = reference_program_set("button-press-topdown-v3")
    expert, random = rollouts["button-press-topdown-v3"]
    episodes = [expert[0], random[0], expert[1]]
    done, _ = evaluate_programs(ps.programs, episodes)
    offline = [progress_from_done(d) / len(ps) for d in done]
    t_len, switch = len(episodes[0].states), len(episodes[0].states) // 3
    with CodeReward(ps, num_envs=2, limits=FAST) as reward:
        assert reward.batch(episodes[2].frames[:0], episodes[2].states[:0], env_ids=[]).shape == (0,)
        env0, env1_first, env1_second = [], [], []
        for t in range(t_len):
            if t < switch:
                second = (episodes[1], t)
            else:
                if t == switch:  # env 1's episode ends: reset it and score its reset observation
                    reward.reset([1])
                    env1_second.append(reward.batch(episodes[2].frames[:1], episodes[2].states[:1],
                                                    env_ids=[1])[0])
                second = (episodes[2], t - switch + 1)
            frames = np.stack([episodes[0].frames[t], second[0].frames[second[1]]])
            states = np.stack([episodes[0].states[t], second[0].states[second[1]]])
            r = reward.batch(frames, states)
            env0.append(r[0])
            (env1_first if t < switch else env1_second).append(r[1])
        with pytest.raises(ValueError, match="distinct environment indices"):
            reward.batch(frames, states, env_ids=[1, 1])
        with pytest.raises(ValueError, match="distinct environment indices"):
            reward.batch(frames[:1], states[:1], env_ids=[2])
        with pytest.raises(ValueError, match="expected 1 environments' states, got 2"):
            reward.batch(frames, states, env_ids=[0])
    np.testing.assert_allclose(env0, offline[0])
    np.testing.assert_allclose(env1_first, offline[1][:switch])
    np.testing.assert_allclose(env1_second, offline[2][: len(env1_second)])
    assert env0[-1] == 1.0 and env1_second[-1] == 1.0  # the expert finishes on both envs


def test_dense_reward_single_env_adds_task_reward_and_resets(rollouts) -> None:
    ps = reference_program_set("reach-v3")
    ep = rollouts["reach-v3"][0][0]
    with CodeReward(ps, limits=FAST) as reward:
        values = [
            reward(ep.frames[t], ep.states[t], task_reward=0.5) for t in range(len(ep.states))
        ]
        assert values[0] == 0.5 and values[-1] == 1.5
        assert 1.0 in values  # the halfway sub-task alone
        reward.reset()
        assert reward.progress.tolist() == [0]
        assert reward(ep.frames[0], ep.states[0]) == 0.0
    with (
        CodeReward(ps, num_envs=2, limits=FAST) as reward,
        pytest.raises(ValueError, match="batch"),
    ):
        reward(ep.frames[0], ep.states[0])


def test_dense_reward_disables_a_failing_program_without_raising(rollouts, caplog) -> None:
    ps = ProgramSet(
        "t",
        ["ok", "crashes"],
        [
            "def done(frame, state):\n    return True\n",
            "def done(frame, state):\n    return 1 / 0\n",
        ],
    )
    ep = rollouts["reach-v3"][0][0]
    with CodeReward(ps, limits=FAST) as reward:
        values = [reward(ep.frames[t], ep.states[t]) for t in range(5)]
    assert values == [0.5] * 5
    assert "ZeroDivisionError" in reward.disabled[1] and reward.disabled[0] is None
    assert "disabling sub-task 1" in caplog.text


# ------------------------------------------------------------------------------------------------
# Generation client
# ------------------------------------------------------------------------------------------------


def test_encode_png_decodes_exactly() -> None:
    from PIL import Image

    frame = np.random.default_rng(5).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(frame))))
    np.testing.assert_array_equal(decoded, frame)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(frame.astype(np.float32))


def test_parse_program_set_formats() -> None:
    body = {"subtasks": [{"description": "a", "program": "def done(f, s):\n    return True\n"}]}
    fenced = "Here you go:\n```json\n" + json.dumps(body) + "\n```\nGood luck."
    assert parse_program_set(fenced, "t").programs[0].startswith("def done")
    assert parse_program_set(json.dumps(body), "t").subtasks == ("a",)
    with pytest.raises(ValueError, match="no JSON"):
        parse_program_set("I cannot help with that.", "t")
    with pytest.raises(ValueError, match="subtasks"):
        parse_program_set('{"programs": []}', "t")


def test_client_calls_nothing_unless_configured(monkeypatch) -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="no VLM endpoint configured"):
        generate_program_set("t", "d", frame, frame, lambda ps: None, VLMConfig())
    monkeypatch.delenv("FURL_TEST_NO_SUCH_KEY", raising=False)
    cfg = VLMConfig(
        base_url="http://127.0.0.1:9/v1", model="m", api_key_env="FURL_TEST_NO_SUCH_KEY"
    )
    with pytest.raises(ValueError, match="FURL_TEST_NO_SUCH_KEY"):
        generate_program_set("t", "d", frame, frame, lambda ps: None, cfg)


def _as_reply(ps: ProgramSet) -> str:
    return "```json\n" + json.dumps(ps.to_dict()) + "\n```"


def test_generation_feeds_verification_failures_back(rollouts, monkeypatch) -> None:
    expert, random = rollouts["reach-v3"]
    good = reference_program_set("reach-v3")
    bad = ProgramSet("reach-v3", ["anything"], ["def done(frame, state):\n    return True\n"])
    monkeypatch.setenv("FURL_TEST_VLM_KEY", "sk-test-123")
    first = np.random.default_rng(6).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    last = np.random.default_rng(7).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    cfg = VLMConfig(
        base_url="", model="fake-vlm", api_key_env="FURL_TEST_VLM_KEY", timeout_s=30, max_rounds=3
    )
    with FakeVLM(["Sure!\n" + _as_reply(bad), _as_reply(good)]) as server:
        cfg = VLMConfig(**{**cfg.__dict__, "base_url": server.url})
        result = generate_program_set(
            "reach-v3",
            "reach the red goal",
            first,
            last,
            lambda ps: verify(ps, expert, random),
            cfg,
        )
    assert result.accepted and result.rounds == 2
    assert result.program_set == good
    assert [r.accepted for r in result.reports] == [False, True]
    assert len(server.requests) == 2
    req = server.requests[0]
    assert req["model"] == "fake-vlm"
    assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == "Bearer sk-test-123"
    images = [
        p["image_url"]["url"] for p in req["messages"][1]["content"] if p["type"] == "image_url"
    ]
    assert len(images) == 2 and all(u.startswith("data:image/png;base64,") for u in images)
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[1].split(",", 1)[1]))))
    np.testing.assert_array_equal(got, last)
    # The second request carries the first reply and the verification report.
    feedback = server.requests[1]["messages"]
    assert feedback[-2]["role"] == "assistant" and "anything" in feedback[-2]["content"]
    assert feedback[-1]["role"] == "user" and "REJECTED" in feedback[-1]["content"]
    assert "random rollouts" in feedback[-1]["content"]


def test_generation_is_bounded_and_reports_http_errors(rollouts, monkeypatch) -> None:
    monkeypatch.setenv("FURL_TEST_VLM_KEY", "none")
    expert, random = rollouts["reach-v3"]
    frame = np.zeros((4, 4, 3), np.uint8)
    bad = ProgramSet("reach-v3", ["anything"], ["def done(frame, state):\n    return True\n"])
    with FakeVLM(["no json here", _as_reply(bad), _as_reply(bad), _as_reply(bad)]) as server:
        cfg = VLMConfig(base_url=server.url, model="m", api_key_env="FURL_TEST_VLM_KEY",
                        timeout_s=30, max_rounds=3)
        result = generate_program_set(
            "reach-v3", "d", frame, frame, lambda ps: verify(ps, expert, random), cfg
        )
    assert not result.accepted and result.rounds == 3 and len(server.requests) == 3
    assert "cannot parse" in server.requests[1]["messages"][-1]["content"]
    assert len(result.reports) == 2
    with FakeVLM([503]) as server:
        cfg = VLMConfig(base_url=server.url, model="m", api_key_env="FURL_TEST_VLM_KEY",
                        timeout_s=30, max_retries=0)
        with pytest.raises(GenerationError, match="HTTP 503") as info:
            generate_program_set("reach-v3", "d", frame, frame, lambda ps: None, cfg)
    # The transcript so far survives the failure, for the user to audit.
    assert info.value.result.transcript[0]["error"].startswith("HTTP 503")


def test_worker_environment_is_minimal(monkeypatch) -> None:
    # The worker gets a fresh minimal environment: no keys or proxy settings from the caller.
    monkeypatch.setenv("FURL_SECRET_FOR_TEST", "x")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    body = "    return 'FURL_SECRET_FOR_TEST' not in g['environ'] and 'HTTPS_PROXY' not in g['environ']\n"
    r = _run(ESCAPE + body, static_check=False)
    assert r.ok, r.error
    assert r.done.all()


def test_frame_only_programs_get_the_frame_and_never_the_state() -> None:
    # inputs "frame": programs define done(frame), as in VLM-CaR; an adapter appended to each source
    # calls them with the frame alone, so the state (privileged simulator information) cannot leak in.
    frames, states = _episode(12, seed=3)
    ps = ProgramSet("t", ["bright pixel", "wants state"], [
        "def done(frame):\n    return bool(frame[0, 0, 0] > 127)\n",
        "def done(frame, state):\n    return True\n",
    ], inputs="frame")
    ep = Rollout(states, frames, np.zeros(11, bool))
    done, errors = evaluate_programs(ps.worker_programs, [ep], FAST)
    np.testing.assert_array_equal(done[0][:, 0], frames[:, 0, 0, 0] > 127)
    assert errors[0] == [None]
    assert errors[1][0] is not None and "TypeError" in errors[1][0][1]
    # The file keeps what the VLM wrote; the adapter is added only to run it.
    assert ProgramSet.from_dict(ps.to_dict()) == ps and "frame_only_done" not in ps.programs[0]
    with pytest.raises(ValueError, match="inputs"):
        ProgramSet.from_dict({**ps.to_dict(), "inputs": "pixels"})


def test_program_set_files_are_checked_before_they_are_parsed(tmp_path) -> None:
    from furl_fast.rewards.code import load_program_set

    big = tmp_path / "big.json"
    big.write_text('{"subtasks": []}' + " " * 2**20)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # past json's recursion limit
    text = tmp_path / "text.json"
    text.write_text('{"subtasks": [{"description": "[[[[[[[[[[{{{{", "program": "x"}]}')
    with pytest.raises(ValueError, match=r"big\.json.*more than the 1048576"):
        load_program_set("t", str(big), None)
    with pytest.raises(ValueError, match=r"deep\.json.*nests deeper"):
        load_program_set("t", str(deep), None)
    assert load_program_set("t", str(text), None).programs == ("x",)  # brackets in strings count not
    with pytest.raises(ValueError, match="cannot parse"):
        parse_program_set("```json\n" + "[" * 100_000 + "\n```", "t")
