"""Env throughput with a VLM frame rendered on every step: Meta-World (256x256 corner2) and two
envs of the gymnasium suite (CartPole-v1's 600x400 pygame frame, Humanoid-v5's 256x256 MuJoCo frame).

Rows: physics only (no render) as each env's baseline, one in-process env, and for Meta-World 1 / 4 / 8
worker processes (make_vector_env), each with fast rendering (no shadows, no MSAA) and the faithful
visuals. steps/s counts environment steps summed over all envs. Step counts are small and fixed so the
whole file stays within a few minutes on a 2-core machine (faithful software rendering is slow).

  PYTHONPATH=src flock /tmp/furl_bench.lock python -m pytest benchmarks/bench_envs.py \
      --benchmark-only -p no:cacheprovider -o python_files='bench_*.py' -s
Rates use the fastest round (min time): the dev machine is shared, and the minimum is the
estimate least disturbed by other processes.
"""

from __future__ import annotations

import numpy as np
import pytest

from furl_fast.envs import get_suite
from furl_fast.envs.metaworld import make_env, make_vector_env

TASK = "drawer-open"
RESULTS: dict[str, tuple[float, str]] = {}  # row -> (env steps/s, the row it is compared with)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\n{'configuration':<40}{'env steps/s':>12}{'vs physics only':>17}")
    for name, (rate, baseline) in RESULTS.items():
        base = RESULTS.get(baseline, (float("nan"),))[0]
        print(f"{name:<40}{rate:>12.1f}{rate / base:>16.3f}x")


def _record(benchmark, name: str, env_steps: int, baseline: str) -> None:
    rate = env_steps / benchmark.stats.stats.min
    RESULTS[name] = (rate, baseline)
    benchmark.extra_info["env_steps_per_s"] = rate


def _run_episode(benchmark, env, actions) -> None:
    def run():
        env.reset()
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:  # CartPole's pole fell
                env.reset()

    run()  # warm-up: GL context, shader compilation
    benchmark.pedantic(run, rounds=2, iterations=1)
    env.close()


@pytest.mark.parametrize("render", ["none", "fast", "faithful"])
def test_single_env(benchmark, render):
    steps = {"none": 500, "fast": 40, "faithful": 8}[render]
    env = make_env(TASK, seed=0, vlm_frames=render != "none", fast_render=render == "fast")
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, 4)).astype(np.float32)
    _run_episode(benchmark, env, actions)
    baseline = "physics only, 1 env"
    _record(benchmark, baseline if render == "none" else f"{render}, 1 env in-process", steps, baseline)


@pytest.mark.parametrize("num_envs", [1, 4, 8])
@pytest.mark.parametrize("render", ["fast", "faithful"])
def test_vector_env(benchmark, render, num_envs):
    steps = {"fast": 20, "faithful": 4}[render]
    envs = make_vector_env(TASK, num_envs, seed=0, fast_render=render == "fast")
    envs.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, num_envs, 4)).astype(np.float32)

    def run():
        for a in actions:
            obs, *_ = envs.step(a)
        assert obs["frame"].shape == (num_envs, 256, 256, 3)

    run()  # warm-up
    benchmark.pedantic(run, rounds=2, iterations=1)
    envs.close()
    _record(benchmark, f"{render}, {num_envs} worker(s)", steps * num_envs, "physics only, 1 env")


@pytest.mark.parametrize("task,render,steps", [
    ("CartPole-v1", "none", 400), ("CartPole-v1", "frames", 100),
    ("Humanoid-v5", "none", 200), ("Humanoid-v5", "fast", 20),
])
def test_gymnasium_env(benchmark, task, render, steps):
    env = get_suite("gymnasium").make_env(task, seed=0, vlm_frames=render != "none", reward="dense")
    if task == "CartPole-v1":
        actions = np.arange(steps) % 2
    else:
        actions = np.random.default_rng(0).uniform(-0.4, 0.4, size=(steps, 17)).astype(np.float32)
    _run_episode(benchmark, env, actions)
    baseline = f"{task} physics only"
    _record(benchmark, baseline if render == "none" else f"{task} {render}, 1 env", steps, baseline)
