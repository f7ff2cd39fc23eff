"""The trainer behind `python -m furl_fast.train`: everything a run needs, and the loop that drives it.

Trainer(cfg, run_dir, encoder) builds the environments, the agent(s), the reward model and the
replay buffer; run() collects, updates, evaluates, logs and checkpoints until cfg.total_steps;
load_checkpoint() continues an interrupted run. furl_fast.train checks the command line before it
imports this module, so that a mistake is reported without the seconds torch takes to load.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from furl_fast._cli import format_seconds
from furl_fast.config import Config, config_to_dict, resolve_device
from furl_fast.envs.steps import Transition, env_states, split_obs, vector_step
from furl_fast.evaluate import env_options, evaluate_policy, make_eval_env, summarize
from furl_fast.runs import (
    CHECKPOINT_DIR,
    atomic_write_text,
    rng_state,
    seed_everything,
    set_rng_state,
    write_checkpoint,
    write_video,
)

logger = logging.getLogger("furl_fast.train")

# Simulator steps per second measured on a 2-core CPU, 1 torch thread, one env (README, "What to
# expect"): state SAC without a VLM, state SAC with RN50 rewards (encoding is ~75% of it), DrQ
# (0.6 agent steps/s at action repeat 2).
CPU_STEPS_PER_SECOND = {"state": 60.0, "vlm": 7.0, "drq": 1.2}



class Trainer:
    """Owns everything a run needs and the loop that drives it; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, encoder=None):
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


