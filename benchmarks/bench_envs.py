"""Meta-World env throughput with a VLM frame (256x256 corner2) rendered on every step.

Rows: physics only (no render) as the baseline, one in-process env, and 1 / 4 / 8 worker processes
(make_vector_env), each with fast rendering (no shadows, no MSAA) and Meta-World's faithful visuals.
steps/s counts environment steps summed over all envs. Step counts are small and fixed so the whole
file stays within a few minutes on a 2-core machine (faithful software rendering is slow).

  PYTHONPATH=src flock /tmp/furl_bench.lock python -m pytest benchmarks/bench_envs.py \
      --benchmark-only -p no:cacheprovider -o python_files='bench_*.py' -s
Rates use the fastest round (min time): the dev machine is shared, and the minimum is the
estimate least disturbed by other processes.
"""

from __future__ import annotations

import numpy as np
import pytest

from furl_fast.envs import make_env, make_vector_env

TASK = "drawer-open"
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    base = RESULTS.get("physics only, 1 env")
    print(f"\n{'configuration':<34}{'env steps/s':>12}{'vs physics only':>17}")
    for name, rate in RESULTS.items():
        print(f"{name:<34}{rate:>12.1f}{rate / base if base else float('nan'):>16.3f}x")


def _record(benchmark, name: str, env_steps: int) -> None:
    rate = env_steps / benchmark.stats.stats.min
    RESULTS[name] = rate
    benchmark.extra_info["env_steps_per_s"] = rate


@pytest.mark.parametrize("render", ["none", "fast", "faithful"])
def test_single_env(benchmark, render):
    steps = {"none": 500, "fast": 40, "faithful": 8}[render]
    env = make_env(TASK, seed=0, vlm_frames=render != "none", fast_render=render == "fast")
    env.reset()
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, 4)).astype(np.float32)

    def run():
        env.reset()
        for a in actions:
            env.step(a)

    run()  # warm-up: GL context, shader compilation
    benchmark.pedantic(run, rounds=2, iterations=1)
    env.close()
    _record(benchmark, "physics only, 1 env" if render == "none" else f"{render}, 1 env in-process",
            steps)


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
    _record(benchmark, f"{render}, {num_envs} worker(s)", steps * num_envs)
