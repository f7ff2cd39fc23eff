"""`python -m furl_fast.train`: FuRL and its baselines (sac, vlm, relay) on sparse-reward
Meta-World, or on any Gymnasium env.

    python -m furl_fast.train --algo furl --task drawer-open --seed 0
    python -m furl_fast.train --preset paper --algo sac --task reach
    python -m furl_fast.train --algo vlm --reward binary --reward.threshold 0.3 --task reach
    python -m furl_fast.train --suite gymnasium --task CartPole-v1 --algo vlm --vlm.prompt "a pole"
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
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import tyro

from furl_fast._cli import format_seconds
from furl_fast.config import PRESETS, REWARD_CONFIG_CLASSES, REWARDS, Config, config_to_dict, resolve_device
from furl_fast.envs.steps import Transition, env_states, split_obs, vector_step
from furl_fast.evaluate import env_options, evaluate_policy, make_eval_env, summarize
from furl_fast.runs import (
    CHECKPOINT_DIR,
    atomic_write_text,
    prepare,
    remove_temporaries,
    rng_state,
    saved_config,
    seed_everything,
    set_rng_state,
    write_checkpoint,
    write_video,
)

logger = logging.getLogger("furl_fast.train")


# ---- the command line ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Args:
    """The command line: --preset, then every Config field under its own name."""

    preset: Literal["laptop", "paper"] = "laptop"  # the keys of config.PRESETS
    """The defaults every other flag starts from: laptop (CPU-friendly, 100k steps) or paper (the FuRL
    paper's settings: 1M steps, replay 500k for furl and 1M for the baselines, Meta-World's own
    visuals, the paper's VLM LIV; --vlm.model NAME picks another). Flags given always win over the
    preset."""
    track: bool = False
    """Track the run with Weights & Biases (pip install "furl_fast[track]"): config and every
    TensorBoard scalar; WANDB_MODE=offline keeps it local (wandb sync uploads it later)."""
    wandb_project_name: str = "furl_fast"
    """The W&B project of --track."""
    wandb_entity: str | None = None
    """The W&B team or user of --track; None: your default entity."""
    allow_many_envs: bool = False
    """Start even with more --num-envs than this machine holds (more than 4 env workers per CPU core,
    or more than its available memory at the measured size of one worker)."""
    config: Annotated[Config, tyro.conf.arg(name="")] = Config()


def parse_config(argv: list[str] | None = None) -> Config:
    """--preset NAME chooses the defaults, tyro parses every Config field on top of them."""
    return parse_args(argv).config


def parse_args(argv: list[str] | None = None) -> _Args:
    """The command line. With --resume RUN the defaults are RUN's saved configuration instead of a
    preset, so the flags given are exactly the changes (prepare() checks them against RESUMABLE)."""
    from furl_fast._cli import tyro_cli

    argv = sys.argv[1:] if argv is None else list(argv)
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
    return tyro_cli(_Args, prog="python -m furl_fast.train", description=__doc__,
                    args=reward_subcommand(argv, default.reward),
                    default=_Args(preset, config=default))


def reward_subcommand(argv: list[str], default_reward: Any) -> list[str]:
    """`--reward NAME [--reward.OPTION VALUE ...]` anywhere on the command line, rewritten into
    tyro's form for the reward's config (a subcommand): the other flags, then `reward:NAME`, then
    the reward's own options. NAME may be spelled with - or _ (goal-baseline, goal_baseline). With
    --reward, --help shows that reward's options."""
    rest, options, name = [], [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--reward" and i + 1 < len(argv):
            name, i = argv[i + 1], i + 2
        elif arg.startswith("--reward="):
            name, i = arg.split("=", 1)[1], i + 1
        elif arg.startswith("--reward."):
            options.append(arg)
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):  # its values
                options.append(argv[i])
                i += 1
        else:
            rest.append(arg)
            i += 1
    if name is None and options:
        if default_reward.name == "auto":
            raise ValueError(f"{options[0]} needs --reward NAME before it (one of {', '.join(REWARDS)}).")
        name = default_reward.name
    if name is None:
        return rest
    name = name.replace("-", "_")
    if name not in REWARD_CONFIG_CLASSES:
        raise ValueError(f"--reward {name} is unknown; use one of auto, {', '.join(REWARDS)}.")
    helps = [a for a in rest if a in ("-h", "--help")]
    rest = [a for a in rest if a not in helps]
    return [*rest, "reward:" + name.replace("_", "-"), *options, *helps]


def check_config(cfg: Config, allow_many_envs: bool = False) -> None:
    """Everything that can be checked before any work starts (and before torch or the VLM load);
    raises ValueError saying what to change. allow_many_envs: skip too_many_envs."""
    from furl_fast.envs import get_suite

    suite = get_suite(cfg.suite)
    try:
        cfg.validate(suite)
    except ValueError as exc:
        raise ValueError(f"{exc} (python -m furl_fast.train --help lists every flag)") from None
    problem = None if allow_many_envs else too_many_envs(cfg.num_envs, pixels=cfg.agent == "drq")
    if problem is not None:
        raise ValueError(problem)
    if cfg.loads_encoder and cfg.vlm.prompt is None and suite.prompt(cfg.task) is None:
        raise ValueError(f"--task {cfg.task} has no built-in prompt in the {cfg.suite} suite; describe "
                         'its goal for the VLM with --vlm.prompt "..." (a short sentence saying what '
                         "success looks like).")
    if cfg.resolved_reward == "code":
        from furl_fast.rewards.code import SandboxLimits, SandboxUnavailable, check_isolation

        code = cfg.reward_config
        if code.programs is not None and code.trust_programs:
            logger.warning("--reward.trust-programs: the programs in %s are trusted; where the "
                           "sandbox's OS-level isolation cannot be set up they run without it",
                           code.programs)
        try:
            check_isolation(SandboxLimits(isolation=code.isolation))
        except SandboxUnavailable as exc:
            raise ValueError(f"--reward.programs {code.programs}: {exc}; only for a file you trust, "
                             "--reward.trust-programs runs it without that isolation.") from None
        verify_code_reward(cfg, suite)


# Memory of one env worker process (its proportional set size, PSS), measured on Meta-World reach
# with fast rendering: a state env that renders VLM frames (~260 MiB; ~125 MiB without frames), and a
# DrQ env rendering 84x84 frame stacks (~645 MiB). Other suites' envs may take more.
ENV_WORKER_BYTES = {"state": 300 << 20, "pixels": 700 << 20}
ENVS_PER_CORE = 4  # more workers than this only wait for a core: no faster, much more memory


def too_many_envs(num_envs: int, pixels: bool) -> str | None:
    """Why this machine cannot hold num_envs env worker processes (one per env when num_envs > 1),
    or None: at most ENVS_PER_CORE per usable CPU core, and num_envs workers of ENV_WORKER_BYTES
    within the memory available now (Linux; elsewhere only the core rule)."""
    if num_envs <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker = ENV_WORKER_BYTES["pixels" if pixels else "state"]
    need = num_envs * worker
    available = _available_memory()
    if num_envs > ENVS_PER_CORE * cores:
        why = f"more than {ENVS_PER_CORE} env workers per CPU core ({cores} cores here)"
    elif available is not None and need > available:
        why = (f"its env workers take about {need / 2**30:.1f} GiB (~{worker >> 20} MiB each), "
               f"more than the {available / 2**30:.1f} GiB of memory available")
    else:
        return None
    return (f"--num-envs {num_envs} is too many for this machine: {why}; lower --num-envs, or pass "
            "--allow-many-envs to start anyway.")


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (MemAvailable of /proc/meminfo), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def verify_code_reward(cfg: Config, suite) -> None:
    """--reward code: load the program set and verify it on the suite's expert and full-length random
    rollouts (the report cached by set content, task, seed and settings, so a resume or a sweep reuses
    it). ValueError with the report's numbers when it fails, unless --reward.allow-unverified."""
    from furl_fast.rewards.code import (RolloutSettings, SandboxLimits, VerifierConfig,
                                        load_program_set, verify_on_suite)
    from furl_fast.vlm.encoder import default_cache_dir

    rc = cfg.reward_config
    programs = load_program_set(cfg.task, rc.programs, suite.reference_programs(cfg.task))
    if rc.verify_expert < 1 or rc.verify_random < 1:
        raise ValueError("--reward.verify-expert and --reward.verify-random must be >= 1.")
    source = f"--reward.programs {rc.programs}" if rc.programs else \
        f"the hand-written reference programs of {cfg.task}"
    settings = RolloutSettings(num_expert=rc.verify_expert, num_random=rc.verify_random, seed=cfg.seed,
                               goal=cfg.goal, fast_render=cfg.render_quality == "fast",
                               options=tuple(sorted(cfg.suite_options.items())))
    try:
        report = verify_on_suite(programs, suite, suite.canonical_task(cfg.task), settings,
                                 VerifierConfig(limits=SandboxLimits(isolation=rc.isolation)),
                                 cache_dir=default_cache_dir())
    except ValueError as exc:
        if not rc.allow_unverified:
            raise ValueError(f"{source}: cannot verify the set ({exc}); --reward.allow-unverified "
                             "trains on it unverified.") from None
        logger.warning("%s: not verified (%s); training anyway (--reward.allow-unverified)", source, exc)
        return
    if report.accepted:
        logger.info("%s: verified: %s", source, report.one_line())
    elif rc.allow_unverified:
        logger.warning("%s failed verification, training anyway (--reward.allow-unverified): %s",
                       source, report.one_line())
    else:
        raise ValueError(f"{source} failed verification: {report.one_line()}; fix the set "
                         "(python -m furl_fast.generate_programs) or pass --reward.allow-unverified.")


# ---- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Owns everything a run needs and the loop that drives it; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, encoder=None):
        # torch is imported here, not with the module: a command line with a mistake is refused
        # without the seconds torch takes to load.
        global torch
        import torch

        from furl_fast.agents.drq import DrQV2
        from furl_fast.agents.ensemble import SACEnsemble
        from furl_fast.agents.relay import RelaySchedule
        from furl_fast.agents.sac import SAC
        from furl_fast.envs import get_suite
        from furl_fast.replay import ReplayBuffer

        self.cfg, self.run_dir = cfg, run_dir
        self.suite = get_suite(cfg.suite)
        self.task = self.suite.canonical_task(cfg.task)
        self.timings: dict[str, float] = {}  # seconds per phase, for --profile
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)

        # The VLM reward (None for algo=sac): a furl_fast.rewards.RewardModel built from its config.
        # The buffer keeps what it observes of every observation (an image embedding, or the code
        # reward's progress) and the critic's reward adds rho * its reward of those stored values.
        self.encoder, self.reward = encoder, None
        if cfg.reward_config is not None:
            from furl_fast.rewards import RewardContext, build_reward

            context = RewardContext(encoder=encoder, task=self.task,
                                    prompt=cfg.vlm.prompt or self.suite.prompt(self.task),
                                    suite=self.suite, num_envs=cfg.num_envs, device=self.device,
                                    seed=cfg.seed, furl=cfg.furl, goal_frame=self.goal_frame)
            self.reward = build_reward(cfg.reward_config, context)

        import gymnasium as gym

        # DrQ: one render per step gives both the agent's stacked 84x84 pixels and the VLM frame.
        self.pixels = cfg.agent == "drq"
        # Steps (self.step, total/warm-up/eval/log/checkpoint intervals) count simulator steps; an
        # agent step (one action, one transition) is `repeat` of them.
        self.repeat = cfg.drq.action_repeat if self.pixels else 1
        # Rewards that never read frames (code programs that read only states) spare the render.
        self.vlm_frames = self.reward is not None and self.reward.reads_frames
        self.envs = self.suite.make_vector_env(
            self.task, cfg.num_envs, seed=cfg.seed, goal=cfg.goal, vlm_frames=self.vlm_frames,
            asynchronous=cfg.num_envs > 1, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
            **env_options(cfg))
        self.eval_env = make_eval_env(cfg)
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
        # Capacity counts observation slots: each episode also stores its final observation.
        self.max_episode_steps = self.suite.max_episode_steps(self.task, **cfg.suite_options)
        episode_steps = self.max_episode_steps // self.repeat
        capacity = cfg.resolved_buffer_size + cfg.resolved_buffer_size // episode_steps + 2 * cfg.num_envs
        self.buffer = ReplayBuffer(capacity, stored_shape, act_dim,
                                   frame_stack=cfg.drq.frame_stack if self.pixels else 1,
                                   shift_pad=cfg.drq.shift_pad,
                                   embedding_dim=0 if self.reward is None else self.reward.stored_width,
                                   embedding_dtype=torch.float16 if self.reward is None else
                                   self.reward.stored_dtype,
                                   n_step=(cfg.drq if self.pixels else cfg.sac).n_step,
                                   gamma=(cfg.drq if self.pixels else cfg.sac).gamma,
                                   num_envs=cfg.num_envs,
                                   device=self.device, seed=cfg.seed)
        # The encoder runs beside the learner: a thread (torch ops release the GIL) and, on a GPU, its
        # own stream, so the frames of step t are encoded while step t's updates run.
        overlap = cfg.overlap_encode and cfg.loads_encoder
        self.encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode") if overlap else None
        self.encode_stream = torch.cuda.Stream(self.device) if overlap and self.device.type == "cuda" \
            else None
        self.step = 0
        self.episodes = 0
        self.relay_positives = 0  # what ends relay: positive frames (furl), success steps (relay)
        self.last_eval_step = -1
        self.recent_success: deque[float] = deque(maxlen=20)

    # -- pieces --------------------------------------------------------------------------------

    def goal_frame(self) -> np.ndarray:
        """FuRL's goal image, (H, W, 3) uint8, from the suite (Meta-World: the scripted expert's first
        success frame with the seed and goal setting of training, rendered as every frame is)."""
        return self.suite.goal_frame(self.task, seed=self.cfg.seed, goal=self.cfg.goal,
                                     fast_render=self.cfg.render_quality == "fast",
                                     **self.cfg.suite_options)

    def reward_inputs(self, states: np.ndarray, frames: np.ndarray | None, env_ids) -> torch.Tensor:
        """What the buffer keeps per observation of envs env_ids (reward.observe), on the training
        device."""
        with self.timed("encode" if self.cfg.loads_encoder else "code"):
            return self.reward.observe(None if frames is None else frames[env_ids], states[env_ids],
                                       np.asarray(env_ids)).to(self.device)

    def reward_inputs_later(self, states: np.ndarray, frames: np.ndarray | None,
                            env_ids) -> Callable[[], torch.Tensor]:
        """reward_inputs, started now in the encode thread (when overlap_encode); call the result to
        wait for it. frames must stay unchanged until then."""
        if self.encode_pool is None:
            inputs = self.reward_inputs(states, frames, env_ids)
            return lambda: inputs

        def encode_on_side_stream() -> torch.Tensor:
            with torch.cuda.stream(self.encode_stream):  # None (CPU): a no-op
                return self.reward_inputs(states, frames, env_ids)

        future = self.encode_pool.submit(encode_on_side_stream)

        def wait() -> torch.Tensor:
            with self.timed("encode_wait"):
                embs = future.result()
            if self.encode_stream is not None:  # later kernels read embs on the main stream
                torch.cuda.current_stream(self.device).wait_stream(self.encode_stream)
                embs.record_stream(torch.cuda.current_stream(self.device))
            return embs

        return wait

    def timed(self, name: str):
        return _Timer(self.timings, name, self.cfg.profile and self.device.type == "cuda")

    def random_actions(self, n: int) -> np.ndarray:
        return np.random.uniform(self.act_low, self.act_high, (n, len(self.act_low))).astype(np.float32)

    def stored(self, obs: np.ndarray) -> np.ndarray:
        """What the buffer keeps of observations (one, or a batch): the newest frame of each pixel
        stack (C, H, W are the last three axes), or the state."""
        return obs[..., -self.frame_channels:, :, :] if self.pixels else obs

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
            if self.reward is not None:
                # The reward as it is before this step's update (FuRL's spec: pre-update heads).
                vlm, per_step = nstep_vlm_reward(batch, self.reward.reward_from_embeddings)
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
        if self.reward is not None:
            with self.timed("heads"):  # what the reward trains (FuRL's heads)
                metrics.update(self.reward.update(batch, log=log))
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
        if self.reward is not None:
            self.reward.reset(env_ids)
        embs = self.reward_inputs(env_states, frames, env_ids) if self.reward is not None else None
        for k, e in enumerate(env_ids):
            self.buffer.start_episode(self.stored(obs[e]), embedding=None if embs is None else embs[k],
                                      env=int(e))
            # The embedding buffer labels the frame after each step with that step's success flag.
            self.ep_return[e], self.ep_env_return[e] = 0.0, 0.0
            self.ep_success[e], self.ep_embs[e] = [], []
        if self.schedule is not None:
            self.schedule.begin_episode(env_ids)

    def finish_episode(self, e: int) -> dict[str, float]:
        """The episode's metrics: episode_return sums the task reward the critic learns from (before
        the VLM term), episode_env_return the env's own reward (Meta-World's shaped one, whatever
        --env-reward), episode_length counts agent steps."""
        success = np.asarray(self.ep_success[e], dtype=bool)
        self.episodes += 1
        self.recent_success.append(float(success[-1]))
        if self.reward is not None:
            self.reward.end_episode(torch.stack(self.ep_embs[e]), success)
        if self.schedule is not None:
            from furl_fast.agents.relay import relay_stop_count

            self.relay_positives += relay_stop_count(self.cfg.algo, success)
            self.schedule.observe_positives(self.relay_positives)
        return {"charts/episode_return": self.ep_return[e],
                "charts/episode_env_return": self.ep_env_return[e],
                "charts/episode_length": len(success), "charts/episode_success": float(success[-1]),
                "charts/episode_ever_success": float(success.any()), "charts/episodes": self.episodes}

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop_flag: list[int]) -> int:
        """Trains until total_steps (returns 0) or a signal (checkpoints, returns 128 + signum)."""
        from tqdm import tqdm

        from furl_fast.metrics import MetricsWriter

        cfg, n = self.cfg, self.cfg.num_envs
        writer = MetricsWriter(self.run_dir, resume_step=self.step if self.step > 0 else None,
                               config=config_to_dict(cfg))
        self.ep_return, self.ep_env_return = [0.0] * n, [0.0] * n
        self.ep_success: list[list[bool]] = [[] for _ in range(n)]
        self.ep_embs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for e in range(n):  # a resumed run's interrupted episodes end where the checkpoint was
            self.buffer.truncate_episode(e)
        obs, info = self.envs.reset(seed=cfg.seed + self.episodes)
        states, frames = split_obs(obs)
        self.start_episodes(states, frames, env_states(states, info), np.arange(n))
        print(self.expectation_line(), flush=True)  # before the bar: it would overwrite the bar
        bar = tqdm(total=cfg.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None, desc=f"{cfg.algo} {cfg.task}")
        stride = n * self.repeat  # simulator steps per vector step
        log_every = max(cfg.log_every, stride)
        log_updates = False  # the next update's losses go to the log (DrQ-v2 skips agent steps)
        if self.step == 0 and self.last_eval_step != 0:
            # The untrained policy, as FuRL's release evaluates it: curves start at step 0. (A
            # resume continues past it.)
            writer.log(0, self.evaluate(writer))
        t_start, step_start = time.perf_counter(), self.step
        t_line, step_line = t_start, self.step  # the plain progress line's rate: since the last one
        try:
            while self.step < cfg.total_steps:
                if stop_flag:
                    self.save_checkpoint()
                    self.say(f"stopped by signal {stop_flag[0]} at step {self.step}; checkpoint saved. "
                             f"Resume with: python -m furl_fast.train --resume {self.run_dir}")
                    return 128 + stop_flag[0]
                self.sync_agent_steps()
                with self.timed("act"):
                    actions = self.random_actions(n) if self.step < cfg.resolved_warmup_steps else \
                        self.policy_actions(states)
                with self.timed("env"):
                    tr = vector_step(self.envs, actions)
                inputs = self.reward_inputs_later(tr.next_states, tr.next_frames, np.arange(n)) \
                    if self.reward is not None else lambda: None
                self.step += stride
                log = self.step // log_every != (self.step - stride) // log_every
                log_updates |= log
                if self.step >= cfg.resolved_warmup_steps and len(self.buffer) >= cfg.batch_size:
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
                        self.say(self.profile_line())
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
        with self.timed("buffer"):
            self.buffer.add_batch(self.stored(tr.next_obs), actions, tr.reward, tr.terminated, tr.truncated,
                                  success=tr.success, embedding=embs)
        for e in range(self.cfg.num_envs):
            self.ep_return[e] += float(tr.reward[e])
            self.ep_env_return[e] += float(tr.env_reward[e])
            self.ep_success[e].append(bool(tr.success[e]))
            if embs is not None:  # the reward sees whole episodes at their end
                self.ep_embs[e].append(embs[e])

    @staticmethod
    def say(line: str) -> None:
        """A line on stdout, above the progress bar while one shows (tqdm.write)."""
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

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
        """The deterministic policy's evaluation (furl_fast.evaluate.evaluate_policy) at this step,
        written to eval.json; the first episode is recorded as a video (also to writer's TensorBoard,
        every 4th frame at half size)."""
        def video(_k: int, frames: list[np.ndarray]) -> None:
            write_video(self.run_dir / "videos" / f"eval_step{self.step:08d}", frames)
            if writer is not None:
                writer.log_video("eval/video", [f[::2, ::2] for f in frames[::4]], self.step, fps=30 // 4)

        def act(obs: np.ndarray) -> np.ndarray:
            return self.agent.act(obs, deterministic=True).cpu().numpy()

        episodes = evaluate_policy(act, self.eval_env, self.cfg, self.step,
                                   videos=int(self.cfg.eval_video), on_video=video)
        self.last_eval_step = self.step
        result = summarize(episodes)
        atomic_write_text(self.run_dir / "eval.json", json.dumps({"step": self.step, **result}, indent=2))
        return result

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Atomic (furl_fast.runs.write_checkpoint): a crash at any point leaves a consistent pair of
        state.pt and the replay file it names."""
        from furl_fast.agents.ensemble import split_state_dict

        # The ensemble's members are saved as the separate SAC agents they stand for.
        agents = split_state_dict(self.ensemble.state_dict()) if self.ensemble is not None else \
            [self.agent.state_dict(), None if self.relay_agent is None else self.relay_agent.state_dict()]
        state = {
            "step": self.step, "episodes": self.episodes,
            "relay_positives": self.relay_positives, "last_eval_step": self.last_eval_step,
            "recent_success": list(self.recent_success),
            "agent": agents[0],
            "relay_agent": agents[1],
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "reward": None if self.reward is None else self.reward.state_dict(),
            "rng": rng_state(),
        }
        return write_checkpoint(self.run_dir, state, self.buffer if self.cfg.checkpoint_replay else None,
                                self.step)

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
        if self.reward is not None:
            self.reward.load_state_dict(state["reward"])
        set_rng_state(state["rng"])

    def close(self) -> None:
        self.envs.close()
        self.eval_env.close()
        if self.reward is not None:
            self.reward.close()
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


def load_vlm(cfg: Config):
    """The frozen VLM, cropping frames as the suite's VLM frames need; fails fast (RuntimeError /
    FileNotFoundError / ValueError) without weights."""
    from furl_fast.envs import get_suite
    from furl_fast.vlm import load_encoder

    return load_encoder(cfg.vlm.model, cfg.vlm.pretrained, device=resolve_device(cfg.device),
                        precision=cfg.vlm.precision, bgr=cfg.vlm.bgr, cache_dir=cfg.vlm.cache_dir,
                        crop=get_suite(cfg.suite).crop)


def train(cfg: Config, wandb_project: str | None = None, wandb_entity: str | None = None,
          allow_many_envs: bool = False) -> int:
    """Runs (or resumes) one training run; returns the process exit code (2: it could not start,
    with a one-line message on stderr and no run directory made; 1: a file of the run could not be
    written (a full disk, a path of the wrong kind), with a one-line message naming it; 128 + signal
    number: stopped by SIGINT or SIGTERM, with a checkpoint once training has started, with nothing
    written before). The run directory is locked while the run writes it (runs.lock_run_dir): a
    second run or resume of it is refused. wandb_project: track the run with Weights & Biases in that
    project (metrics.start_wandb). allow_many_envs: see too_many_envs."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from furl_fast.envs import get_suite

    # SIGINT / SIGTERM only set a flag: start-up looks at it between its phases (a KeyboardInterrupt
    # raised inside MuJoCo's renderer, a worker start or a weights load could leave a half-built
    # object or a hung worker behind), the training loop before every step. A second SIGINT during
    # start-up interrupts at once.
    stop: list[int] = []
    starting = True

    def on_signal(signum: int, _frame) -> None:
        stop.append(signum)
        if starting and stop.count(signal.SIGINT) > 1:
            raise KeyboardInterrupt

    def interrupted() -> None:
        if stop:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = lock = None
    try:
        try:
            check_config(cfg, allow_many_envs)
            cfg, run_dir, state, lock = prepare(cfg, get_suite(cfg.suite).short_name(cfg.task))
            if wandb_project is not None:
                from furl_fast.metrics import require_wandb

                require_wandb()
            import torch

            if cfg.torch_threads is not None:
                torch.set_num_threads(cfg.torch_threads)
            loading = "the VLM and the environments" if cfg.loads_encoder else "the environments"
            vlm = f"{cfg.vlm.model} ({cfg.vlm.pretrained or 'default weights'})" if cfg.loads_encoder \
                else "none"
            print(f"furl_fast.train: {'resuming' if state is not None else 'starting'} {cfg.algo} "
                  f"{cfg.task} in {run_dir} ({cfg.algo}-{cfg.agent}, seed {cfg.seed}, VLM {vlm}, render "
                  f"quality {cfg.render_quality}, env reward {cfg.env_reward}; loading {loading})",
                  flush=True)
            interrupted()
            encoder = None
            if cfg.loads_encoder:
                from furl_fast.vlm.encoder import WeightsUnavailableError

                try:
                    encoder = load_vlm(cfg)
                except WeightsUnavailableError as exc:
                    raise ValueError(cli_message(exc)) from exc
            interrupted()
            trainer = Trainer(cfg, run_dir, encoder)
            interrupted()
            if state is not None:
                trainer.load_checkpoint(state)
            interrupted()
            # Only now, with everything ready: a run that cannot start leaves no directory behind
            # (the lock's release removes what it made). A resume rewrites config.json with the
            # changes it made: total_steps, cadences, device.
            resolved = config_to_dict(dataclasses.replace(cfg, resume=None))
            atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2))
            starting = False
        except (KeyboardInterrupt, ValueError, OSError) as exc:
            if trainer is not None:
                trainer.close()
            if isinstance(exc, KeyboardInterrupt):
                print("furl_fast.train: interrupted while starting; nothing was written.",
                      file=sys.stderr)
                return 128 + (stop[0] if stop else signal.SIGINT)
            print(f"furl_fast.train: {cli_message(exc)}", file=sys.stderr)
            return 2
        if state is not None:
            logger.info("resumed %s at step %d", run_dir, trainer.step)
        tracker = None
        if wandb_project is not None:
            from furl_fast.metrics import start_wandb

            tracker = start_wandb(run_dir, config_to_dict(cfg), project=wandb_project,
                                  entity=wandb_entity)
        try:
            with logging_redirect_tqdm():  # log records above the progress bar, not through it
                code = trainer.run(stop)
        except OSError as exc:  # a full disk, a read-only file system, a path of the wrong kind
            remove_temporaries(run_dir)
            print(f"furl_fast.train: {write_error_message(exc, run_dir, trainer.step)}",
                  file=sys.stderr)
            code = 1
        finally:
            trainer.close()
            if tracker is not None:
                tracker.finish()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock is not None:
            lock.release(discard=starting)
    if code == 0:
        print(f"done: {trainer.step} steps, run directory {run_dir}")
    return code


def write_error_message(exc: OSError, run_dir: Path, step: int) -> str:
    """One line for a write that failed during training: the path, the cause, what to do."""
    from furl_fast.runs import STATE_FILE

    path = exc.filename or f"a file in {run_dir}"
    checkpoint = run_dir / CHECKPOINT_DIR / STATE_FILE
    after = f"--resume {run_dir} continues from its last checkpoint" if checkpoint.exists() else \
        "start it again (it has no checkpoint yet)"
    return (f"cannot write {path}: {exc.strerror or exc} (at step {step}); the run stopped. Fix that "
            f"(free disk space, make the path writable), then {after}.")


def cli_message(exc: BaseException) -> str:
    """One line saying what to change, in terms of the command line's flags."""
    if not isinstance(exc, RuntimeError):  # the VLM's WeightsUnavailableError is a RuntimeError
        return " ".join(line.strip() for line in str(exc).splitlines())
    from furl_fast.vlm.encoder import LIV, LIV_HUB_FILE, LIV_HUB_REPO, WeightsUnavailableError

    if isinstance(exc, WeightsUnavailableError) and exc.model == LIV:
        return (f"--vlm.model liv: LIV's weights ({LIV_HUB_FILE} of the Hugging Face hub repo "
                f"{LIV_HUB_REPO}) are not in the local cache and cannot be downloaded "
                f"({exc.reason}). "
                f"Download {exc.url} on a machine with network access and pass it with "
                "--vlm.pretrained /path/to/model.pt; "
                "--vlm.model RN50 runs OpenAI's CLIP instead (set --furl.phase-a-gap for its "
                "embeddings); --vlm.pretrained none runs with random weights, whose rewards mean "
                "nothing.")
    if isinstance(exc, WeightsUnavailableError):
        name = exc.url.rsplit("/", 1)[-1]
        model = "" if exc.file_model == exc.model else f"--vlm.model {exc.file_model} "
        return (f"--vlm.pretrained {exc.tag}: the weights of {exc.model} are not in the local cache and "
                f"cannot be downloaded ({exc.reason}). Download {exc.url} on a machine with network "
                f"access and pass it with {model}--vlm.pretrained /path/to/{name}; "
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
                   wandb_entity=args.wandb_entity, allow_many_envs=args.allow_many_envs))


if __name__ == "__main__":
    main()
