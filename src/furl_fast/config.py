"""Typed run configuration: nested frozen dataclasses with a docstring per field (tyro shows them as
the CLI help). `Config()` is the laptop-friendly default; `PRESETS["paper"]` holds the FuRL paper's
settings. Call `Config.validate()` before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

import tyro

ALGOS = ("sac", "vlm", "relay", "furl")
AGENTS = ("sac", "drq")
GOALS = ("fixed", "random")
ENV_REWARDS = ("sparse", "dense")
RENDER_QUALITIES = ("paper", "fast")
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
    """n-step returns computed by the replay buffer (a VLM reward is summed over the same steps);
    FuRL uses 1-step TD."""
    tau: float = 0.01
    """Polyak rate of the target critics, applied after every critic step."""
    init_alpha: float = 1.0
    """Initial entropy temperature alpha."""
    target_entropy: float | None = None
    """Target policy entropy; None means -act_dim / 2 (the FuRL setting)."""
    critic_layer_norm: bool = False
    """LayerNorm (no learned scale or shift) on every hidden layer of the critics, before the ReLU.
    It bounds how far Q-values can extrapolate past the data (Ball et al., RLPD, 2023): on
    Meta-World's dense reward (up to 10 per step) it keeps a solved task solved for longer, where
    plain critics' estimates run away and the task is lost by the next evaluation
    (docs/results/learning/diagnosis.md). FuRL's critics have none (the default)."""
    std_min: float = 1e-3
    """Added to softplus(.) for the policy's standard deviation, so it never collapses to 0."""
    compile: bool = False
    """torch.compile the update's loss computation (and its backward); on CUDA as a CUDA graph
    (mode "reduce-overhead"). Off by default: on a CPU it measured slower than eager (see
    benchmarks/README.md), on a GPU it is not measured yet."""


@dataclass(frozen=True)
class DrQConfig:
    """Pixel-based agent (agent=drq): DrQ-v2 (Yarats, Fergus, Lazaric, Pinto 2021), with the defaults
    of its paper and public code (cfgs/config.yaml; the batch size is Config.batch_size, 256 in both).
    DrQ-v2 counts its schedule in agent steps (one action = action_repeat simulator steps); so does
    this config. With --agent drq the sac.* flags are unused."""

    image_size: int = 84
    """Side of the square RGB observation the agent sees (DrQ-v2: 84)."""
    frame_stack: int = 3
    """Consecutive frames stacked along channels (DrQ-v2: 3)."""
    action_repeat: int = 2
    """Simulator steps per agent action (DrQ-v2: 2)."""
    shift_pad: int = 4
    """Random-shift augmentation: replicate pad, then a random crop back to image_size (DrQ-v2: 4)."""
    feature_dim: int = 50
    """Width of the actor's and the critic's trunk (Linear -> LayerNorm -> tanh) (DrQ-v2: 50)."""
    hidden_dim: int = 1024
    """Hidden width of the policy MLP and of each of the twin Q MLPs (DrQ-v2: 1024)."""
    lr: float = 1e-4
    """Adam learning rate of the encoder, actor and critic (DrQ-v2: 1e-4)."""
    gamma: float = 0.99
    """Discount factor (DrQ-v2: 0.99); the replay buffer folds gamma^n into each batch."""
    n_step: int = 3
    """n-step returns (DrQ-v2: 3); a VLM reward is summed over the same n steps."""
    critic_target_tau: float = 0.01
    """Polyak rate of the target critic (trunk included) after every update (DrQ-v2: 0.01)."""
    update_every_steps: int = 2
    """One update (critic, actor, target) every this many agent steps (DrQ-v2: 2)."""
    stddev_init: float = 1.0
    """Exploration std at agent step 0 (DrQ-v2: linear(1.0, 0.1, duration))."""
    stddev_final: float = 0.1
    """Exploration std from agent step stddev_steps on (DrQ-v2: 0.1)."""
    stddev_steps: int = 100_000
    """Agent steps of the linear std schedule. DrQ-v2 uses 100,000 for its easy tasks, whose 1.1M
    frame budget is the one closest to FuRL's 1M environment steps (500,000 medium, 2M hard)."""
    stddev_clip: float = 0.3
    """Clip of the target-policy and actor-loss noise, in units of the action (DrQ-v2: 0.3)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Conv encoder precision: fp32 (DrQ-v2 as published) or bf16 (autocast of the conv stack, with
    float32 weights and optimiser: faster on GPUs with bf16 tensor cores, slower on most CPUs; not
    what the paper ran, so asked for explicitly)."""


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
    phase_a: bool = True
    """Phase A (goal-image ranking) before the first valid positive; --furl.no-phase-a is the paper's
    "FuRL without goal image" ablation: no expert rollout, and the heads keep their initial weights
    until phase B."""
    phase_a_gap: float = 0.25
    """Phase A: frame i must be closer to the goal image than frame j by this L2 distance to rank.
    0.25 is in the units of LIV's (unnormalised, 1024-d) embeddings, the paper's VLM. For another VLM,
    scale it to that model's distances from the goal image: watch furl/phase_a_active_pairs (the
    fraction of frame pairs ranked per head update) early in a run; near 0 means the gap is too wide
    (phase A learns nothing), near 1 that it ranks pairs that differ by noise."""
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
    relay: bool = True
    """Relay RL for algo=furl; --furl.no-relay is the paper's "FuRL without relay" ablation (only the
    FuRL agent acts and trains)."""
    relay_stop_positives: int = 2_500
    """Relay RL stops for good once a count reaches this: for algo=furl the positive frames stored
    (FuRL's rule), for algo=relay the steps with success (the release's rule for the relay
    baseline, which has no embedding buffer of positives)."""
    relay_k_choices: tuple[int, ...] = (50, 100, 150, 200)
    """Relay RL: per episode, control alternates every K steps, K drawn from these."""
    relay_noise_std: float = 0.2
    """Relay RL: std of the Gaussian noise added to the relay agent's actions (then clipped)."""


# ---- rewards: one config per reward (furl_fast.rewards.REWARD_MODELS has the model of each) ----


class _Reward:
    """What every reward config declares: its registry name, and whether the run loads the VLM."""

    name: ClassVar[str]
    needs_encoder: ClassVar[bool] = True


@dataclass(frozen=True)
class CosineRewardConfig(_Reward):
    """cosine: cos(image embedding, task prompt embedding), the plain CLIP reward (VLM-RM's alpha = 0)."""

    name: ClassVar[str] = "cosine"


DEFAULT_BASELINE_PROMPT = "a robot arm and a table"
"""VLM-RM's baseline describes the scene without the goal; this one fits every Meta-World task."""


@dataclass(frozen=True)
class GoalBaselineRewardConfig(_Reward):
    """goal_baseline: VLM-RM's goal-baseline projection 1 - 0.5 |(x - g) P|^2 (Rocamonde et al.)."""

    name: ClassVar[str] = "goal_baseline"
    alpha: float = 0.5
    """Projection strength in [0, 1]: 0 is an affine map of the cosine, 1 projects fully onto the
    goal - baseline direction (the paper sweeps it)."""
    goal_prompts: tuple[str, ...] | None = None
    """Texts describing the goal (their mean embedding is g); None: the task prompt."""
    baseline_prompts: tuple[str, ...] = (DEFAULT_BASELINE_PROMPT,)
    """Texts describing the scene without the goal (their mean embedding is b); the default fits
    every Meta-World task."""


@dataclass(frozen=True)
class BinaryRewardConfig(_Reward):
    """binary: Baumli et al.'s softmax over the goal prompt and negative prompts, thresholded."""

    name: ClassVar[str] = "binary"
    threshold: float = 0.5
    """The reward is 1 where the goal's softmax probability exceeds this (beta), else 0."""
    negatives: tuple[str, ...] | None = None
    """Negative prompts; None: the other MT10 tasks' prompts."""
    temperature: float | None = None
    """Softmax temperature; None: the VLM's own learned temperature (1 / logit_scale)."""
    binary: bool = True
    """--reward.no-binary rewards the probability itself instead of thresholding it."""


@dataclass(frozen=True)
class FuRLRewardConfig(_Reward):
    """furl: FuRL's aligned heads cos(f_I(image), f_L(text)), trained with ranking losses while the
    agent learns; their hyper-parameters are the --furl.* flags (shared with relay RL)."""

    name: ClassVar[str] = "furl"


@dataclass(frozen=True)
class CodeRewardConfig(_Reward):
    """code: code-as-reward, the fraction of a task's verified checker programs completed in order
    so far in the episode; needs no VLM at training time. The programs are a set a VLM wrote
    (python -m furl_fast.generate_programs) or, without --reward.programs, the task's hand-written
    reference programs (no VLM wrote those; they read the simulator's privileged state). Every run
    first verifies its set on the suite's expert and full-length random rollouts (cached) and stops
    if the set fails."""

    name: ClassVar[str] = "code"
    needs_encoder: ClassVar[bool] = False
    programs: str | None = None
    """A program-set JSON file written by python -m furl_fast.generate_programs (or ProgramSet.save);
    None takes the task's hand-written reference programs (drawer-open, button-press-topdown, reach,
    ...)."""
    verify_expert: int = 10
    """Scripted-expert episodes the set is verified on before the run (every sub-task must complete
    in order on all of them)."""
    verify_random: int = 20
    """Full-length random-action episodes the set is verified on before the run (all sub-tasks may
    complete on at most 10% of them)."""
    allow_unverified: bool = False
    """Train even if the set fails verification (or the suite has no scripted expert to verify it
    on); the failure is logged and this flag is kept in config.json."""
    trust_programs: bool = False
    """Run the --reward.programs file even where the sandbox's OS-level isolation (Landlock,
    seccomp, namespaces: Linux only) cannot be set up, behind the Python-level barriers alone. Only
    for a file whose programs you have read or written yourself: a program from a VLM or a stranger
    may then read your files and secrets. Without it such a run stops at start-up, saying what is
    missing. The built-in reference programs are trusted the same way."""

    @property
    def isolation(self) -> str:
        """The sandbox's isolation for these programs (furl_fast.rewards.code.SandboxLimits)."""
        return "best-effort" if self.programs is None or self.trust_programs else "required"


@dataclass(frozen=True)
class AutoRewardConfig(_Reward):
    """auto (the default): the algo's own reward, furl for algo=furl and cosine for vlm and relay."""

    name: ClassVar[str] = "auto"


REWARD_CONFIGS: tuple[type, ...] = (FuRLRewardConfig, CosineRewardConfig, GoalBaselineRewardConfig,
                                    BinaryRewardConfig, CodeRewardConfig)
"""Every reward's config class; a new reward adds its class here (and its model to
furl_fast.rewards.REWARD_MODELS)."""
REWARDS = tuple(c.name for c in REWARD_CONFIGS)
REWARD_CONFIG_CLASSES: dict[str, type] = {c.name: c for c in (AutoRewardConfig, *REWARD_CONFIGS)}
"""Reward name (auto included) -> its config class."""
RewardConfig = Union[tuple(Annotated[c, tyro.conf.subcommand(c.name)]  # noqa: UP007
                           for c in (AutoRewardConfig, *REWARD_CONFIGS))]


@dataclass(frozen=True)
class VLMConfig:
    """The frozen vision-language model that embeds frames and the task text."""

    model: str = "RN50"
    """liv (the paper's VLM: LIV, a CLIP RN50 fine-tuned by its authors; --preset paper's default)
    or an open_clip architecture name (RN50 with OpenAI's weights, the laptop default, is the
    closest open_clip model to LIV). With --preset paper, --vlm.model NAME runs another VLM with
    the paper's other settings (then choose --furl.phase-a-gap for that model: 0.25 is in LIV's
    units)."""
    pretrained: str | None = None
    """None: the model's default weights (liv: the release's model.pt from the Hugging Face hub repo
    jasonyma/LIV, downloaded once into the hub cache; open_clip models: the 'openai' tag). Else an
    open_clip pretrained tag, a local checkpoint path (for liv: LIV's model.pt), or 'none' for random
    weights (meaningless rewards; for tests and throughput only)."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Encoder precision; auto = fp16 on CUDA (as FuRL's release runs LIV), fp32 on CPU."""
    bgr: bool | None = None
    """Feed channels in BGR order; None: the model's default, True for liv (FuRL's release feeds LIV
    cv2's BGR frames), False for open_clip models."""
    prompt: str | None = None
    """Task description for the text encoder; None takes the task's prompt from the task table."""
    cache_dir: str | None = None
    """Where text embeddings are cached; None uses $FURL_FAST_CACHE or ~/.cache/furl_fast. (Downloaded
    weights go to open_clip's own cache.)"""


@dataclass(frozen=True)
class GymnasiumConfig:
    """Options of the gymnasium suite (--suite gymnasium: --task is any Gymnasium id)."""

    goal_image: str | None = None
    """An image file (PNG, JPEG, ...) of the task solved: FuRL's goal image for phase A (algo furl);
    without one, use --furl.no-phase-a."""
    success_key: str | None = None
    """A key of the env's info whose truth is success (e.g. is_success); None: the env has no success
    flag (eval/success stays 0, the sparse reward is 0 and the VLM reward alone trains the agent)."""


@dataclass(frozen=True)
class Config:
    """One training run."""

    algo: Literal["sac", "vlm", "relay", "furl"] = "furl"
    """sac: sparse reward only; vlm: + raw VLM reward; relay: raw VLM + relay RL; furl: aligned + relay."""
    agent: Literal["sac", "drq"] = "sac"
    """sac: state-based SAC (sac.* flags); drq: DrQ-v2 on 84x84 pixels (drq.* flags)."""
    reward: Annotated[RewardConfig, tyro.conf.arg(
        help="The VLM reward and its own options: --reward NAME [--reward.OPTION VALUE ...], NAME one "
             "of furl, cosine, goal_baseline, binary, code (python -m furl_fast.train --reward NAME "
             "--help lists its options), or auto: furl for algo=furl, cosine for vlm and relay "
             "(unused by sac).")] = AutoRewardConfig()
    suite: str = "metaworld"
    """The environment suite (furl_fast.envs.SUITES): metaworld (FuRL's Meta-World v3 tasks) or
    gymnasium (any Gymnasium id as --task, e.g. CartPole-v1 or Humanoid-v5, with --vlm.prompt and
    the --gym.* options)."""
    task: str = "drawer-open"
    """The suite's task: a Meta-World v3 task name (any of the 50; "drawer-open-v3" works too), or
    a Gymnasium id with --suite gymnasium."""
    goal: Literal["fixed", "random"] = "fixed"
    """fixed: hidden goal, same scene every reset; random: goal in the state, resampled each reset."""
    render_quality: Literal["paper", "fast"] = "fast"
    """Frames of the training envs, the evaluation videos and FuRL's goal image: paper keeps
    Meta-World's visuals (4096 shadow map, 4x MSAA), the images the paper's VLM rewards saw; fast
    drops shadows and multisampling (about 6x faster in software rendering)."""
    env_reward: Literal["sparse", "dense"] = "sparse"
    """The environment's reward in the critic: sparse (success - 1, FuRL's setting) or dense
    (Meta-World's own shaped reward: the oracle upper bound, and a check without any VLM weights that
    the RL stack learns the task). VLM rewards are added on top of it (weight rho)."""
    seed: int = 0
    """Seed of the environment, networks, replay sampling and relay schedule."""
    total_steps: int = 100_000
    """Simulator (environment) steps to train for, the paper's x-axis. Every step count of this
    config (warm-up, eval/log/checkpoint intervals) is in simulator steps; with --agent drq one
    agent step (an action, a stored transition) is drq.action_repeat of them (charts/agent_steps)."""
    warmup_steps: int | None = None
    """Simulator steps of uniform-random actions before learning starts; None takes the agent's
    published value: 10,000 for sac (FuRL) and, for drq, DrQ-v2's 2,000 agent steps, i.e.
    2,000 * drq.action_repeat = 4,000 simulator steps. A number given here wins for every agent
    and preset."""
    batch_size: int = 256
    """Replay batch size of every SAC / DrQ-v2 update (both papers: 256)."""
    buffer_size: int | None = 100_000
    """Replay capacity in transitions (agent steps); None means 500,000 for furl and 1,000,000
    otherwise (the FuRL paper's sizes)."""
    rho: float | None = None
    """Weight of the VLM reward: critic reward = env reward + rho * vlm_reward. None picks the
    reward's default: 0.05 for the VLM similarity rewards (FuRL's setting: a noisy cosine must not
    outweigh the task reward) and 1.0 for the code reward, whose staged progress in [0, 1] comes from
    verified checker programs and is weighted like the task reward itself (as VLM-CaR adds it to the
    sparse reward): with 0.05 its first stage is worth 0.0125 per step, far below the entropy
    bonus SAC starts with."""
    eval_every: int = 10_000
    """Simulator steps between evaluations of the deterministic policy."""
    eval_video: bool = True
    """Record the first episode of every evaluation as a video (videos/); rendering it costs about
    as much as 500 steps of a state-based run on a CPU."""
    eval_episodes: int | None = None
    """Episodes per evaluation; None means 1 for a fixed goal, 10 for random goals."""
    log_every: int = 1_000
    """Simulator steps between metric logs (losses/*, charts/*, perf/*; the only host syncs)."""
    checkpoint_every: int = 10_000
    """Simulator steps between checkpoints (also written on SIGINT/SIGTERM)."""
    checkpoint_replay: bool = True
    """Save the replay buffer in checkpoints (its filled part). --no-checkpoint-replay keeps them
    small (networks, optimisers, heads and counters only); a resume then starts with an empty buffer
    and learns again once it holds --batch-size transitions."""
    run_dir: str | None = None
    """Run directory; None makes runs/<algo>-<task>-s<seed>-<time>."""
    resume: str | None = None
    """Run directory of an interrupted or finished run to continue from its last checkpoint, with
    its saved settings. A resume may change only total_steps (to extend a finished run),
    eval_every, eval_episodes, eval_video, log_every, checkpoint_every, checkpoint_replay, device,
    torch_threads, profile and overlap_encode; any other flag is refused."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""
    num_envs: int = 1
    """Environments stepped in parallel (worker processes); their frames are encoded in one batch."""
    updates_per_step: int = 1
    """Updates per agent step (UTD): each vector step does num_envs * updates_per_step SAC, relay
    and head updates (DrQ-v2: on every drq.update_every_steps-th agent step only)."""
    overlap_encode: bool = True
    """Encode a step's frames in a background thread (on its own CUDA stream on a GPU) while the
    learner updates; that step's transitions join the buffer right after those updates."""
    torch_threads: int | None = 1
    """CPU threads torch may use in this process; None keeps torch's default (one per core). 1 by
    default: with more threads than free cores, torch's threads spin and wait on each other, and a
    run slows down 10x or more as soon as anything else uses the machine (measured on a 2-core CPU
    under load: SAC updates 34-76/s with 1 thread, 3-7/s with 2; RN50 frames 1.8-4.2/s vs 0.2-0.4/s).
    Raise it on an otherwise idle machine with many cores (the CPU encoder gains most)."""
    profile: bool = False
    """Log per-phase timings (perf/*) at the cost of a host sync per step."""
    sac: SACConfig = field(default_factory=SACConfig)
    """SAC hyper-parameters (agent=sac)."""
    drq: DrQConfig = field(default_factory=DrQConfig)
    """DrQ-v2 hyper-parameters and pixel settings (agent=drq)."""
    furl: FuRLConfig = field(default_factory=FuRLConfig)
    """Reward-alignment and relay hyper-parameters."""
    vlm: VLMConfig = field(default_factory=VLMConfig)
    """Vision-language model."""
    gym: GymnasiumConfig = field(default_factory=GymnasiumConfig)
    """The gymnasium suite's options (unused by metaworld)."""

    def __post_init__(self) -> None:
        # Config(reward="binary") is the reward with its default options (an unknown name stays, for
        # validate() to report).
        if isinstance(self.reward, str) and self.reward in REWARD_CONFIG_CLASSES:
            object.__setattr__(self, "reward", REWARD_CONFIG_CLASSES[self.reward]())

    @property
    def resolved_reward(self) -> str | None:
        """The name of the reward this run uses (None for algo=sac)."""
        config = self.reward_config
        return None if config is None else config.name

    @property
    def reward_config(self) -> Any:
        """The config of the reward this run uses: reward, or the algo's default (None for sac)."""
        if self.algo == "sac":
            return None
        if not isinstance(self.reward, AutoRewardConfig):
            return self.reward
        return FuRLRewardConfig() if self.algo == "furl" else CosineRewardConfig()

    @property
    def resolved_rho(self) -> float:
        """The VLM reward's weight in the critic (see rho)."""
        if self.rho is not None:
            return self.rho
        return 1.0 if self.resolved_reward == "code" else 0.05

    @property
    def resolved_warmup_steps(self) -> int:
        """Simulator steps of random actions (see warmup_steps)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return 2_000 * self.drq.action_repeat if self.agent == "drq" else 10_000

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
        config = self.reward_config
        return config is not None and config.needs_encoder

    @property
    def suite_options(self) -> dict[str, Any]:
        """The chosen suite's own options (Suite.options) as make_env keyword arguments."""
        return dataclasses.asdict(self.gym) if self.suite == "gymnasium" else {}

    @property
    def uses_relay(self) -> bool:
        return self.algo == "relay" or (self.algo == "furl" and self.furl.relay)

    def validate(self, suite: Any = None) -> None:
        """Raises ValueError listing every problem, each with what to change.

        suite: the environment suite of the run (furl_fast.envs.get_suite(cfg.suite)); it checks the
        task name and what the suite cannot do (goal="random"). None skips those checks.
        """
        problems = _problems(self, suite)
        if len(problems) == 1:
            raise ValueError(f"invalid configuration: {problems[0]}")
        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _cuda_problems(device: str) -> list[str]:
    import torch  # kept local: the config module stays importable (and fast) without torch

    if not torch.cuda.is_available():
        return [f"--device {device} but torch sees no usable CUDA GPU here (no GPU or driver, or a "
                "CPU-only torch build); use --device cpu (or auto)."]
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        return [f"--device {device} but torch sees only {torch.cuda.device_count()} GPU(s); use "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."]
    return []


def _flag(name: str) -> str:
    """The command-line flag of a Config field: "sac.n_step" -> "--sac.n-step"."""
    return "--" + name.replace("_", "-")


def _one_of(name: str, value: object, allowed: Collection[object]) -> list[str]:
    if value in allowed:
        return []
    return [f"{_flag(name)} {value} is unknown; use one of {', '.join(map(str, allowed))}."]


def _positive(name: str, value: float) -> list[str]:
    return [] if value > 0 else [f"{_flag(name)} {value!r} must be > 0."]


def _problems(cfg: Config, suite: Any) -> list[str]:
    p: list[str] = []
    p += _one_of("algo", cfg.algo, ALGOS)
    p += _one_of("agent", cfg.agent, AGENTS)
    if not isinstance(cfg.reward, (AutoRewardConfig, *REWARD_CONFIGS)):
        p.append(f"--reward {cfg.reward!r} is unknown; use one of auto, {', '.join(REWARDS)}.")
    p += _one_of("goal", cfg.goal, GOALS)
    p += _one_of("env_reward", cfg.env_reward, ENV_REWARDS)
    p += _one_of("render_quality", cfg.render_quality, RENDER_QUALITIES)
    name = getattr(cfg.reward, "name", None)
    if cfg.algo == "furl" and name not in ("auto", "furl"):
        p.append(f"--algo furl trains the aligned heads, so --reward must be furl (got {name}); "
                 "for a raw VLM reward use --algo vlm or --algo relay.")
    if cfg.algo in ("vlm", "relay") and name == "furl":
        p.append(f"--reward furl needs the aligned heads, which only --algo furl trains; use --algo furl "
                 f"or a raw reward (cosine, goal_baseline, binary, code) with --algo {cfg.algo}.")
    for flag, on in (("relay", cfg.furl.relay), ("phase-a", cfg.furl.phase_a)):
        if not on and cfg.algo != "furl":
            p.append(f"--furl.no-{flag} is an ablation of FuRL and needs --algo furl (got "
                     f"{cfg.algo!r}).")
    p += _reward_problems(cfg.reward_config)
    if suite is not None:
        try:
            suite.canonical_task(cfg.task)
        except ValueError as exc:  # the suite's message names the task and the known ones
            p.append(str(exc).replace(f"task={cfg.task!r}", f"--task {cfg.task}", 1))
        if cfg.goal == "random" and not suite.random_goals:
            p.append(f"--goal random: the {cfg.suite} suite has no goal randomisation; use --goal "
                     "fixed.")
    if cfg.vlm.prompt is not None and not cfg.vlm.prompt.strip():
        p.append("--vlm.prompt is empty; describe what success looks like in a short sentence, or "
                 "leave the flag out for the task's own prompt.")
    if cfg.suite == "gymnasium" and cfg.algo == "sac" and cfg.env_reward == "sparse" \
            and cfg.gym.success_key is None:
        p.append("--suite gymnasium --algo sac without --gym.success-key: the sparse reward is 0 at "
                 "every step, so nothing can be learned; name the env's success flag with "
                 "--gym.success-key KEY, train on its own reward with --env-reward dense, or add a VLM "
                 "reward with --algo vlm.")
    if cfg.suite != "gymnasium" and cfg.gym != GymnasiumConfig():
        p.append("--gym.* options are read only with --suite gymnasium.")
    if cfg.seed < 0:
        p.append(f"--seed {cfg.seed} must be >= 0.")
    p += _positive("total_steps", cfg.total_steps)
    warmup = cfg.resolved_warmup_steps
    if warmup < 0:
        p.append(f"--warmup-steps {warmup} must be >= 0.")
    elif warmup >= cfg.total_steps > 0:
        given = f"--warmup-steps {warmup}" if cfg.warmup_steps is not None else \
            f"the warm-up of agent {cfg.agent} (default {warmup} steps)"
        p.append(f"{given} must be < --total-steps {cfg.total_steps}, or no learning would happen; "
                 "lower --warmup-steps or raise --total-steps.")
    p += _positive("batch_size", cfg.batch_size)
    if cfg.buffer_size is not None:
        p += _positive("buffer_size", cfg.buffer_size)
    if cfg.batch_size > cfg.resolved_buffer_size > 0:
        p.append(f"--batch-size {cfg.batch_size} is larger than the replay buffer "
                 f"({cfg.resolved_buffer_size}); lower --batch-size or raise --buffer-size.")
    if cfg.rho is not None and cfg.rho < 0:
        p.append(f"--rho {cfg.rho} must be >= 0 (it weighs the VLM reward; 0 turns it off).")
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
        p.append(f"--device {dev} is unknown; use auto, cpu, cuda or cuda:N.")
    elif dev.startswith("cuda"):
        p += _cuda_problems(dev)

    s = cfg.sac
    if not s.hidden_dims or any(h <= 0 for h in s.hidden_dims):
        p.append(f"--sac.hidden-dims {' '.join(map(str, s.hidden_dims)) or '(none)'} must be a "
                 "non-empty list of positive widths.")
    for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha", "std_min", "n_step"):
        p += _positive(f"sac.{name}", getattr(s, name))
    if not 0 < s.gamma <= 1:
        p.append(f"--sac.gamma {s.gamma} must be in (0, 1].")
    if not 0 < s.tau <= 1:
        p.append(f"--sac.tau {s.tau} must be in (0, 1].")

    d = cfg.drq
    for name in ("frame_stack", "action_repeat", "feature_dim", "hidden_dim", "lr", "n_step",
                 "update_every_steps", "stddev_steps"):
        p += _positive(f"drq.{name}", getattr(d, name))
    if not 0 < d.gamma <= 1:
        p.append(f"--drq.gamma {d.gamma} must be in (0, 1].")
    if not 0 < d.critic_target_tau <= 1:
        p.append(f"--drq.critic-target-tau {d.critic_target_tau} must be in (0, 1].")
    for name in ("stddev_init", "stddev_final", "stddev_clip"):
        if getattr(d, name) < 0:
            p.append(f"{_flag('drq.' + name)} {getattr(d, name)} must be >= 0.")
    if d.image_size < 16:
        p.append(f"--drq.image-size {d.image_size} must be >= 16 (the encoder's convolutions need room).")
    if d.shift_pad < 0:
        p.append(f"--drq.shift-pad {d.shift_pad} must be >= 0.")
    p += _one_of("drq.precision", d.precision, ("fp32", "bf16"))

    f = cfg.furl
    for name in ("head_hidden", "head_out", "head_lr", "pair_batch", "lag", "positive_capacity",
                 "negative_capacity"):
        p += _positive(f"furl.{name}", getattr(f, name))
    for name in ("phase_a_gap", "phase_a_margin", "phase_b_margin", "relay_noise_std",
                 "relay_stop_positives"):
        if getattr(f, name) < 0:
            p.append(f"{_flag('furl.' + name)} {getattr(f, name)} must be >= 0.")
    if not f.relay_k_choices or any(k <= 0 for k in f.relay_k_choices):
        p.append(f"--furl.relay-k-choices {' '.join(map(str, f.relay_k_choices)) or '(none)'} must "
                 "be a non-empty list of positive segment lengths.")
    if f.lag >= f.positive_capacity > 0:
        p.append(f"--furl.lag {f.lag} must be smaller than --furl.positive-capacity {f.positive_capacity}.")

    p += _one_of("vlm.precision", cfg.vlm.precision, PRECISIONS)
    if not cfg.vlm.model:
        p.append("--vlm.model must be liv or name an open_clip architecture, e.g. RN50 or ViT-B-32.")
    if cfg.vlm.pretrained == "":
        p.append("--vlm.pretrained must be a pretrained tag, a checkpoint path, 'none', or unset (the "
                 "model's default weights).")
    return p


def _reward_problems(r: Any) -> list[str]:
    p: list[str] = []
    if isinstance(r, GoalBaselineRewardConfig):
        if not 0.0 <= r.alpha <= 1.0:
            p.append(f"--reward.alpha {r.alpha} must be in [0, 1].")
        for name in ("goal_prompts", "baseline_prompts"):
            prompts = getattr(r, name)
            if prompts is not None and (not prompts or not all(t.strip() for t in prompts)):
                p.append(f"{_flag('reward.' + name)} {prompts!r} must be non-empty texts.")
    if isinstance(r, BinaryRewardConfig):
        if not 0.0 <= r.threshold < 1.0:
            p.append(f"--reward.threshold {r.threshold} must be in [0, 1).")
        if r.temperature is not None and not r.temperature > 0:
            p.append(f"--reward.temperature {r.temperature} must be > 0.")
        if r.negatives is not None and (not r.negatives or not all(t.strip() for t in r.negatives)):
            p.append(f"--reward.negatives {r.negatives!r} must be non-empty texts.")
    return p


def _paper() -> Config:
    """The FuRL paper's settings: 1M environment steps (the paper's x-axis) for every agent, replay
    500k for FuRL / 1M for the baselines, Meta-World's own visuals and the paper's VLM, LIV (fed BGR
    frames, as the release feeds it). The warm-up is every preset's: the agent's published one."""
    return dataclasses.replace(
        Config(),
        render_quality="paper",
        total_steps=1_000_000,
        buffer_size=None,
        vlm=VLMConfig(model="liv"),
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


# ---- config.json ----------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain JSON-able dict of cfg; the reward is {"name": ..., its options ...}."""
    out = dataclasses.asdict(cfg)
    out["reward"] = {"name": cfg.reward.name, **dataclasses.asdict(cfg.reward)}
    return out


def config_from_dict(cls: type, data: Any, prefix: str = ""):
    """Rebuilds (nested) frozen dataclasses from config_to_dict's output, strictly: every field present,
    no other, each of its declared type (a list for a tuple; an integer is taken as a float). Raises
    ValueError naming the first field that is not, e.g. 'field "sac.tau" must be a float, got "abc".'
    prefix: the dotted name of data's section in the messages ("sac.")."""
    if not isinstance(data, dict):
        raise ValueError(f"{_field(prefix.rstrip('.'))} must be an object, got {_shown(data)}.")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in fields:
            raise ValueError(f'field "{prefix}{key}" is unknown.')
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in fields:
        if name not in data:
            raise ValueError(f'field "{prefix}{name}" is missing.')
        if cls is Config and name == "reward":
            kwargs[name] = _reward_from_dict(data[name])
        else:
            kwargs[name] = _typed(prefix + name, hints[name], data[name])
    return cls(**kwargs)


def _field(name: str) -> str:
    return f'field "{name}"' if name else "the configuration"


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


def _described(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _described(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is tuple:
        return f"a list of {_described(args[0]).split(' ', 1)[1]}s"
    if dataclasses.is_dataclass(hint):
        return "an object"
    return _TYPE_NAMES[hint]


def _typed(name: str, hint: Any, value: Any, expected: str | None = None) -> Any:
    """value as a field of type hint (dotted name: name), or ValueError saying it must be expected
    (default: hint described)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, name + ".")
    if origin in (Union, types.UnionType):  # only X | None among the config's fields
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else _typed(name, inner, value, _described(hint))
    if origin is tuple and isinstance(value, (list, tuple)):  # tuple[X, ...]
        return tuple(_typed(f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
    if not _matches(hint, value):
        raise ValueError(f"{_field(name)} must be {expected or _described(hint)}, got {_shown(value)}.")
    return float(value) if hint is float else value


def _matches(hint: Any, value: Any) -> bool:
    """Whether value is of the scalar type hint (JSON has no separate int and bool: bool is apart)."""
    if typing.get_origin(hint) is Literal:
        return isinstance(value, str) and value in typing.get_args(hint)
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    if hint is int:
        return isinstance(value, int)
    if hint is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return hint is str and isinstance(value, str)


def _reward_from_dict(value: Any) -> Any:
    if value is None:  # config.json of a run started with the algo's reward
        return AutoRewardConfig()
    if isinstance(value, str):  # a bare name: the reward with its default options
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f'field "reward" must be an object, got {_shown(value)}.')
    options = dict(value)
    name = options.pop("name", None)
    if not isinstance(name, str) or name not in REWARD_CONFIG_CLASSES:
        raise ValueError(f'field "reward.name" must be one of '
                         f"{', '.join(json.dumps(n) for n in REWARD_CONFIG_CLASSES)}, got {_shown(name)}.")
    return config_from_dict(REWARD_CONFIG_CLASSES[name], options, "reward.")


def changed_fields(a: Config, b: Config) -> list[str]:
    """Dotted names of the fields (nested ones as sac.tau) whose values differ."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
