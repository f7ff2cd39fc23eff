"""Throughput of the code-reward sandbox: checker-program calls per second.

Rows, for a state-only and a frame-reading program (128x128 frames): `in_process` (the program
called directly, no sandbox: the floor), `batched` (Sandbox.run on 2000 items in one call: arrays
sent once per batch, as the verifier uses it), `per_item` (one Sandbox call per item: the baseline a
one-message-per-frame design would give); the dense reward stepping 8 vector envs
(CodeReward.batch, 2 sub-tasks = 2 workers, one call per env step); and the cost of the OS-level
isolation: one 500-step episode scored step by step as the trainer does (CodeReward.batch, one
env), and a worker's start, each with isolation "required" (namespaces, Landlock, seccomp) against
"none" (the Python-level barriers alone), in the same run.

Run: PYTHONPATH=src python -m pytest benchmarks/bench_code_reward.py --benchmark-only \
     -p no:cacheprovider -o python_files='bench_*.py'
"""

from __future__ import annotations

import numpy as np
import pytest

from furl_fast.rewards.code import CodeReward, Sandbox, SandboxLimits, reference_program_set

N = 2000
SIZE = 128  # (N, 128, 128, 3) uint8 = 98 MB of frames per batch
PROGRAMS = {
    # Stateful, reads only the state: the sandbox sends (N, 1, 1, 3) dummy frames.
    "state": reference_program_set("drawer-open-v3").programs[1],
    # Reads the frame: every frame crosses the process boundary.
    "frame": "def done(frame, state):\n    return bool(frame[::8, ::8, 0].mean() > 127)\n",
}
LIMITS = SandboxLimits(memory_limit_mb=512, max_batch_mb=128)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    states = rng.standard_normal((N, 39)).astype(np.float32)
    return frames, states


def _report(benchmark, calls: int) -> None:
    benchmark.extra_info["calls_per_s"] = calls / benchmark.stats.stats.mean


@pytest.mark.parametrize("kind", sorted(PROGRAMS))
def test_in_process(benchmark, data, kind: str) -> None:
    frames, states = data

    def run() -> np.ndarray:
        namespace: dict = {}
        exec(compile(PROGRAMS[kind], "<checker>", "exec"), namespace)  # noqa: S102 - the floor
        return np.array([namespace["done"](f, s) for f, s in zip(frames, states)])

    benchmark.pedantic(run, rounds=3, iterations=1)
    _report(benchmark, N)


@pytest.mark.parametrize("kind", sorted(PROGRAMS))
def test_batched(benchmark, data, kind: str) -> None:
    frames, states = data
    with Sandbox(PROGRAMS[kind], LIMITS) as box:
        box.run_episode(frames[:1], states[:1])  # start the worker outside the timing
        result = benchmark.pedantic(lambda: box.run_episode(frames, states), rounds=3, iterations=1)
    assert result.ok
    _report(benchmark, N)


@pytest.mark.parametrize("kind", sorted(PROGRAMS))
def test_per_item(benchmark, data, kind: str) -> None:
    frames, states = data
    n = 200  # enough for a stable rate; the full N would only take longer
    resets = np.ones(1, bool)
    with Sandbox(PROGRAMS[kind], LIMITS) as box:
        box.run_episode(frames[:1], states[:1])

        def run() -> None:
            for i in range(n):
                box.run(frames[i : i + 1], states[i : i + 1], resets=resets if i == 0 else None)

        benchmark.pedantic(run, rounds=3, iterations=1)
    _report(benchmark, n)


def test_dense_reward_8_envs(benchmark, data) -> None:
    frames, states = data
    envs, steps = 8, 100
    with CodeReward(
        reference_program_set("drawer-open-v3"), num_envs=envs, limits=LIMITS
    ) as reward:
        reward.batch(frames[:envs], states[:envs])

        def run() -> None:
            reward.reset()
            for t in range(steps):
                reward.batch(frames[t : t + envs], states[t : t + envs])

        benchmark.pedantic(run, rounds=3, iterations=1)
    _report(benchmark, envs * steps)


ISOLATIONS = ("none", "required")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_episode_scoring(benchmark, data, isolation: str) -> None:
    frames, states = data
    steps = 500  # one Meta-World episode
    limits = SandboxLimits(memory_limit_mb=512, isolation=isolation)
    with CodeReward(reference_program_set("drawer-open-v3"), num_envs=1, limits=limits) as reward:
        reward.batch(frames[:1], states[:1])

        def run() -> None:
            reward.reset()
            for t in range(steps):
                reward.batch(frames[t : t + 1], states[t : t + 1])

        benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["impl"] = isolation
    benchmark.extra_info["episodes"] = 1


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_worker_start(benchmark, data, isolation: str) -> None:
    frames, states = data
    limits = SandboxLimits(memory_limit_mb=512, isolation=isolation)

    def run() -> None:
        with Sandbox(PROGRAMS["state"], limits) as box:
            assert box.run_episode(frames[:1], states[:1]).ok

    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["impl"] = isolation
    benchmark.extra_info["starts"] = 1
