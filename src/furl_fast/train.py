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


# What `--resume RUN` may change; every other flag keeps the run's saved value (changing one is
# refused: the networks, buffers and schedules in the checkpoint were built for those values).
RESUMABLE = ("total_steps", "eval_every", "eval_episodes", "eval_video", "log_every",
             "checkpoint_every", "checkpoint_replay", "device", "torch_threads", "profile",
             "overlap_encode")


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
    """The command line. With --resume RUN the defaults are RUN's saved configuration instead of a
    preset, so the flags given are exactly the changes (prepare() checks them against RESUMABLE)."""
    from furl_fast._cli import tyro_cli

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume is None:
        preset = known.preset or "laptop"
        default = PRESETS[preset]
    elif known.preset is not None:
        raise ValueError(f"--preset {known.preset} with --resume: a resumed run keeps its saved "
                         "settings (change the ones a resume may change with their own flags).")
    else:
        preset = "laptop"
        default = dataclasses.replace(saved_config(Path(known.resume)), resume=known.resume)
    return tyro_cli(_Args, prog="python -m furl_fast.train", description=__doc__, args=argv,
                    default=_Args(preset, config=default))


def saved_config(run_dir: Path) -> Config:
    """The configuration a run directory was started with (its config.json)."""
    if not (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
        raise ValueError(f"--resume {run_dir}: no checkpoint there ({CHECKPOINT_DIR}/{STATE_FILE}); "
                         "give the run directory of an interrupted or finished run.")
    try:
        return config_from_dict(Config, json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"--resume {run_dir}: cannot read its config.json ({exc}).") from exc


def changed_fields(a: Config, b: Config) -> list[str]:
    """Dotted names of the fields (nested ones as sac.tau) whose values differ."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    return sorted(k for k in fa if fa[k] != fb.get(k))


def check_config(cfg: Config) -> None:
    """Everything that can be checked before any work starts; raises ValueError saying what to change."""
    from furl_fast.envs import TASKS

    try:
        cfg.validate(known_tasks=set(TASKS) | {f"{t}-v3" for t in TASKS})
    except ValueError as exc:
        raise ValueError(f"{exc} (python -m furl_fast.train --help lists every flag)") from None
    if cfg.loads_encoder and cfg.vlm.prompt is None:
        from furl_fast.vlm import MT10_PROMPTS

        if cfg.task.removesuffix("-v3") not in MT10_PROMPTS:
            raise ValueError(f"--task {cfg.task} has no built-in prompt (the MT10 tasks have one: "
                             f"{', '.join(sorted(MT10_PROMPTS))}); describe its goal for the VLM with "
                             '--vlm.prompt "..." (a short sentence saying what success looks like).')
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
    """The 39-d env states of a vector step for the code reward: info["state"] (the state with the
    goal xyz, even when the observation hides it), else the observation itself."""
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
        from furl_fast.agents.drq import DrQV2
        from furl_fast.agents.ensemble import SACEnsemble
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
        # Steps (self.step, total/warm-up/eval/log/checkpoint intervals) count simulator steps; an
        # agent step (one action, one transition) is `repeat` of them.
        self.repeat = cfg.drq.action_repeat if self.pixels else 1
        env_kwargs = dict(obs="pixels", pixel_size=cfg.drq.image_size, frame_stack=cfg.drq.frame_stack,
                          action_repeat=cfg.drq.action_repeat) if self.pixels else {}
        # Programs that never read their frame spare the render.
        self.vlm_frames = self.uses_vlm and (self.code is None or self.code.reads_frames)
        env_kwargs["reward"] = cfg.env_reward
        env_kwargs["fast_render"] = cfg.render_quality == "fast"
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
                return DrQV2(obs_shape, act_dim, cfg.drq, self.device, metric_prefix=metric_prefix)
            return SAC(obs_shape[0], act_dim, cfg.sac, self.device, metric_prefix=metric_prefix)

        self.agent = make_agent()
        self.relay_agent = make_agent("relay_") if cfg.uses_relay else None
        # State SAC with relay: while relay lasts, both agents train as one stacked ensemble, one
        # update for both (member 0 the FuRL agent, member 1 the relay agent); update() trains them
        # apart again once relay has ended.
        self.ensemble = SACEnsemble([self.agent, self.relay_agent]) \
            if self.relay_agent is not None and not self.pixels else None
        if self.ensemble is not None:
            self.agent, self.relay_agent = self.ensemble.members()
        self.schedule = RelaySchedule.from_config(cfg.furl, num_envs=cfg.num_envs, seed=cfg.seed) \
            if cfg.uses_relay else None
        if cfg.algo == "furl":
            from furl_fast.rewards.furl import FuRLReward
            from furl_fast.vlm import task_prompt

            text_emb = self.encoder.encode_text([task_prompt(cfg.task, cfg.vlm.prompt)])[0].float()
            self.furl = FuRLReward(self.encoder.embed_dim, text_emb, cfg.furl, self.device, seed=cfg.seed)
            if cfg.furl.phase_a:  # only phase A reads the goal image (and its expert rollout)
                self.furl.set_goal(self.goal_embedding())

        # Capacity counts observation slots: each episode also stores its final observation.
        episode_steps = self.eval_env.unwrapped.max_episode_steps // self.repeat
        capacity = cfg.resolved_buffer_size + cfg.resolved_buffer_size // episode_steps + 2 * cfg.num_envs
        self.buffer = ReplayBuffer(capacity, stored_shape, act_dim,
                                   frame_stack=cfg.drq.frame_stack if self.pixels else 1,
                                   shift_pad=cfg.drq.shift_pad,
                                   embedding_dim=self.encoder.embed_dim if self.encoder else
                                   int(self.code is not None),
                                   embedding_dtype=torch.float16 if self.encoder else torch.float32,
                                   n_step=(cfg.drq if self.pixels else cfg.sac).n_step,
                                   gamma=(cfg.drq if self.pixels else cfg.sac).gamma,
                                   num_envs=cfg.num_envs,
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
        setting as training), through the same 256 x 256 render (render_quality) and preprocessing as
        every frame."""
        from furl_fast.envs import expert_rollout

        rollout = expert_rollout(self.cfg.task, self.cfg.seed, goal=self.cfg.goal, stop_on_success=True,
                                 fast_render=self.cfg.render_quality == "fast")
        index = rollout.first_success()
        if index is None:
            raise ValueError(f"the scripted expert did not solve {self.cfg.task} with seed "
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
        if self.ensemble is not None and not self.schedule.enabled:
            # Relay has ended for good: only the FuRL agent trains from here on, alone; the relay
            # agent keeps the state it had (a smaller update than the ensemble with a frozen member).
            self.agent, self.relay_agent = self.ensemble.to_agents()
            self.ensemble = None
        with self.timed("buffer"):
            batch = self.buffer.sample(cfg.batch_size)
            batch = batch._replace(**{k: v.to(self.device, non_blocking=True) for k, v in
                                      batch._asdict().items() if isinstance(v, torch.Tensor)})
        metrics: dict[str, Any] = {}
        with self.timed("update"):
            reward = batch.reward
            if self.uses_vlm:
                # Heads as they are before this step's update (spec: pre-update reward).
                vlm, per_step = nstep_vlm_reward(batch, self.vlm_reward)
                reward = batch.reward + cfg.resolved_rho * vlm
                if log:  # the reward of one frame, R(o_{t+1}), whatever the n of the n-step sum
                    metrics["charts/vlm_reward"] = per_step[:, 0].mean()
            if self.ensemble is not None:  # the relay member learns from the sparse reward only
                rewards = torch.stack([reward.reshape(-1), batch.reward.reshape(-1)])
                metrics.update(self.ensemble.update(batch, rewards, log=log))
            else:
                metrics.update(self.agent.update(batch._replace(reward=reward), log=log))
                if self.relay_agent is not None and self.schedule.enabled:
                    metrics.update(self.relay_agent.update(batch, log=log))  # sparse reward only
        if self.furl is not None:
            with self.timed("heads"):
                metrics.update(self.furl.update(batch.next_embedding, log=log))
        return metrics

    # -- episodes ------------------------------------------------------------------------------

    def sync_agent_steps(self) -> None:
        """DrQ-v2's exploration std follows the agent step: simulator steps / action repeat."""
        if self.pixels:
            for agent in (self.agent, self.relay_agent):
                if agent is not None:
                    agent.step = self.step // self.repeat

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
        print(self.expectation_line(), flush=True)
        stride = n * self.repeat  # simulator steps per vector step
        log_every = max(cfg.log_every, stride)
        log_updates = False  # the next update's losses go to the log (DrQ-v2 skips agent steps)
        t_start, step_start = time.perf_counter(), self.step
        t_line, step_line = t_start, self.step  # the plain progress line's rate: since the last one
        try:
            while self.step < cfg.total_steps:
                if stop_flag:
                    self.save_checkpoint()
                    print(f"\nstopped by signal {stop_flag[0]} at step {self.step}; checkpoint saved. "
                          f"Resume with: python -m furl_fast.train --resume {self.run_dir}", flush=True)
                    return 128 + stop_flag[0]
                self.sync_agent_steps()
                with self.timed("act"):
                    actions = self.random_actions(n) if self.step < cfg.warmup_steps else \
                        self.policy_actions(states)
                with self.timed("env"):
                    tr = vector_step(self.envs, actions)
                inputs = self.reward_inputs_later(tr.next_states, tr.next_frames, np.arange(n)) \
                    if self.uses_vlm else lambda: None
                self.step += stride
                log = self.step // log_every != (self.step - stride) // log_every
                log_updates |= log
                if self.step >= cfg.warmup_steps and len(self.buffer) >= cfg.batch_size:
                    updates = updates_due(self.step - stride, self.step, self.repeat,
                                          self.agent.update_every_steps, cfg.updates_per_step)
                    for k in range(updates):
                        metrics = self.update(log=log_updates and k == updates - 1)
                    if updates and log_updates:
                        writer.log(self.step, {name: float(v) for name, v in metrics.items()})
                        log_updates = False
                self.add_to_buffer(tr, actions, inputs())
                if self.schedule is not None:
                    # Before the resets below: a new episode's first action is its step 0.
                    self.schedule.step()
                done_ids = np.flatnonzero(tr.done)
                for e in done_ids:
                    writer.log(self.step, self.finish_episode(int(e)))
                if done_ids.size:
                    self.start_episodes(tr.reset_obs, tr.reset_frames, tr.reset_states, done_ids)
                states = tr.reset_obs
                if log:
                    elapsed = time.perf_counter() - t_start
                    perf = {"perf/steps_per_second": (self.step - step_start) / max(elapsed, 1e-9),
                            "charts/agent_steps": self.step // self.repeat}
                    if cfg.profile:
                        perf.update({f"perf/{k}_seconds": v for k, v in self.timings.items()})
                        print(self.profile_line(), flush=True)
                        self.timings.clear()
                    writer.log(self.step, perf)
                    # One rate on screen: the bar's own (a terminal), or the plain line's.
                    bar.set_postfix(episodes=self.episodes, success=f"{self.recent_rate():.2f}")
                    if bar.disable:
                        now = time.perf_counter()
                        print(self.progress_line((self.step - step_line) / max(now - t_line, 1e-9)),
                              flush=True)
                        t_line, step_line = now, self.step
                bar.update(stride)
                if self.step // cfg.eval_every != (self.step - stride) // cfg.eval_every:
                    writer.log(self.step, self.evaluate(writer))
                if self.step // cfg.checkpoint_every != (self.step - stride) // cfg.checkpoint_every:
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

    def expectation_line(self) -> str:
        """What to expect, printed as a run starts: the steps to go and, on a CPU, the time they take
        at the speed measured for this kind of run on a 2-core CPU (README, "What to expect")."""
        cfg = self.cfg
        line = f"furl_fast.train: steps {self.step} -> {cfg.total_steps} in {self.run_dir}"
        if self.device.type != "cpu":
            return line + "; progress every --log-every steps"
        kind = "drq" if self.pixels else "vlm" if self.encoder is not None else "state"
        rate = CPU_STEPS_PER_SECOND[kind]
        eta = format_seconds((cfg.total_steps - self.step) / rate)
        return (line + f"; on a 2-core CPU such a run ({kind}) measured ~{rate:g} steps/s, i.e. ~{eta} "
                "(a larger encoder, more envs or a busy machine change that); progress every "
                f"--log-every steps")

    def progress_line(self, rate: float) -> str:
        """The plain progress line printed every --log-every steps when output is not a terminal."""
        cfg = self.cfg
        eta = format_seconds((cfg.total_steps - self.step) / rate) if rate > 0 else "?"
        return (f"step {self.step}/{cfg.total_steps} ({100 * self.step / cfg.total_steps:.0f}%) | "
                f"{rate:.1f} steps/s | {self.episodes} episodes | success (last "
                f"{len(self.recent_success)}) {self.recent_rate():.2f} | ETA {eta}")

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
        from furl_fast.agents.ensemble import split_state_dict

        ckpt = self.run_dir / CHECKPOINT_DIR
        ckpt.mkdir(parents=True, exist_ok=True)
        replay_name = f"replay-{self.step:010d}.bin" if self.cfg.checkpoint_replay else None
        if replay_name is not None:
            self.buffer.save(ckpt / replay_name)
        # The ensemble's members are saved as the separate SAC agents they stand for.
        agents = split_state_dict(self.ensemble.state_dict()) if self.ensemble is not None else \
            [self.agent.state_dict(), None if self.relay_agent is None else self.relay_agent.state_dict()]
        state = {
            "step": self.step, "episodes": self.episodes, "replay": replay_name,
            "relay_positives": self.relay_positives, "last_eval_step": self.last_eval_step,
            "recent_success": list(self.recent_success),
            "agent": agents[0],
            "relay_agent": agents[1],
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

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Restores read_checkpoint()'s state; raises ValueError when it does not fit this run."""
        from furl_fast.agents.ensemble import stack_state_dicts

        if state["replay"] is None:
            print(f"furl_fast.train: the checkpoint holds no replay buffer (it was saved with "
                  f"--no-checkpoint-replay): training continues from step {state['step']} with an "
                  f"empty buffer; updates restart once it holds --batch-size {self.cfg.batch_size} "
                  "transitions.", flush=True)
        else:
            try:
                self.buffer.restore(self.run_dir / CHECKPOINT_DIR / state["replay"])
            except (OSError, ValueError) as exc:  # damage past the header (checksums) shows here
                raise ValueError(f"--resume {self.run_dir}: cannot restore the checkpoint's replay "
                                 f"buffer: {exc}") from exc
        self.step, self.episodes = state["step"], state["episodes"]
        self.relay_positives, self.last_eval_step = state["relay_positives"], state["last_eval_step"]
        self.recent_success.extend(state["recent_success"])
        if self.ensemble is not None and not state["schedule"]["enabled"]:
            # Relay had ended: the agents train apart (and their Adam step counts differ).
            self.agent, self.relay_agent = self.ensemble.to_agents()
            self.ensemble = None
        if self.ensemble is not None:
            self.ensemble.load_state_dict(stack_state_dicts([state["agent"], state["relay_agent"]]))
        else:
            self.agent.load_state_dict(state["agent"])
            if self.relay_agent is not None:
                self.relay_agent.load_state_dict(state["relay_agent"])
        if self.schedule is not None:
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


def updates_due(prev_step: int, step: int, repeat: int, every: int, per_step: int) -> int:
    """Updates owed when the run went from simulator step prev_step to step: per_step for every
    every-th agent step (agent step = simulator steps // repeat) in between (DrQ-v2: every 2)."""
    return (step // repeat // every - prev_step // repeat // every) * per_step


def nstep_vlm_reward(batch, reward_fn: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The VLM term of an n-step target: sum_j gamma^j R(o_{t+1+j}) over the steps of the batch's
    n-step window (cut at episode ends), the same window the buffer sums the environment reward over.

    batch: furl_fast.replay.Batch with step_embeddings (B, n, D) and step_discounts (B, n).
    reward_fn: (M, D) embeddings -> (M,) float32 rewards.
    Returns the (B,) float32 n-step sums and the (B, n) per-step rewards R(o_{t+1+j}).
    """
    weights = batch.step_discounts
    rewards = reward_fn(batch.step_embeddings.flatten(0, 1)).view(weights.shape)
    return (weights * rewards).sum(dim=1), rewards


# Simulator steps per second measured on a 2-core CPU, 1 torch thread, one env (README, "What to
# expect"): state SAC without a VLM, state SAC with RN50 rewards (encoding is ~75% of it), DrQ
# (0.6 agent steps/s at action repeat 2).
CPU_STEPS_PER_SECOND = {"state": 60.0, "vlm": 7.0, "drq": 1.2}


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


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


def prepare(cfg: Config) -> tuple[Config, Path, dict[str, Any] | None]:
    """Resolves and checks the run directory. A resume returns the checkpoint's state too (read now,
    so that a damaged file is reported before any start-up work), and its configuration: the saved
    one with the changes of RESUMABLE applied (cfg must be the saved configuration plus changes, as
    parse_config makes it)."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = saved_config(run_dir)
        refused = [k for k in changed_fields(cfg, saved) if k not in (*RESUMABLE, "resume", "run_dir")]
        if cfg.run_dir not in (saved.run_dir, str(run_dir)):
            refused.append("run_dir")
        if refused:
            flags = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise ValueError(f"--resume {run_dir}: {flags} cannot change on a resume (the checkpoint "
                             f"was made with the saved values); a resume may change only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)}.")
        state = read_checkpoint(run_dir)
        if cfg.total_steps < state["step"]:
            raise ValueError(f"--resume {run_dir}: --total-steps {cfg.total_steps} is below the "
                             f"checkpoint's step {state['step']}; a resume can only extend a run.")
        return dataclasses.replace(cfg, resume=str(run_dir), run_dir=str(run_dir)), run_dir, state
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"--run-dir {run_dir}: {path} is a file, not a directory; choose another "
                             "path.")
    if (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():
        raise ValueError(f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another directory.")
    return dataclasses.replace(cfg, run_dir=str(run_dir)), run_dir, None


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's state (state.pt), with its replay file's header checked."""
    from furl_fast.replay import ReplayBuffer

    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    try:  # our own file (it holds RNG states, which need full unpickling)
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["replay"] is not None:
            ReplayBuffer.check_file(run_dir / CHECKPOINT_DIR / state["replay"])
    except Exception as exc:  # noqa: BLE001  (truncated zip, bad pickle, missing key: all damage)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--resume {run_dir}: its checkpoint is damaged or incomplete ({message}); "
                         "nothing was changed.") from exc
    return state


def load_vlm(cfg: Config):
    """The frozen VLM; fails fast (RuntimeError / FileNotFoundError / ValueError) without weights."""
    from furl_fast.vlm import load_encoder

    return load_encoder(cfg.vlm.model, cfg.vlm.pretrained, device=resolve_device(cfg.device),
                        precision=cfg.vlm.precision, bgr=cfg.vlm.bgr, cache_dir=cfg.vlm.cache_dir)


def train(cfg: Config, wandb_project: str | None = None, wandb_entity: str | None = None) -> int:
    """Runs (or resumes) one training run; returns the process exit code (2: it could not start,
    with a one-line message on stderr and no run directory made; 130: interrupted while starting).
    wandb_project: track the run with Weights & Biases in that project (metrics.start_wandb)."""
    from furl_fast.vlm.encoder import WeightsUnavailableError

    trainer = None
    try:
        cfg, run_dir, state = prepare(cfg)
        check_config(cfg)
        if wandb_project is not None:
            from furl_fast.metrics import require_wandb

            require_wandb()
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        loading = "the VLM and the environments" if cfg.loads_encoder else "the environments"
        vlm = f"{cfg.vlm.model} ({cfg.vlm.pretrained or 'default weights'})" if cfg.loads_encoder \
            else "none"
        print(f"furl_fast.train: {'resuming' if state is not None else 'starting'} {cfg.algo} "
              f"{cfg.task} in {run_dir} ({cfg.algo}-{cfg.agent}, seed {cfg.seed}, VLM {vlm}, render "
              f"quality {cfg.render_quality}, env reward {cfg.env_reward}; loading {loading})",
              flush=True)
        encoder = load_vlm(cfg) if cfg.loads_encoder else None
        trainer = Trainer(cfg, run_dir, encoder)
        if state is not None:
            trainer.load_checkpoint(state)
        # Only now, with everything ready: a run that cannot start leaves no directory behind.
        # (A resume rewrites it with the changes it made: total_steps, cadences, device.)
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = config_to_dict(dataclasses.replace(cfg, resume=None))
        atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2))
    except (KeyboardInterrupt, ValueError, OSError, WeightsUnavailableError) as exc:
        if trainer is not None:
            trainer.close()
        if isinstance(exc, KeyboardInterrupt):
            print("furl_fast.train: interrupted while starting; nothing was written.", file=sys.stderr)
            return 130
        print(f"furl_fast.train: {cli_message(exc)}", file=sys.stderr)
        return 2
    if state is not None:
        logger.info("resumed %s at step %d", run_dir, trainer.step)
    tracker = None
    if wandb_project is not None:
        from furl_fast.metrics import start_wandb

        tracker = start_wandb(run_dir, config_to_dict(cfg), project=wandb_project, entity=wandb_entity)
    stop: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
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


def cli_message(exc: BaseException) -> str:
    """One line saying what to change, in terms of the command line's flags."""
    from furl_fast.vlm.encoder import WeightsUnavailableError

    if isinstance(exc, WeightsUnavailableError):
        return (f"--vlm.pretrained {exc.tag}: the weights of {exc.model} are not in the local cache and "
                f"cannot be downloaded ({exc.reason}). A download is cached in {exc.cache}: copy it there "
                "from a machine with network access, or pass a checkpoint file with --vlm.pretrained "
                "PATH (OpenAI's original .pt archives with --vlm.model RN50-quickgelu or the like); "
                "--vlm.pretrained none runs with random weights, whose rewards mean nothing.")
    return " ".join(line.strip() for line in str(exc).splitlines())


def main(argv: list[str] | None = None) -> None:
    from furl_fast._cli import setup_logging

    setup_logging()
    try:
        args = parse_args(argv)
    except ValueError as exc:  # a --resume without a readable run
        print(f"furl_fast.train: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("furl_fast.train: interrupted while starting; nothing was written.", file=sys.stderr)
        sys.exit(130)
    sys.exit(train(args.config, wandb_project=args.wandb_project_name if args.track else None,
                   wandb_entity=args.wandb_entity))


if __name__ == "__main__":
    main()
