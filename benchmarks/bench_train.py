"""End-to-end training throughput of `furl` (state SAC): environment steps per second while learning.

- furl_fast: the Trainer as `python -m furl_fast.train` runs it: NUM_ENVS worker processes, their
  frames encoded in one batch per vector step while the learner updates (overlap_encode), one update
  per environment step, the C++ replay buffer, the fused reward op.
- furl_fast_serial: the same Trainer with one environment in-process and no encode thread
  (--num-envs 1 --no-overlap-encode): all work on one thread, what a CPU saturated by other jobs
  favours.
- release_loop: FuRL's release loop structure rebuilt from the same parts: one environment, each frame
  encoded at batch 1 right after its step, then one eager update (the heads' reward through the
  eager torch chain), a numpy replay buffer (SB3-style arrays, uniform indices, torch.as_tensor per
  batch).
Both: same machine, same run, same encoder, same SAC / relay / heads updates (the relay agent trains
too, as it does early in every FuRL run: furl_fast as one SACEnsemble update, the release loop as two
SAC updates), same render. Warm-up steps (random actions, no updates) run first and are not timed;
evaluation and checkpoints are left out of both. Each prints its seconds per phase (act, env, encode,
buffer, update, heads; furl_fast's encode runs in a thread beside the learner, encode_wait is what
the learner waited for it; on CUDA the phases are host time, no sync).

test_compute_bound: the GEMM FLOPs of one learning step's work (both agents' SAC updates forward and
backward, the VLM reward of the batch, the head update, one frame's encoding), recorded from the real
code, and the time torch.matmul takes for them at the same shapes here (one thread): the compute
bound of a step.

Environment knobs: FURL_BENCH_MODEL (default ViT-S-32 on CPU, RN50 on CUDA; random weights: speed does
not depend on them), FURL_BENCH_DEVICE (auto), FURL_BENCH_STEPS (timed steps, 400),
FURL_BENCH_NUM_ENVS (the machine's cores, at most 16), FURL_BENCH_THREADS (torch threads; unset keeps
torch's default), FURL_BENCH_COMPILE=1 (furl_fast's SAC updates with --sac.compile: CUDA graphs on a
GPU; the release loop stays eager).

MUJOCO_GL=egl python -m pytest benchmarks/bench_train.py --benchmark-only -o python_files='bench_*.py'
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from furl_fast.config import Config, resolve_device

aten = torch.ops.aten

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


class Phases(dict):
    """Seconds per phase: `with phases("env"): ...` adds the block's wall time to phases["env"]."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def run_release_loop(cfg: Config, encoder) -> tuple[float, dict[str, float]]:
    """The release's loop structure; returns the seconds of the TIMED_STEPS learning steps and their
    seconds per phase."""
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
    phases = Phases()
    for step in range(cfg.total_steps):
        if step == cfg.warmup_steps:
            start = time.perf_counter()
            phases.clear()
        if step < cfg.warmup_steps:
            action = env.action_space.sample()
        else:
            with phases("act"):
                x = torch.as_tensor(obs, device=DEVICE)[None]
                relay_action = relay.act(x).cpu().numpy() if schedule.relay_mask().any() else None
                action = schedule.choose_actions(agent.act(x).cpu().numpy(), relay_action)[0]
        with phases("env"):
            next_obs, reward, terminated, truncated, info = env.step(action)
        with phases("encode"):
            emb = encode(info["vlm_frame"])
        with phases("buffer"):
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
            with phases("buffer"):
                batch = buffer.sample(cfg.batch_size)
            with phases("update"):
                vlm = furl.reward(batch["next_emb"])  # the eager chain
                agent.update(dict(batch, reward=batch["reward"] + cfg.resolved_rho * vlm))
                if schedule.enabled:
                    relay.update(batch)
            with phases("heads"):
                furl.update(batch["next_emb"])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed, dict(phases)


def run_trainer(cfg: Config, encoder, run_dir: Path) -> tuple[float, dict[str, float]]:
    """The project's Trainer; returns the seconds of the TIMED_STEPS learning steps and their seconds
    per phase (Trainer.timings)."""
    from furl_fast.trainer import Trainer

    trainer = Trainer(cfg, run_dir, encoder)
    trainer.evaluate = lambda writer=None: {}  # left out of both loops
    trainer.save_checkpoint = lambda: None
    try:
        trainer.cfg = dataclasses.replace(cfg, total_steps=cfg.warmup_steps)
        trainer.run([])  # warm-up: random actions, no updates
        if cfg.sac.compile:  # compile (and on CUDA record the graphs) before the clock starts
            for _ in range(3):
                trainer.update(log=False)
        trainer.cfg = cfg
        trainer.timings.clear()
        start = time.perf_counter()
        trainer.run([])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, dict(trainer.timings)
    finally:
        trainer.close()


# The calls whose time is the compute bound: every matmul, and the convolution of the ViT's patch
# embedding (one GEMM after im2col). Elementwise work, the fused reward op and the render are left out.
GEMM_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution}


def gemm_shape(op, args: tuple, out: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, M, K, N) of the GEMM a GEMM_OPS call computes."""
    if op is aten.convolution:  # im2col: one row per output pixel, one column per output channel
        weight = args[1]
        return 1, out.numel() // out.shape[1], weight[0].numel(), weight.shape[0]
    a, b = (args[0], args[1]) if op in (aten.mm, aten.bmm) else (args[1], args[2])
    if a.dim() == 2:
        return 1, a.shape[0], a.shape[1], b.shape[1]
    if b.stride(0) == 0:  # one weight for every batch entry (a linear layer on 3-d input): one GEMM
        return 1, a.shape[0] * a.shape[1], a.shape[2], b.shape[2]
    return a.shape[0], a.shape[1], a.shape[2], b.shape[2]


class GemmRecorder(TorchDispatchMode):
    """Records the GEMM shape (gemm_shape) of every GEMM_OPS call of the code run under it, backward
    included. Composite ops (linear, matmul, conv2d: inference mode hands them over whole) are
    decomposed so that their GEMMs are seen, and attention runs as plain matmuls (no fused
    MultiheadAttention or SDPA kernel)."""

    def __init__(self):
        super().__init__()
        self.gemms: list[tuple[int, int, int, int]] = []

    def __enter__(self):
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self._sdpa = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
        self._sdpa.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._sdpa.__exit__(*exc)
        torch.backends.mha.set_fastpath_enabled(self._fastpath)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in GEMM_OPS:
            out = func(*args, **kwargs)
            self.gemms.append(gemm_shape(func.overloadpacket, args, out))
            return out
        with self:  # the decomposition's ops come back here
            out = func.decompose(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


def gemm_seconds(shape: tuple[int, int, int, int], rounds: int = 5) -> float:
    """Seconds of torch.matmul at (batch, M, K, N) on contiguous float32 operands: the fastest
    round's mean (the machine is shared: the best round is the bound)."""
    b, m, k, n = shape
    x, w = torch.randn(b, m, k, device=DEVICE).squeeze(0), torch.randn(b, k, n, device=DEVICE).squeeze(0)
    reps = max(1, int(2e7 / (2 * b * m * k * n)))  # about 0.2 ms a round at 100 GFLOP/s
    torch.matmul(x, w)
    best = float("inf")
    for _ in range(rounds):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(x, w)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def test_compute_bound(benchmark, encoder):
    """One learning step's GEMM FLOPs and the time torch.matmul takes for them at the same shapes (one
    thread): both SAC updates (one SACEnsemble update, forward and backward), the VLM reward of the
    batch (its eager chain: the fused op does the same FLOPs), one head update (phase A, as early in
    a run) and one frame's share of encoding NUM_ENVS frames."""
    from furl_fast.agents.ensemble import SACEnsemble
    from furl_fast.agents.sac import SAC
    from furl_fast.rewards.furl import FuRLReward

    cfg = config(NUM_ENVS, Path("unused"))
    torch.manual_seed(0)
    obs_dim, act_dim, b = 39, 4, cfg.batch_size
    ensemble = SACEnsemble([SAC(obs_dim, act_dim, cfg.sac, DEVICE),
                            SAC(obs_dim, act_dim, cfg.sac, DEVICE, metric_prefix="relay_")])
    batch = {"obs": torch.randn(b, obs_dim), "action": torch.rand(b, act_dim) * 2 - 1,
             "discount": torch.full((b,), 0.99), "next_obs": torch.randn(b, obs_dim)}
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    rewards = -torch.rand(2, b, device=DEVICE)
    d = encoder.embed_dim
    furl = FuRLReward(d, torch.randn(d), cfg.furl, DEVICE, goal_emb=torch.randn(d))
    emb = torch.randn(b, d, device=DEVICE)
    frames = np.random.default_rng(0).integers(0, 256, (NUM_ENVS, 256, 256, 3), dtype=np.uint8)
    work = {  # name -> (the work, times per env step)
        "sac + relay updates": (lambda: ensemble.update(batch, rewards), 1.0),
        "vlm reward": (lambda: furl.reward(emb), 1.0),
        "heads update": (lambda: furl.update(emb), 1.0),
        "encoder": (lambda: encoder.encode_frames(frames), 1.0 / NUM_ENVS),
    }
    threads = torch.get_num_threads()
    rows = {}

    def measure():
        torch.set_num_threads(1)
        try:
            for name, (fn, per_step) in work.items():
                recorder = GemmRecorder()
                with recorder:
                    fn()
                flops = sum(2 * bb * m * k * n for bb, m, k, n in recorder.gemms)
                times = {shape: gemm_seconds(shape) for shape in set(recorder.gemms)}
                seconds = sum(times[shape] for shape in recorder.gemms)
                rows[name] = {"gflop": per_step * flops / 1e9, "ms": per_step * seconds * 1e3,
                              "gflops_per_s": flops / seconds / 1e9, "gemms": len(recorder.gemms)}
        finally:
            torch.set_num_threads(threads)

    benchmark.group = f"compute bound of a furl step, {MODEL} on {DEVICE.type}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    learner_ms = sum(rows[k]["ms"] for k in ("sac + relay updates", "vlm reward", "heads update"))
    total = {"gflop": sum(r["gflop"] for r in rows.values()), "ms": sum(r["ms"] for r in rows.values())}
    benchmark.extra_info.update(impl="compute_bound", rows=rows, total=total, learner_ms=learner_ms,
                                bound_steps_per_second=1e3 / total["ms"],
                                learner_bound_steps_per_second=1e3 / learner_ms,
                                load_average=os.getloadavg())
    print(f"\ncompute bound per env step ({MODEL}, {DEVICE}, 1 thread, torch.matmul at the GEMM shapes):")
    for name, r in rows.items():
        print(f"  {name:20s} {r['gflop']:6.3f} GFLOP {r['ms']:7.2f} ms ({r['gflops_per_s']:.0f} GFLOP/s, "
              f"{r['gemms']} GEMMs)")
    print(f"  {'total':20s} {total['gflop']:6.3f} GFLOP {total['ms']:7.2f} ms -> "
          f"{1e3 / total['ms']:.1f} steps/s on one core; the learner alone {learner_ms:.2f} ms -> "
          f"{1e3 / learner_ms:.1f} steps/s")


@pytest.mark.parametrize("impl", ["furl_fast", "furl_fast_serial", "release_loop"])
def test_train_throughput(benchmark, encoder, tmp_path, impl):
    num_envs = NUM_ENVS if impl == "furl_fast" else 1
    cfg = config(num_envs, tmp_path / "run")
    trainer = impl.startswith("furl_fast")
    if trainer:
        cfg = dataclasses.replace(cfg, sac=dataclasses.replace(cfg.sac, compile=COMPILE),
                                  overlap_encode=impl == "furl_fast")
    seconds: list[float] = []
    phases: dict[str, float] = {}

    def once():
        if trainer:
            elapsed, times = run_trainer(cfg, encoder, tmp_path / f"run{len(seconds)}")
        else:
            elapsed, times = run_release_loop(cfg, encoder)
        seconds.append(elapsed)
        phases.update(times)

    benchmark.group = f"furl state-SAC training, {MODEL} on {DEVICE.type}"
    benchmark.pedantic(once, rounds=1, iterations=1)
    # Steps/s of the timed learning phase only (the pedantic time also holds set-up and warm-up).
    benchmark.extra_info.update(impl=impl, num_envs=num_envs, model=MODEL, device=str(DEVICE),
                                sac_compile=cfg.sac.compile, overlap_encode=trainer and cfg.overlap_encode,
                                steps=TIMED_STEPS, learning_seconds=seconds[0],
                                env_steps_per_second=TIMED_STEPS / seconds[0],
                                torch_threads=torch.get_num_threads(),
                                ms_per_step={k: 1e3 * v / TIMED_STEPS for k, v in phases.items()},
                                load_average=os.getloadavg())
    print(f"\n{impl}: {TIMED_STEPS / seconds[0]:.1f} env steps/s while learning "
          f"(num_envs={num_envs}, {MODEL}, {DEVICE}); ms per env step: "
          + ", ".join(f"{k} {1e3 * v / TIMED_STEPS:.1f}" for k, v in
                      sorted(phases.items(), key=lambda kv: -kv[1])))
