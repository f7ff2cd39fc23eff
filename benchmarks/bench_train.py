"""End-to-end training throughput of `furl` (state SAC): environment steps per second while learning.

- furl_fast: the Trainer as `python -m furl_fast.train` runs it: NUM_ENVS worker processes, their
  frames encoded in one batch per vector step while the learner updates (overlap_encode), one update
  per environment step, the C++ replay buffer, the fused reward op.
- release_loop: FuRL's release loop structure rebuilt from the same parts: one environment, each frame
  encoded at batch 1 right after its step, then one eager update (the heads' reward through the
  eager torch chain), a numpy replay buffer (SB3-style arrays, uniform indices, torch.as_tensor per
  batch).
Both: same machine, same run, same encoder, same SAC / relay / heads updates (the relay agent trains
too, as it does early in every FuRL run), same render. Warm-up steps (random actions, no updates) run
first and are not timed; evaluation and checkpoints are left out of both.

Environment knobs: FURL_BENCH_MODEL (default ViT-S-32 on CPU, RN50 on CUDA; random weights: speed does
not depend on them), FURL_BENCH_DEVICE (auto), FURL_BENCH_STEPS (timed steps, 400),
FURL_BENCH_NUM_ENVS (the machine's cores, at most 16), FURL_BENCH_THREADS (torch threads; unset keeps
torch's default), FURL_BENCH_COMPILE=1 (furl_fast's SAC updates with --sac.compile: CUDA graphs on a
GPU; the release loop stays eager).

MUJOCO_GL=egl python -m pytest benchmarks/bench_train.py --benchmark-only -o python_files='bench_*.py'
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from furl_fast.config import Config, resolve_device

DEVICE = resolve_device(os.environ.get("FURL_BENCH_DEVICE", "auto"))
MODEL = os.environ.get("FURL_BENCH_MODEL", "RN50" if DEVICE.type == "cuda" else "ViT-S-32")
TIMED_STEPS = int(os.environ.get("FURL_BENCH_STEPS", "400"))
NUM_ENVS = int(os.environ.get("FURL_BENCH_NUM_ENVS", min(16, os.cpu_count() or 1)))
THREADS = os.environ.get("FURL_BENCH_THREADS")
COMPILE = os.environ.get("FURL_BENCH_COMPILE") == "1"
WARMUP = 512  # > batch 256 + a vector step, so the first timed step can update


def config(num_envs: int, run_dir: Path) -> Config:
    cfg = Config(algo="furl", task="reach-v3", seed=0, num_envs=num_envs, warmup_steps=WARMUP,
                 total_steps=WARMUP + TIMED_STEPS, buffer_size=20_000, eval_every=10**9,
                 checkpoint_every=10**9, log_every=10**9, device=str(DEVICE), run_dir=str(run_dir),
                 torch_threads=int(THREADS) if THREADS else None)
    return dataclasses.replace(cfg, vlm=dataclasses.replace(cfg.vlm, model=MODEL, pretrained="none"))


@pytest.fixture(scope="module")
def encoder():
    from furl_fast.vlm import load_encoder

    if THREADS:
        torch.set_num_threads(int(THREADS))
    return load_encoder(MODEL, "none", device=DEVICE)


class NumpyReplay:
    """The release's style of buffer: one numpy array per field (obs and next_obs both stored)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, emb_dim: int):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.discount = np.zeros(capacity, np.float32)
        self.next_emb = np.zeros((capacity, emb_dim), np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.rng = np.random.default_rng(0)

    def add(self, obs, action, reward, next_obs, terminated, next_emb, gamma=0.99):
        i = self.pos
        self.obs[i], self.action[i], self.reward[i], self.next_obs[i] = obs, action, reward, next_obs
        self.discount[i], self.next_emb[i] = gamma * (1.0 - terminated), next_emb
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, self.size, n)
        return {k: torch.as_tensor(getattr(self, k)[idx], device=DEVICE)
                for k in ("obs", "action", "reward", "discount", "next_obs", "next_emb")}


def run_release_loop(cfg: Config, encoder) -> float:
    """The release's loop structure; returns the seconds of the TIMED_STEPS learning steps."""
    from furl_fast.agents.relay import RelaySchedule
    from furl_fast.agents.sac import SAC
    from furl_fast.envs import make_env
    from furl_fast.rewards.furl import FuRLReward
    from furl_fast.envs.metaworld import task_prompt

    env = make_env(cfg.task, seed=cfg.seed, vlm_frames=True)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent, relay = SAC(obs_dim, act_dim, cfg.sac, DEVICE), SAC(obs_dim, act_dim, cfg.sac, DEVICE)
    schedule = RelaySchedule.from_config(cfg.furl, num_envs=1, seed=cfg.seed)
    furl = FuRLReward(encoder.embed_dim, encoder.encode_text([task_prompt(cfg.task)])[0].float(),
                      cfg.furl, DEVICE, seed=cfg.seed)
    buffer = NumpyReplay(cfg.resolved_buffer_size, obs_dim, act_dim, encoder.embed_dim)

    def encode(frame: np.ndarray) -> torch.Tensor:  # batch 1, every step
        return encoder.encode_frames(frame[None])[0].float().to(DEVICE)

    obs, info = env.reset(seed=cfg.seed)
    furl.set_goal(encode(info["vlm_frame"]))  # any frame: speed does not depend on it
    schedule.begin_episode()
    ep_embs, ep_success = [], []
    for step in range(cfg.total_steps):
        if step == cfg.warmup_steps:
            start = time.perf_counter()
        if step < cfg.warmup_steps:
            action = env.action_space.sample()
        else:
            x = torch.as_tensor(obs, device=DEVICE)[None]
            relay_action = relay.act(x).cpu().numpy() if schedule.relay_mask().any() else None
            action = schedule.choose_actions(agent.act(x).cpu().numpy(), relay_action)[0]
        next_obs, reward, terminated, truncated, info = env.step(action)
        emb = encode(info["vlm_frame"])
        buffer.add(obs, action, reward, next_obs, terminated, emb.cpu().numpy())
        ep_embs.append(emb)
        ep_success.append(info["success"])
        schedule.step()
        obs = next_obs
        if terminated or truncated:
            furl.add_episode(torch.stack(ep_embs), np.asarray(ep_success))
            schedule.observe_positives(furl.buffer.positives_added)
            obs, info = env.reset()
            ep_embs, ep_success = [], []
            schedule.begin_episode()
        if step >= cfg.warmup_steps:
            batch = buffer.sample(cfg.batch_size)
            vlm = furl.reward(batch["next_emb"])  # the eager chain
            agent.update(dict(batch, reward=batch["reward"] + cfg.rho * vlm))
            if schedule.enabled:
                relay.update(batch)
            furl.update(batch["next_emb"])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed


def run_trainer(cfg: Config, encoder, run_dir: Path) -> float:
    """The project's Trainer; returns the seconds of the TIMED_STEPS learning steps."""
    from furl_fast.train import Trainer

    trainer = Trainer(cfg, run_dir, encoder)
    trainer.evaluate = lambda: {}  # left out of both loops
    trainer.save_checkpoint = lambda: None
    try:
        trainer.cfg = dataclasses.replace(cfg, total_steps=cfg.warmup_steps)
        trainer.run([])  # warm-up: random actions, no updates
        if cfg.sac.compile:  # compile (and on CUDA record the graphs) before the clock starts
            for _ in range(3):
                trainer.update(log=False)
        trainer.cfg = cfg
        start = time.perf_counter()
        trainer.run([])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        trainer.close()


@pytest.mark.parametrize("impl", ["furl_fast", "release_loop"])
def test_train_throughput(benchmark, encoder, tmp_path, impl):
    num_envs = NUM_ENVS if impl == "furl_fast" else 1
    cfg = config(num_envs, tmp_path / "run")
    if impl == "furl_fast":
        cfg = dataclasses.replace(cfg, sac=dataclasses.replace(cfg.sac, compile=COMPILE))
    seconds: list[float] = []

    def once():
        fn = run_trainer if impl == "furl_fast" else run_release_loop
        args = (cfg, encoder, tmp_path / f"run{len(seconds)}") if impl == "furl_fast" else (cfg, encoder)
        seconds.append(fn(*args))

    benchmark.group = f"furl state-SAC training, {MODEL} on {DEVICE.type}"
    benchmark.pedantic(once, rounds=1, iterations=1)
    # Steps/s of the timed learning phase only (the pedantic time also holds set-up and warm-up).
    benchmark.extra_info.update(impl=impl, num_envs=num_envs, model=MODEL, device=str(DEVICE),
                                sac_compile=cfg.sac.compile,
                                steps=TIMED_STEPS, learning_seconds=seconds[0],
                                env_steps_per_second=TIMED_STEPS / seconds[0],
                                torch_threads=torch.get_num_threads())
    print(f"\n{impl}: {TIMED_STEPS / seconds[0]:.1f} env steps/s while learning "
          f"(num_envs={num_envs}, {MODEL}, {DEVICE})")
