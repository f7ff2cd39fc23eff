"""Typed run configuration: nested frozen dataclasses with a docstring per field (tyro shows them as
the CLI help). `Config()` is the laptop-friendly default; `PRESETS["paper"]` holds the FuRL paper's
settings. Call `Config.validate()` before any training starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

ALGOS = ("sac", "vlm", "relay", "furl")
AGENTS = ("sac", "drq")
REWARDS = ("furl", "cosine", "goal_baseline", "binary", "code")
GOALS = ("fixed", "random")
ENV_REWARDS = ("sparse", "dense")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class SACConfig:
    """Soft actor-critic (both the FuRL agent and the relay agent)."""

    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the actor and of each of the twin critics."""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 1e-4
    """Adam learning rate of the twin critics."""
    alpha_lr: float = 1e-4
    """Adam learning rate of the entropy temperature log(alpha)."""
    gamma: float = 0.99
    """Discount factor (the replay buffer folds gamma^n * (1 - terminated) into each batch)."""
    n_step: int = 1
    """n-step returns computed by the replay buffer; FuRL uses 1-step TD."""
    tau: float = 0.01
    """Polyak rate of the target critics, applied after every critic step."""
    init_alpha: float = 1.0
    """Initial entropy temperature alpha."""
    target_entropy: float | None = None
    """Target policy entropy; None means -act_dim / 2 (the FuRL setting)."""
    std_min: float = 1e-3
    """Added to softplus(.) for the policy's standard deviation, so it never collapses to 0."""
    compile: bool = False
    """torch.compile the update's loss computation (and its backward); on CUDA as a CUDA graph
    (mode "reduce-overhead"). Off by default: on a CPU it measured slower than eager (see
    benchmarks/README.md), on a GPU it is not measured yet."""


@dataclass(frozen=True)
class DrQConfig:
    """Pixel-based agent (agent=drq): DrQ-v2-style defaults (FuRL's pixel baseline)."""

    image_size: int = 84
    """Side of the square RGB observation the agent sees."""
    frame_stack: int = 3
    """Consecutive frames stacked along channels."""
    action_repeat: int = 2
    """Environment steps per agent action."""
    shift_pad: int = 4
    """Random-shift augmentation: replicate pad, then a random crop back to image_size."""
    feature_dim: int = 50
    """Width of the encoder's output (after Linear + LayerNorm + tanh), the actor's and critics' input."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Conv encoder precision: bf16 autocast of the conv stack (float32 weights and optimiser) or
    fp32; auto = bf16 on CUDA, fp32 on CPU (where bf16 convolutions are rarely faster)."""


@dataclass(frozen=True)
class FuRLConfig:
    """Reward alignment (the projection heads and their ranking losses) and relay RL."""

    head_hidden: int = 256
    """Hidden width of the image and text projection heads."""
    head_out: int = 64
    """Output width of the projection heads (the space the cosine reward is taken in)."""
    head_lr: float = 1e-4
    """Adam learning rate of the one optimiser over both heads."""
    pair_batch: int = 256
    """Samples per head update: replay embeddings in phase A, (positive, negative, lag) triples in B."""
    phase_a_gap: float = 0.25
    """Phase A: frame i must be closer to the goal image than frame j by this L2 distance to rank."""
    phase_a_margin: float = 0.1
    """Phase A: hinge margin on c_i - c_j."""
    phase_b_margin: float = 0.1
    """Phase B: hinge margin for positive vs negative and positive vs lag frame."""
    lag: int = 10
    """Phase B: the lag frame is this many steps earlier in the same episode as its positive."""
    positive_capacity: int = 20_000
    """Embedding buffer: positive frames kept (FIFO)."""
    negative_capacity: int = 20_000
    """Embedding buffer: negative frames kept (FIFO)."""
    relay_stop_positives: int = 2_500
    """Relay RL stops for good once this many positive frames have been stored."""
    relay_k_choices: tuple[int, ...] = (50, 100, 150, 200)
    """Relay RL: per episode, control alternates every K steps, K drawn from these."""
    relay_noise_std: float = 0.2
    """Relay RL: std of the Gaussian noise added to the relay agent's actions (then clipped)."""


@dataclass(frozen=True)
class VLMConfig:
    """The frozen vision-language model that embeds frames and the task text."""

    model: str = "RN50"
    """open_clip architecture name (RN50 is the closest to the paper's LIV)."""
    pretrained: str = "openai"
    """open_clip pretrained tag, a local checkpoint path, or 'none' for random weights (meaningless
    rewards; for tests and throughput only)."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Encoder precision; auto = fp16 on CUDA, fp32 on CPU."""
    bgr: bool = False
    """Feed channels in BGR order like FuRL's release (a quirk kept for parity)."""
    prompt: str | None = None
    """Task description for the text encoder; None takes the task's prompt from the task table."""
    cache_dir: str | None = None
    """Where text embeddings are cached; None uses $FURL_FAST_CACHE or ~/.cache/furl_fast. (Downloaded
    weights go to open_clip's own cache.)"""


@dataclass(frozen=True)
class Config:
    """One training run."""

    algo: Literal["sac", "vlm", "relay", "furl"] = "furl"
    """sac: sparse reward only; vlm: + raw VLM reward; relay: raw VLM + relay RL; furl: aligned + relay."""
    agent: Literal["sac", "drq"] = "sac"
    """sac: state-based SAC; drq: pixel-based DrQ-v2-style SAC."""
    reward: Literal["furl", "cosine", "goal_baseline", "binary", "code"] | None = None
    """VLM reward family; left unset: furl for algo=furl, cosine for vlm and relay (unused by sac)."""
    code_programs: str | None = None
    """reward=code: a program-set JSON file (ProgramSet.save's format, e.g. a set that
    furl_fast.rewards.code.generate_program_set verified); None takes the task's hand-written
    reference set (drawer-open, button-press-topdown, reach, ...)."""
    task: str = "drawer-open"
    """Meta-World v3 task name (any of the 50; "drawer-open-v3" works too)."""
    goal: Literal["fixed", "random"] = "fixed"
    """fixed: hidden goal, same scene every reset; random: goal in the state, resampled each reset."""
    env_reward: Literal["sparse", "dense"] = "sparse"
    """The environment's reward in the critic: sparse (success - 1, FuRL's setting) or dense
    (Meta-World's own shaped reward: the oracle upper bound, and a check without any VLM weights that
    the RL stack learns the task). VLM rewards are added on top of it (weight rho)."""
    seed: int = 0
    """Seed of the environment, networks, replay sampling and relay schedule."""
    total_steps: int = 100_000
    """Environment steps (transitions) to train for; with --agent drq each is drq.action_repeat
    simulator steps (logged as charts/env_frames)."""
    warmup_steps: int = 2_000
    """Uniform-random actions before learning starts."""
    batch_size: int = 256
    """Replay batch size of every SAC update."""
    buffer_size: int | None = 100_000
    """Replay capacity in transitions; None means 500,000 for furl and 1,000,000 otherwise (the FuRL
    paper's sizes)."""
    rho: float = 0.05
    """Weight of the VLM reward: critic reward = (success - 1) + rho * vlm_reward."""
    eval_every: int = 10_000
    """Environment steps between evaluations of the deterministic policy."""
    eval_video: bool = True
    """Record the first episode of every evaluation as a video (videos/); rendering it costs about
    as much as 500 steps of a state-based run on a CPU."""
    eval_episodes: int | None = None
    """Episodes per evaluation; None means 1 for a fixed goal, 10 for random goals."""
    log_every: int = 1_000
    """Environment steps between metric logs (losses/*, charts/*, perf/*; the only host syncs)."""
    checkpoint_every: int = 10_000
    """Environment steps between checkpoints (also written on SIGINT/SIGTERM)."""
    run_dir: str | None = None
    """Run directory; None makes runs/<algo>-<task>-s<seed>-<time>."""
    resume: str | None = None
    """Run directory of an interrupted run to continue from its last checkpoint."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""
    num_envs: int = 1
    """Environments stepped in parallel (worker processes); their frames are encoded in one batch."""
    updates_per_step: int = 1
    """Updates per environment step (UTD): each vector step does num_envs * updates_per_step SAC,
    relay and head updates."""
    overlap_encode: bool = True
    """Encode a step's frames in a background thread (on its own CUDA stream on a GPU) while the
    learner updates; that step's transitions join the buffer right after those updates."""
    torch_threads: int | None = None
    """CPU threads torch may use in this process; None keeps torch's default (all cores). Use 1 when
    several runs share a machine: the networks are small, and oversubscribed threads spin (measured
    here: a SAC update 40x slower with 2 threads on 2 busy cores)."""
    profile: bool = False
    """Log per-phase timings (perf/*) at the cost of a host sync per step."""
    sac: SACConfig = field(default_factory=SACConfig)
    """SAC hyper-parameters."""
    drq: DrQConfig = field(default_factory=DrQConfig)
    """Pixel-agent settings (used when agent=drq)."""
    furl: FuRLConfig = field(default_factory=FuRLConfig)
    """Reward-alignment and relay hyper-parameters."""
    vlm: VLMConfig = field(default_factory=VLMConfig)
    """Vision-language model."""

    @property
    def resolved_reward(self) -> str | None:
        """The reward family this run uses (None for algo=sac)."""
        if self.algo == "sac":
            return None
        if self.reward is not None:
            return self.reward
        return "furl" if self.algo == "furl" else "cosine"

    @property
    def resolved_buffer_size(self) -> int:
        if self.buffer_size is not None:
            return self.buffer_size
        return 500_000 if self.algo == "furl" else 1_000_000

    @property
    def resolved_eval_episodes(self) -> int:
        if self.eval_episodes is not None:
            return self.eval_episodes
        return 1 if self.goal == "fixed" else 10

    @property
    def loads_encoder(self) -> bool:
        """Whether the run needs the VLM's encoders: every reward but code (whose checker programs
        read frames and states), and none for algo=sac."""
        return self.resolved_reward not in (None, "code")

    @property
    def uses_relay(self) -> bool:
        return self.algo in ("relay", "furl")

    def validate(self, known_tasks: Collection[str] | None = None) -> None:
        """Raises ValueError listing every problem, each with what to change.

        known_tasks: the task names the environment module accepts (furl_fast.envs provides them);
        None skips the task check. This is the hook through which unknown tasks are caught before
        training starts.
        """
        problems = _problems(self, known_tasks)
        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _one_of(name: str, value: object, allowed: Collection[object]) -> list[str]:
    if value in allowed:
        return []
    return [f"{name}={value!r} is unknown; use one of {', '.join(map(repr, allowed))}."]


def _positive(name: str, value: float) -> list[str]:
    return [] if value > 0 else [f"{name}={value!r} must be > 0."]


def _problems(cfg: Config, known_tasks: Collection[str] | None) -> list[str]:
    p: list[str] = []
    p += _one_of("algo", cfg.algo, ALGOS)
    p += _one_of("agent", cfg.agent, AGENTS)
    if cfg.reward is not None:
        p += _one_of("reward", cfg.reward, REWARDS)
    p += _one_of("goal", cfg.goal, GOALS)
    p += _one_of("env_reward", cfg.env_reward, ENV_REWARDS)
    if cfg.algo == "furl" and cfg.reward not in (None, "furl"):
        p.append(f"algo=furl trains the aligned heads, so reward must be 'furl' (got {cfg.reward!r}); "
                 "for a raw VLM reward use --algo vlm or --algo relay.")
    if cfg.algo in ("vlm", "relay") and cfg.reward == "furl":
        p.append(f"reward='furl' needs the aligned heads, which only algo=furl trains; use --algo furl "
                 f"or a raw reward (cosine, goal_baseline, binary, code) with --algo {cfg.algo}.")
    if cfg.code_programs is not None and cfg.resolved_reward != "code":
        p.append(f"code_programs={cfg.code_programs!r} is only read with --reward code (this run's "
                 f"reward is {cfg.resolved_reward!r}).")
    if known_tasks is not None and cfg.task not in known_tasks:
        p.append(f"task={cfg.task!r} is unknown; use one of {', '.join(sorted(known_tasks))}.")
    if cfg.seed < 0:
        p.append(f"seed={cfg.seed} must be >= 0.")
    p += _positive("total_steps", cfg.total_steps)
    if cfg.warmup_steps < 0:
        p.append(f"warmup_steps={cfg.warmup_steps} must be >= 0.")
    elif cfg.warmup_steps >= cfg.total_steps > 0:
        p.append(f"warmup_steps={cfg.warmup_steps} must be < total_steps={cfg.total_steps}, "
                 "or no learning would happen.")
    p += _positive("batch_size", cfg.batch_size)
    if cfg.buffer_size is not None:
        p += _positive("buffer_size", cfg.buffer_size)
    if cfg.batch_size > cfg.resolved_buffer_size > 0:
        p.append(f"batch_size={cfg.batch_size} is larger than the replay buffer "
                 f"({cfg.resolved_buffer_size}); lower --batch-size or raise --buffer-size.")
    if cfg.rho < 0:
        p.append(f"rho={cfg.rho} must be >= 0 (it weighs the VLM reward; 0 turns it off).")
    p += _positive("eval_every", cfg.eval_every)
    if cfg.eval_episodes is not None:
        p += _positive("eval_episodes", cfg.eval_episodes)
    p += _positive("checkpoint_every", cfg.checkpoint_every)
    p += _positive("log_every", cfg.log_every)
    p += _positive("num_envs", cfg.num_envs)
    p += _positive("updates_per_step", cfg.updates_per_step)
    if cfg.torch_threads is not None:
        p += _positive("torch_threads", cfg.torch_threads)
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        p.append(f"device={dev!r} is unknown; use auto, cpu, cuda or cuda:N.")

    s = cfg.sac
    if not s.hidden_dims or any(h <= 0 for h in s.hidden_dims):
        p.append(f"sac.hidden_dims={s.hidden_dims} must be a non-empty list of positive widths.")
    for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha", "std_min", "n_step"):
        p += _positive(f"sac.{name}", getattr(s, name))
    if not 0 < s.gamma <= 1:
        p.append(f"sac.gamma={s.gamma} must be in (0, 1].")
    if not 0 < s.tau <= 1:
        p.append(f"sac.tau={s.tau} must be in (0, 1].")

    d = cfg.drq
    for name in ("frame_stack", "action_repeat", "feature_dim"):
        p += _positive(f"drq.{name}", getattr(d, name))
    if d.image_size < 16:
        p.append(f"drq.image_size={d.image_size} must be >= 16 (the encoder's convolutions need room).")
    if d.shift_pad < 0:
        p.append(f"drq.shift_pad={d.shift_pad} must be >= 0.")
    p += _one_of("drq.precision", d.precision, ("auto", "fp32", "bf16"))

    f = cfg.furl
    for name in ("head_hidden", "head_out", "head_lr", "pair_batch", "lag", "positive_capacity",
                 "negative_capacity"):
        p += _positive(f"furl.{name}", getattr(f, name))
    for name in ("phase_a_gap", "phase_a_margin", "phase_b_margin", "relay_noise_std",
                 "relay_stop_positives"):
        if getattr(f, name) < 0:
            p.append(f"furl.{name}={getattr(f, name)} must be >= 0.")
    if not f.relay_k_choices or any(k <= 0 for k in f.relay_k_choices):
        p.append(f"furl.relay_k_choices={f.relay_k_choices} must be a non-empty list of positive "
                 "segment lengths.")
    if f.lag >= f.positive_capacity > 0:
        p.append(f"furl.lag={f.lag} must be smaller than furl.positive_capacity={f.positive_capacity}.")

    p += _one_of("vlm.precision", cfg.vlm.precision, PRECISIONS)
    if not cfg.vlm.model:
        p.append("vlm.model must name an open_clip architecture, e.g. RN50 or ViT-B-32.")
    if not cfg.vlm.pretrained:
        p.append("vlm.pretrained must be a pretrained tag, a checkpoint path, or 'none'.")
    return p


def _paper() -> Config:
    """The FuRL paper's settings (spec: 1M steps, 10k warm-up, replay 500k for FuRL / 1M baselines)."""
    return dataclasses.replace(
        Config(),
        total_steps=1_000_000,
        warmup_steps=10_000,
        buffer_size=None,
        eval_every=100_000,
        checkpoint_every=50_000,
    )


PRESETS: dict[str, Config] = {
    # Runs on a CPU in hours, not days: fewer steps and a smaller buffer, same algorithm.
    "laptop": Config(),
    "paper": _paper(),
}


def resolve_device(name: str):
    """'auto' -> cuda when a GPU is usable, else cpu; anything else as given. Returns torch.device."""
    import torch  # kept local: the config module stays importable (and fast) without torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
