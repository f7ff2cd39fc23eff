"""DrQ learner step on the CPU: replay sample + random shift + one DrQ-v2 update (critic and
encoder, actor, target), batch 256 of 3-frame 84x84 RGB stacks (the DrQ-v2 defaults).

- fused: furl_fast.ReplayBuffer.sample(augment=True) (shift fused into the gather) + update.
- drqv2_aug: the same buffer sampled without augmentation, then DrQ-v2's RandomShiftsAug (replicate
  pad + grid_sample on float frames, bench_replay.RandomShiftsAug) + the same update.
- fused_bf16: fused, with the conv stack under bf16 autocast (--drq.precision bf16; the default is
  fp32, DrQ-v2 as published).
Both in the same run; the agent's update itself is identical. DrQ-v2's paper reports ~96 frames/s
end to end on a V100 (about 48 agent steps/s at action repeat 2) for comparison of orders of magnitude.

python -m pytest benchmarks/bench_drq.py --benchmark-only -o python_files='bench_*.py'
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench_replay import RandomShiftsAug
from furl_fast import ReplayBuffer
from furl_fast.agents.drq import DrQV2
from furl_fast.config import DrQConfig

BATCH = 256
EPISODES, EPISODE_STEPS = 8, 250  # 2,000 transitions: the update's cost does not depend on the size


def _setup(device: str):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(EPISODES * (EPISODE_STEPS + 1), (3, 84, 84), 4, frame_stack=3, seed=0,
                       device=device)
    for _ in range(EPISODES):
        buf.start_episode(rng.integers(0, 256, (3, 84, 84), dtype=np.uint8))
        for t in range(EPISODE_STEPS):
            buf.add(rng.integers(0, 256, (3, 84, 84), dtype=np.uint8),
                    rng.uniform(-1, 1, 4).astype(np.float32), -1.0, False, t == EPISODE_STEPS - 1)
    agents = {p: DrQV2((9, 84, 84), 4, DrQConfig(precision=p), device=device) for p in ("fp32", "bf16")}
    return buf, agents, RandomShiftsAug(4)


@pytest.fixture(scope="module")
def setup():
    return _setup("cpu")


@pytest.fixture(scope="module")
def setup_cuda():
    return _setup("cuda")  # GPU replay mode: frames gathered and shifted on the GPU


def fused_step(buf, agent, aug):
    agent.update(buf.sample(BATCH, augment=True))


def drqv2_step(buf, agent, aug):
    batch = buf.sample(BATCH, augment=False)
    batch = batch._replace(obs=aug(batch.obs.float()), next_obs=aug(batch.next_obs.float()))
    agent.update(batch)


@pytest.mark.parametrize("impl", ["fused", "drqv2_aug", "fused_bf16"])
def test_drq_learner_step_cpu(benchmark, setup, impl):
    buf, agents, aug = setup
    fn = drqv2_step if impl == "drqv2_aug" else fused_step
    agent = agents["bf16" if impl == "fused_bf16" else "fp32"]
    benchmark.group = f"drq learner step cpu B={BATCH}"
    benchmark.extra_info.update(impl=impl, updates=1)
    benchmark.pedantic(fn, args=(buf, agent, aug), rounds=5, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fused", "drqv2_aug", "fused_bf16"])
def test_drq_learner_step_cuda(benchmark, setup_cuda, impl):
    buf, agents, aug = setup_cuda
    fn = drqv2_step if impl == "drqv2_aug" else fused_step
    agent = agents["bf16" if impl == "fused_bf16" else "fp32"]

    def step():
        fn(buf, agent, aug)
        torch.cuda.synchronize()

    benchmark.group = f"drq learner step cuda B={BATCH}"
    benchmark.extra_info.update(impl=impl, updates=1)
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
