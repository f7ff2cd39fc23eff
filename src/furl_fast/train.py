"""`python -m furl_fast.train`: FuRL and its baselines (sac, vlm, relay) on sparse-reward Meta-World.

    python -m furl_fast.train --algo furl --task drawer-open --seed 0
    python -m furl_fast.train --preset paper --algo sac --task reach
    python -m furl_fast.train --resume runs/furl-drawer-open-s0-20261121-101500

Every field of furl_fast.config.Config is a flag; --preset picks the defaults the other flags
change (laptop: CPU-friendly, the default; paper: the FuRL paper's settings). A run directory holds
config.json, metrics.csv, TensorBoard events (tb/), evaluation videos (videos/), eval.json and
checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import tyro

from furl_fast import ops
from furl_fast.config import PRESETS, Config, resolve_device

logger = logging.getLogger("furl_fast.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"


# ---- configuration ---------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict[str, Any]):
    """Rebuilds (nested) frozen dataclasses from config_to_dict's output; lists become tuples."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        field_type = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(field_type):
            value = config_from_dict(field_type, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class _Args:
    """The command line: --preset, then every Config field under its own name."""

    preset: Literal["laptop", "paper"] = "laptop"  # the keys of config.PRESETS
    """The defaults every other flag starts from: laptop (CPU-friendly, 100k steps) or paper (the FuRL
    paper's settings: 1M steps, 10k warm-up, replay 500k for furl and 1M for the baselines)."""
    track: bool = False
    """Track the run with Weights & Biases (pip install "furl_fast[track]"): config and every
    TensorBoard scalar; WANDB_MODE=offline keeps it local (wandb sync uploads it later)."""
    wandb_project_name: str = "furl_fast"
    """The W&B project of --track."""
    wandb_entity: str | None = None
    """The W&B team or user of --track; None: your default entity."""
    config: Annotated[Config, tyro.conf.arg(name="")] = Config()


def parse_config(argv: list[str] | None = None) -> Config:
    """--preset NAME chooses the defaults, tyro parses every Config field on top of them."""
    return parse_args(argv).config


def parse_args(argv: list[str] | None = None) -> _Args:
    from furl_fast._cli import tyro_cli

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="laptop")
    known, _ = pre.parse_known_args(argv)
    return tyro_cli(_Args, prog="python -m furl_fast.train", description=__doc__, args=argv,
                    default=_Args(known.preset, config=PRESETS[known.preset]))


def check_config(cfg: Config) -> None:
    """Everything that can be checked before any work starts; raises ValueError saying what to change."""
    from furl_fast.envs import TASKS

    cfg.validate(known_tasks=set(TASKS) | {f"{t}-v3" for t in TASKS})
    if cfg.loads_encoder:
        from furl_fast.vlm import task_prompt

        task_prompt(cfg.task, cfg.vlm.prompt)  # tasks outside MT10 need --vlm.prompt
    if cfg.resolved_reward == "code":
        load_program_set(cfg)


def load_program_set(cfg: Config):
    """The code reward's programs: --code-programs FILE, or the task's reference set."""
    from furl_fast.rewards.code import REFERENCE_PROGRAM_SETS, ProgramSet, reference_program_set

    if cfg.code_programs is None:
        try:
            return reference_program_set(cfg.task)
        except KeyError:
            raise ValueError(f"--reward code: {cfg.task} has no reference program set (those with one: "
                             f"{', '.join(sorted(REFERENCE_PROGRAM_SETS))}); pass --code-programs FILE "
                             "with a verified set (furl_fast.rewards.code.generate_program_set).") from None
    try:
        return ProgramSet.load(cfg.code_programs)
    except (OSError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"--code-programs {cfg.code_programs}: cannot read a program set there "
                         f"({exc}).") from exc


# ---- environment steps -----------------------------------------------------------------------


@dataclasses.dataclass
class Transition:
    """One vector step, with autoreset already unpacked. N = num_envs."""

    next_obs: np.ndarray  # (N, *obs_shape): what each step returned (final obs for ended episodes)
    next_frames: np.ndarray | None  # (N, H, W, 3) uint8 matching next_obs
    reward: np.ndarray  # (N,) sparse reward
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    success: np.ndarray  # (N,) bool
    done: np.ndarray  # (N,) bool: terminated or truncated
    reset_obs: np.ndarray  # (N, *obs_shape): the observations to act on next
    reset_frames: np.ndarray | None
    next_states: np.ndarray  # (N, 39) the env state of next_obs (is next_obs unless pixels)
    reset_states: np.ndarray  # (N, 39) the env state of reset_obs


def env_states(obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The 39-d env states of a vector observation: the observation itself, or info["state"] when
    the observation is pixels (the code reward reads states)."""
    return np.asarray(info["state"]) if "state" in info else obs


def split_obs(obs: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Vector-env observation -> (states, frames or None)."""
    if isinstance(obs, dict):
        return np.asarray(obs["obs"]), np.asarray(obs["frame"])
    return np.asarray(obs), None


def vector_step(envs, actions: np.ndarray) -> Transition:
    """envs.step with gymnasium's SAME_STEP autoreset: ended envs report their final observation and
    info under final_obs / final_info, and return the reset observation."""
    obs, reward, terminated, truncated, info = envs.step(actions)
    states, frames = split_obs(obs)
    done = np.logical_or(terminated, truncated)
    success = np.asarray(info["success"], dtype=bool).copy()
    reset_env_states = env_states(states, info)
    next_obs, next_frames = states.copy(), None if frames is None else frames.copy()
    next_env_states = reset_env_states.copy()
    for i in np.flatnonzero(done):
        final_states, final_frames = split_obs(info["final_obs"][i])
        next_obs[i] = final_states
        if next_frames is not None:
            next_frames[i] = final_frames
        final_info = info["final_info"]
        next_env_states[i] = final_info["state"][i] if "state" in final_info else final_states
        success[i] = bool(final_info["success"][i])
    return Transition(next_obs, next_frames, np.asarray(reward, np.float32), np.asarray(terminated),
                      np.asarray(truncated), success, done, states, frames, next_env_states,
                      reset_env_states)


# ---- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Owns everything a run needs and the loop that drives it; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, encoder=None):
        from furl_fast.agents.drq import make_drq
        from furl_fast.agents.relay import RelaySchedule
        from furl_fast.agents.sac import SAC
        from furl_fast.envs import make_env, make_vector_env
        from furl_fast.replay import ReplayBuffer

        self.cfg, self.run_dir = cfg, run_dir
        self.timings: dict[str, float] = {}  # seconds per phase, for --profile
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.uses_vlm = cfg.algo != "sac"

        # The VLM reward on a batch of embeddings: FuRL's aligned heads (set up below, they need the
        # goal image), a zero-shot reward model (cosine, goal_baseline, binary), or the code reward.
        # The code reward is stateful per episode, so it is scored once, at collection time, and
        # stored in the buffer's embedding slot as a (1,) "embedding": the episode's progress.
        self.encoder, self.furl, self.reward_model, self.code = encoder, None, None, None
        if cfg.resolved_reward == "code":
            from furl_fast.rewards.code import CodeReward

            self.code = CodeReward(load_program_set(cfg), num_envs=cfg.num_envs)
        elif self.uses_vlm and cfg.algo != "furl":
            from furl_fast.rewards import make_reward_model

            name = cfg.resolved_reward
            prompt_arg = "goal_prompts" if name == "goal_baseline" else "prompt"
            self.reward_model = make_reward_model(name, encoder, cfg.task, **{prompt_arg: cfg.vlm.prompt})

        import gymnasium as gym

        # DrQ: one render per step gives both the agent's stacked 84x84 pixels and the VLM frame.
        self.pixels = cfg.agent == "drq"
        env_kwargs = dict(obs="pixels", pixel_size=cfg.drq.image_size, frame_stack=cfg.drq.frame_stack,
                          action_repeat=cfg.drq.action_repeat) if self.pixels else {}
        # Programs that never read their frame spare the render.
        self.vlm_frames = self.uses_vlm and (self.code is None or self.code.reads_frames)
        env_kwargs["reward"] = cfg.env_reward
        self.envs = make_vector_env(cfg.task, cfg.num_envs, seed=cfg.seed, goal=cfg.goal,
                                    vlm_frames=self.vlm_frames, asynchronous=cfg.num_envs > 1,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, **env_kwargs)
        self.eval_env = make_env(cfg.task, seed=cfg.seed, goal=cfg.goal, vlm_frames=False, **env_kwargs)
        space = self.envs.single_observation_space
        obs_shape = (space["obs"] if self.vlm_frames else space).shape
        act_dim = self.envs.single_action_space.shape[0]
        self.act_low, self.act_high = self.envs.single_action_space.low, self.envs.single_action_space.high

        if self.pixels:
            # The buffer stores the newest frame of each stacked observation once and re-stacks by
            # index when sampling (with the random shift fused in).
            self.frame_channels = obs_shape[0] // cfg.drq.frame_stack
            stored_shape = (self.frame_channels, *obs_shape[1:])
        else:
            stored_shape = obs_shape

        def make_agent(metric_prefix: str = ""):
            if self.pixels:
                return make_drq(obs_shape, act_dim, cfg.sac, cfg.drq, self.device,
                                metric_prefix=metric_prefix)
            return SAC(obs_shape[0], act_dim, cfg.sac, self.device, metric_prefix=metric_prefix)

        self.agent = make_agent()
        self.relay_agent = make_agent("relay_") if cfg.uses_relay else None
        self.schedule = RelaySchedule.from_config(cfg.furl, num_envs=cfg.num_envs, seed=cfg.seed) \
            if cfg.uses_relay else None
        if cfg.algo == "furl":
            from furl_fast.rewards.furl import FuRLReward
            from furl_fast.vlm import task_prompt

            text_emb = self.encoder.encode_text([task_prompt(cfg.task, cfg.vlm.prompt)])[0].float()
            self.furl = FuRLReward(self.encoder.embed_dim, text_emb, cfg.furl, self.device, seed=cfg.seed)
            self.furl.set_goal(self.goal_embedding())

        # Capacity counts observation slots: each episode also stores its final observation.
        episode_steps = self.eval_env.unwrapped.max_episode_steps // (
            cfg.drq.action_repeat if self.pixels else 1)
        capacity = cfg.resolved_buffer_size + cfg.resolved_buffer_size // episode_steps + 2 * cfg.num_envs
        self.buffer = ReplayBuffer(capacity, stored_shape, act_dim,
                                   frame_stack=cfg.drq.frame_stack if self.pixels else 1,
                                   shift_pad=cfg.drq.shift_pad,
                                   embedding_dim=self.encoder.embed_dim if self.encoder else
                                   int(self.code is not None),
                                   embedding_dtype=torch.float16 if self.encoder else torch.float32,
                                   n_step=cfg.sac.n_step,
                                   gamma=cfg.sac.gamma, num_envs=cfg.num_envs,
                                   device=self.device, seed=cfg.seed)
        # The encoder runs beside the learner: a thread (torch ops release the GIL) and, on a GPU, its
        # own stream, so the frames of step t are encoded while step t's updates run.
        overlap = cfg.overlap_encode and self.encoder is not None
        self.encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode") if overlap else None
        self.encode_stream = torch.cuda.Stream(self.device) if overlap and self.device.type == "cuda" \
            else None
        self.step = 0
        self.episodes = 0
        self.relay_positives = 0  # algo=relay: positive frames counted as the embedding buffer would
        self.last_eval_step = -1
        self.recent_success: deque[float] = deque(maxlen=20)

    # -- pieces --------------------------------------------------------------------------------

    def goal_embedding(self) -> torch.Tensor:
        """FuRL's goal image: the first success frame of the scripted expert (same seed and goal
        setting as training), through the same 256 x 256 render and preprocessing as every frame."""
        from furl_fast.envs import expert_rollout

        rollout = expert_rollout(self.cfg.task, self.cfg.seed, goal=self.cfg.goal)
        index = rollout.first_success()
        if index is None:
            raise RuntimeError(f"the scripted expert did not solve {self.cfg.task} with seed "
                               f"{self.cfg.seed}, so FuRL has no goal image; try another seed.")
        return self.encode(rollout.frames[index : index + 1])[0].float()

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, D) embeddings on the training device."""
        with self.timed("encode"):
            return self.encoder.encode_frames(frames).to(self.device)

    def reward_inputs(self, states: np.ndarray, frames: np.ndarray | None, env_ids) -> torch.Tensor:
        """What the buffer keeps per observation of envs env_ids for the VLM reward: (n, D) image
        embeddings, or for the code reward the (n, 1) progress of each env's episode so far."""
        if self.code is None:
            return self.encode(frames[env_ids])
        with self.timed("code"):
            frames = np.zeros((len(env_ids), 1, 1, 3), np.uint8) if frames is None else frames[env_ids]
            progress = self.code.batch(frames, states[env_ids], env_ids=env_ids)
        return torch.from_numpy(progress).unsqueeze(1).to(self.device)

    def reward_inputs_later(self, states: np.ndarray, frames: np.ndarray | None,
                            env_ids) -> Callable[[], torch.Tensor]:
        """reward_inputs, started now in the encode thread (when overlap_encode); call the result to
        wait for it. frames must stay unchanged until then."""
        if self.encode_pool is None:
            inputs = self.reward_inputs(states, frames, env_ids)
            return lambda: inputs

        def encode_on_side_stream() -> torch.Tensor:
            with torch.cuda.stream(self.encode_stream):  # None (CPU): a no-op
                return self.encode(frames[env_ids])

        future = self.encode_pool.submit(encode_on_side_stream)

        def wait() -> torch.Tensor:
            with self.timed("encode_wait"):
                embs = future.result()
            if self.encode_stream is not None:  # later kernels read embs on the main stream
                torch.cuda.current_stream(self.device).wait_stream(self.encode_stream)
                embs.record_stream(torch.cuda.current_stream(self.device))
            return embs

        return wait

    def vlm_reward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> (B,) float32 VLM reward with the heads / model as they are now."""
        if self.code is not None:
            return emb[:, 0]
        if self.furl is not None:
            return ops.mlp_cosine_reward(emb, *self.furl.fused_params())
        return self.reward_model.reward_from_embeddings(emb)

    def timed(self, name: str):
        return _Timer(self.timings, name, self.cfg.profile and self.device.type == "cuda")

    def random_actions(self, n: int) -> np.ndarray:
        return np.random.uniform(self.act_low, self.act_high, (n, len(self.act_low))).astype(np.float32)

    def stored(self, obs: np.ndarray) -> np.ndarray:
        """What the buffer keeps of one observation: the newest frame of a pixel stack, or the state."""
        return obs[-self.frame_channels:] if self.pixels else obs

    def policy_actions(self, states: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(states, device=self.device)  # float states, or uint8 pixel stacks
        actions = self.agent.act(obs).cpu().numpy()
        if self.schedule is not None and self.schedule.enabled:
            relay_on = self.schedule.relay_mask()
            relay = self.relay_agent.act(obs).cpu().numpy() if relay_on.any() else None
            actions = self.schedule.choose_actions(actions, relay)
        return actions

    def update(self, log: bool) -> dict[str, Any]:
        cfg = self.cfg
        with self.timed("buffer"):
            batch = self.buffer.sample(cfg.batch_size)
            batch = batch._replace(**{k: v.to(self.device, non_blocking=True) for k, v in
                                      batch._asdict().items() if isinstance(v, torch.Tensor)})
        metrics: dict[str, Any] = {}
        with self.timed("update"):
            reward = batch.reward
            if self.uses_vlm:
                # Heads as they are before this step's update (spec: pre-update reward).
                vlm = self.vlm_reward(batch.next_embedding)
                reward = batch.reward + cfg.rho * vlm
                if log:
                    metrics["charts/vlm_reward"] = vlm.mean()
            metrics.update(self.agent.update(batch._replace(reward=reward), log=log))
            if self.relay_agent is not None and self.schedule.enabled:
                metrics.update(self.relay_agent.update(batch, log=log))  # sparse reward only
            if self.furl is not None:
                metrics.update(self.furl.update(batch.next_embedding, log=log))
        return metrics

    # -- episodes ------------------------------------------------------------------------------

    def start_episodes(self, obs: np.ndarray, frames: np.ndarray | None, env_states: np.ndarray,
                       env_ids: np.ndarray) -> None:
        if self.code is not None:
            self.code.reset(env_ids)
        embs = self.reward_inputs(env_states, frames, env_ids) if self.uses_vlm else None
        for k, e in enumerate(env_ids):
            self.buffer.start_episode(self.stored(obs[e]), embedding=None if embs is None else embs[k],
                                      env=int(e))
            # The embedding buffer labels the frame after each step with that step's success flag.
            self.ep_return[e], self.ep_success[e], self.ep_embs[e] = 0.0, [], []
        if self.schedule is not None:
            self.schedule.begin_episode(env_ids)

    def finish_episode(self, e: int) -> dict[str, float]:
        success = np.asarray(self.ep_success[e], dtype=bool)
        self.episodes += 1
        self.recent_success.append(float(success[-1]))
        if self.furl is not None:
            self.furl.add_episode(torch.stack(self.ep_embs[e]), success)
        elif self.schedule is not None:  # relay without heads: count positives as the heads' buffer would
            from furl_fast.rewards.furl import label_episode

            self.relay_positives += label_episode(success)
        if self.schedule is not None:
            positives = self.furl.buffer.positives_added if self.furl is not None else self.relay_positives
            self.schedule.observe_positives(positives)
        return {"charts/episode_return": self.ep_return[e], "charts/episode_success": float(success[-1]),
                "charts/episode_ever_success": float(success.any()), "charts/episodes": self.episodes}

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop_flag: list[int]) -> int:
        """Trains until total_steps (returns 0) or a signal (checkpoints, returns 128 + signum)."""
        from tqdm import tqdm

        from furl_fast.metrics import MetricsWriter

        cfg, n = self.cfg, self.cfg.num_envs
        writer = MetricsWriter(self.run_dir, resume_step=self.step if self.step > 0 else None,
                               config=config_to_dict(cfg))
        self.ep_return = [0.0] * n
        self.ep_success: list[list[bool]] = [[] for _ in range(n)]
        self.ep_embs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for e in range(n):  # a resumed run's interrupted episodes end where the checkpoint was
            self.buffer.truncate_episode(e)
        obs, info = self.envs.reset(seed=cfg.seed + self.episodes)
        states, frames = split_obs(obs)
        self.start_episodes(states, frames, env_states(states, info), np.arange(n))
        bar = tqdm(total=cfg.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None, desc=f"{cfg.algo} {cfg.task}")
        log_every = max(cfg.log_every, n)
        t_start, step_start = time.perf_counter(), self.step
        try:
            while self.step < cfg.total_steps:
                if stop_flag:
                    self.save_checkpoint()
                    print(f"\nstopped by signal {stop_flag[0]} at step {self.step}; checkpoint saved. "
                          f"Resume with: python -m furl_fast.train --resume {self.run_dir}", flush=True)
                    return 128 + stop_flag[0]
                with self.timed("act"):
                    actions = self.random_actions(n) if self.step < cfg.warmup_steps else \
                        self.policy_actions(states)
                with self.timed("env"):
                    tr = vector_step(self.envs, actions)
                inputs = self.reward_inputs_later(tr.next_states, tr.next_frames, np.arange(n)) \
                    if self.uses_vlm else lambda: None
                self.step += n
                log = self.step // log_every != (self.step - n) // log_every
                metrics: dict[str, Any] = {}
                if self.step >= cfg.warmup_steps and len(self.buffer) >= cfg.batch_size:
                    updates = n * cfg.updates_per_step
                    for k in range(updates):
                        metrics = self.update(log=log and k == updates - 1)
                self.add_to_buffer(tr, actions, inputs())
                done_ids = np.flatnonzero(tr.done)
                for e in done_ids:
                    writer.log(self.step, self.finish_episode(int(e)))
                if done_ids.size:
                    self.start_episodes(tr.reset_obs, tr.reset_frames, tr.reset_states, done_ids)
                if self.schedule is not None:
                    self.schedule.step()
                states = tr.reset_obs
                if log:
                    elapsed = time.perf_counter() - t_start
                    metrics = {k: float(v) for k, v in metrics.items()}
                    metrics["perf/steps_per_second"] = (self.step - step_start) / max(elapsed, 1e-9)
                    metrics["charts/env_frames"] = self.step * (cfg.drq.action_repeat if self.pixels else 1)
                    if cfg.profile:
                        metrics.update({f"perf/{k}_seconds": v for k, v in self.timings.items()})
                        print(self.profile_line(), flush=True)
                        self.timings.clear()
                    writer.log(self.step, metrics)
                    bar.set_postfix(episodes=self.episodes, success=f"{self.recent_rate():.2f}",
                                    sps=f"{metrics['perf/steps_per_second']:.0f}")
                bar.update(n)
                if self.step // cfg.eval_every != (self.step - n) // cfg.eval_every:
                    writer.log(self.step, self.evaluate(writer))
                if self.step // cfg.checkpoint_every != (self.step - n) // cfg.checkpoint_every:
                    self.save_checkpoint()
            if self.last_eval_step != self.step:
                writer.log(self.step, self.evaluate(writer))
            self.save_checkpoint()
            return 0
        finally:
            bar.close()
            writer.close()

    def add_to_buffer(self, tr: Transition, actions: np.ndarray, embs: torch.Tensor | None) -> None:
        n = self.cfg.num_envs
        with self.timed("buffer"):
            for e in range(n):
                self.buffer.add(self.stored(tr.next_obs[e]), actions[e], float(tr.reward[e]),
                                bool(tr.terminated[e]),
                                bool(tr.truncated[e]), success=bool(tr.success[e]),
                                embedding=None if embs is None else embs[e], env=e)
                self.ep_return[e] += float(tr.reward[e])
                self.ep_success[e].append(bool(tr.success[e]))
                if self.furl is not None:  # its embedding buffer takes whole labelled episodes
                    self.ep_embs[e].append(embs[e])

    def recent_rate(self) -> float:
        return sum(self.recent_success) / len(self.recent_success) if self.recent_success else 0.0

    def profile_line(self) -> str:
        total = sum(self.timings.values()) or 1.0
        parts = ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in
                          sorted(self.timings.items(), key=lambda kv: -kv[1]))
        return f"[profile] step {self.step}: {parts}"

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, writer=None) -> dict[str, float]:
        """Deterministic policy (tanh of the mean): success at the last step (the paper's measure) and
        whether it ever succeeded; the first episode is recorded as a video (also to writer's
        TensorBoard, every 4th frame at half size)."""
        cfg = self.cfg
        last, ever, returns = [], [], []
        for k in range(cfg.resolved_eval_episodes):
            env = self.eval_env
            seed = cfg.seed if cfg.goal == "fixed" else cfg.seed + 100_000 + self.step + k
            state, _ = env.reset(seed=seed)
            frames = [env.render()] if k == 0 and cfg.eval_video else None
            total, successes = 0.0, []
            for _ in range(env.unwrapped.max_episode_steps):
                obs = torch.as_tensor(state, device=self.device).unsqueeze(0)
                action = self.agent.act(obs, deterministic=True).cpu().numpy()[0]
                state, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                successes.append(bool(info["success"]))
                if frames is not None:
                    frames.append(env.render())
                if terminated or truncated:
                    break
            last.append(float(successes[-1]))
            ever.append(float(any(successes)))
            returns.append(total)
            if frames is not None:
                write_video(self.run_dir / "videos" / f"eval_step{self.step:08d}", frames)
                if writer is not None:
                    writer.log_video("eval/video", [f[::2, ::2] for f in frames[::4]], self.step,
                                     fps=30 // 4)
        self.last_eval_step = self.step
        result = {"eval/success": float(np.mean(last)), "eval/ever_success": float(np.mean(ever)),
                  "eval/return": float(np.mean(returns)), "eval/episodes": float(len(last))}
        atomic_write_text(self.run_dir / "eval.json", json.dumps({"step": self.step, **result}, indent=2))
        return result

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Atomic: the replay buffer goes to a new file first, then state.pt (which names it) replaces
        the previous one, then older replay files are removed. A crash at any point leaves a
        consistent (state.pt, replay file) pair."""
        ckpt = self.run_dir / CHECKPOINT_DIR
        ckpt.mkdir(parents=True, exist_ok=True)
        replay_name = f"replay-{self.step:010d}.bin"
        self.buffer.save(ckpt / replay_name)
        state = {
            "step": self.step, "episodes": self.episodes, "replay": replay_name,
            "relay_positives": self.relay_positives, "last_eval_step": self.last_eval_step,
            "recent_success": list(self.recent_success),
            "agent": self.agent.state_dict(),
            "relay_agent": None if self.relay_agent is None else self.relay_agent.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "furl": None if self.furl is None else self.furl.state_dict(),
            "rng": rng_state(),
        }
        tmp = ckpt / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt / STATE_FILE)
        for old in ckpt.glob("replay-*.bin"):
            if old.name != replay_name:
                old.unlink()
        return ckpt / STATE_FILE

    def load_checkpoint(self) -> None:
        ckpt = self.run_dir / CHECKPOINT_DIR
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        self.buffer.restore(ckpt / state["replay"])
        self.step, self.episodes = state["step"], state["episodes"]
        self.relay_positives, self.last_eval_step = state["relay_positives"], state["last_eval_step"]
        self.recent_success.extend(state["recent_success"])
        self.agent.load_state_dict(state["agent"])
        if self.relay_agent is not None:
            self.relay_agent.load_state_dict(state["relay_agent"])
            self.schedule.load_state_dict(state["schedule"])
        if self.furl is not None:
            self.furl.load_state_dict(state["furl"])
        set_rng_state(state["rng"])

    def close(self) -> None:
        self.envs.close()
        self.eval_env.close()
        if self.code is not None:
            self.code.close()
        if self.encode_pool is not None:
            self.encode_pool.shutdown()


class _Timer:
    """Adds the wall time of a with-block to timings[name] (syncing the GPU first when asked)."""

    def __init__(self, timings: dict[str, float], name: str, sync: bool):
        self.timings, self.name, self.sync = timings, name, sync

    def __enter__(self):
        if self.sync:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.sync:
            torch.cuda.synchronize()
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


# ---- helpers -------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_video(stem: Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """mp4 through imageio-ffmpeg, or a GIF when no ffmpeg can be found."""
    import imageio

    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = stem.with_suffix(".mp4")
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
    except Exception as exc:  # no ffmpeg backend: a GIF needs none
        logger.warning("mp4 writing failed (%s); writing a GIF instead", exc)
        path = stem.with_suffix(".gif")
        imageio.mimwrite(path, frames, duration=1000 / fps)
    return path


def default_run_dir(cfg: Config) -> Path:
    task = cfg.task.removesuffix("-v3")
    return Path("runs") / f"{cfg.algo}-{task}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(cfg: Config) -> tuple[Config, Path, bool]:
    """Resolves the run directory; a resumed run takes its saved configuration."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():
            raise ValueError(f"--resume {run_dir}: no checkpoint there ({CHECKPOINT_DIR}/{STATE_FILE}); "
                             "give the run directory of an interrupted run.")
        saved = config_from_dict(Config, json.loads((run_dir / "config.json").read_text()))
        return dataclasses.replace(saved, resume=str(run_dir), run_dir=str(run_dir)), run_dir, True
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():
        raise ValueError(f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another directory.")
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    return cfg, run_dir, False


def load_vlm(cfg: Config):
    """The frozen VLM; fails fast (RuntimeError / FileNotFoundError / ValueError) without weights."""
    from furl_fast.vlm import load_encoder

    return load_encoder(cfg.vlm.model, cfg.vlm.pretrained, device=resolve_device(cfg.device),
                        precision=cfg.vlm.precision, bgr=cfg.vlm.bgr, cache_dir=cfg.vlm.cache_dir)


def train(cfg: Config, wandb_project: str | None = None, wandb_entity: str | None = None) -> int:
    """Runs (or resumes) one training run; returns the process exit code (2: bad configuration).
    wandb_project: track the run with Weights & Biases in that project (metrics.start_wandb)."""
    try:
        cfg, run_dir, resuming = prepare(cfg)
        check_config(cfg)
        if wandb_project is not None:
            from furl_fast.metrics import require_wandb

            require_wandb()
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        encoder = load_vlm(cfg) if cfg.loads_encoder else None
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Say what to change before any work starts (the weights message says how to pass a checkpoint).
        print(f"furl_fast.train: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write_text(run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2))
    tracker = None
    if wandb_project is not None:
        from furl_fast.metrics import start_wandb

        tracker = start_wandb(run_dir, config_to_dict(cfg), project=wandb_project, entity=wandb_entity)
    trainer = Trainer(cfg, run_dir, encoder)
    stop: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if resuming:
            trainer.load_checkpoint()
            logger.info("resumed %s at step %d", run_dir, trainer.step)
        code = trainer.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        trainer.close()
        if tracker is not None:
            tracker.finish()
    if code == 0:
        print(f"done: {trainer.step} steps, run directory {run_dir}")
    return code


def main(argv: list[str] | None = None) -> None:
    from furl_fast._cli import setup_logging

    setup_logging()
    args = parse_args(argv)
    sys.exit(train(args.config, wandb_project=args.wandb_project_name if args.track else None,
                   wandb_entity=args.wandb_entity))


if __name__ == "__main__":
    main()
