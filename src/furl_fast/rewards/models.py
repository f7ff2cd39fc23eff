"""Every VLM reward family behind one interface.

A RewardModel scores a batch: `model(frames, states=None)` takes (N, H, W, 3) uint8 frames (ndarray,
or a tensor on any device) and returns (N,) float32 rewards on the encoder's device. Embedding-based
models also offer `reward_from_embeddings(emb)` on cached (N, D) image embeddings, which is what the
reward evaluation and the trainer's replay relabelling use. Stateful models (code-as-reward) keep one
episode state per environment slot: call `reset(env_ids)` when those environments start an episode.

- CosineReward: cos(image, task prompt) (the plain CLIP reward).
- GoalBaselineReward: VLM-RM's goal-baseline projection (Rocamonde et al., ICLR 2024).
- BinaryReward: Baumli et al.'s softmax over goal + negative prompts, thresholded (or continuous).
- FuRLRewardModel: FuRL's aligned heads (furl_fast.rewards.furl.FuRLReward).
- CodeRewardModel: code-as-reward programs (furl_fast.rewards.code.CodeReward); needs states.

make_reward_model(name, encoder, task, **kwargs) builds any of them by name; REWARD_MODELS is the
registry (name -> class) that the trainer and the reward evaluation read.

Training with a reward (furl_fast.train) goes through the hooks of RewardModel beside
reward_from_embeddings: `from_config(config, context)` builds it for a run from its config dataclass
(furl_fast.config, e.g. BinaryRewardConfig); `observe(frames, states, env_ids)` gives what the replay
buffer keeps per observation (`stored_width` values of `stored_dtype`: an image embedding, or the
code reward's progress); `reward_from_embeddings(stored)` scores a sampled batch of those values;
`end_episode(stored, success)` sees each finished episode (FuRL fills its embedding buffer);
`update(batch)` trains whatever the reward trains (FuRL's heads); `state_dict` / `load_state_dict`
go into checkpoints; `close` frees workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from furl_fast import ops
from furl_fast.config import DEFAULT_BASELINE_PROMPT
from furl_fast.envs.metaworld.prompts import MT10_PROMPTS, task_prompt
from furl_fast.vlm import Encoder

__all__ = [
    "DEFAULT_BASELINE_PROMPT",
    "REWARD_MODELS",
    "BinaryReward",
    "CodeRewardModel",
    "CosineReward",
    "FuRLRewardModel",
    "GoalBaselineReward",
    "RewardContext",
    "RewardModel",
    "build_reward",
    "make_reward_model",
]



def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)


def _prompt_list(name: str, prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{name} must be a non-empty string or list of non-empty strings, "
                         f"got {prompts!r}.")
    return prompts


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward may read while it builds itself for a training run (RewardModel.from_config)."""

    encoder: Encoder | None
    """The frozen VLM (None when the run loads none: the reward's needs_encoder is False)."""
    task: str
    """The task name (the suite's canonical one)."""
    prompt: str | None
    """The task's text goal (--vlm.prompt, else the suite's built-in prompt; None when neither)."""
    num_envs: int
    """Environments stepped in parallel (stateful rewards keep one episode state each)."""
    device: torch.device
    """The training device: where stored values and rewards of batches live."""
    seed: int
    suite: Any = None
    """The task's environment suite (furl_fast.envs.Suite): its reference programs, negative prompts."""
    furl: Any = None
    """The run's FuRLConfig (--furl.*)."""
    goal_frame: Callable[[], np.ndarray] | None = None
    """Renders the task's goal image, (H, W, 3) uint8 (FuRL's phase A reads it)."""


class RewardModel:
    """Base class: a batch of frames (or of image embeddings) in, one float32 reward per item out.

    Attributes: `name` (the registry name, the config's name); `needs_states` (True: __call__ requires `states`); `stateful` (True: call reset(env_ids) at
    episode starts); `offline_scorable` (it scores single frames from their embedding alone, so the
    reward evaluation can test it); `decision_threshold` (the reward's own success threshold on its
    continuous score, or None when it has none: see evaluate_reward).
    """

    name: ClassVar[str] = ""
    needs_states: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    offline_scorable: ClassVar[bool] = False
    decision_threshold: float | None = None
    stored_dtype: torch.dtype = torch.float16
    """dtype of what observe() returns in the replay buffer (embeddings keep half precision)."""

    def __init__(self, encoder: Encoder | None) -> None:
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: Any, context: RewardContext) -> RewardModel:
        """The reward for a training run: config is its dataclass from furl_fast.config."""
        raise NotImplementedError(f"{cls.__name__} cannot be built for training.")

    # -- training hooks --------------------------------------------------------------------------

    @property
    def stored_width(self) -> int:
        """Values the replay buffer keeps per observation (the image embedding's width)."""
        return self.encoder.embed_dim

    @property
    def reads_frames(self) -> bool:
        """Whether observe() reads frames (False spares rendering them)."""
        return True

    def observe(self, frames: np.ndarray | None, states: np.ndarray,
                env_ids: np.ndarray) -> torch.Tensor:
        """What the replay buffer keeps of new observations of envs env_ids: frames (n, H, W, 3)
        uint8 (None when reads_frames is False), states (n, S) -> (n, stored_width) on the encoder's
        device. Called once per observation, in order, the reset observation included."""
        return self.encoder.encode_frames(frames)

    def end_episode(self, stored: torch.Tensor, success: np.ndarray) -> None:
        """A finished episode: stored (T, stored_width), the values observe() gave for the frames
        after each of its T steps; success (T,) bool, each step's success flag."""

    def update(self, batch: Any, log: bool = False) -> dict[str, Any]:
        """Trains whatever the reward learns on a sampled replay batch (furl_fast.replay.Batch);
        returns metrics (0-dim tensors, or floats with log=True)."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the reward (None: nothing to keep)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restores state_dict()'s output."""

    @property
    def device(self) -> torch.device:
        return self.encoder.device if self.encoder is not None else torch.device("cpu")

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """emb: (N, D) float image embeddings (not necessarily normalised) -> (N,) float32. During
        training, emb is what observe() stored (for the code reward: its progress)."""
        raise NotImplementedError(f"{type(self).__name__} does not score image embeddings.")

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """The continuous score behind the reward, (N,) float32 (the reward evaluation's ROC-AUC and
        correlation read it): the reward itself, unless the reward thresholds a score."""
        return self.reward_from_embeddings(emb)

    def __call__(self, frames: np.ndarray | torch.Tensor,
                 states: np.ndarray | None = None) -> torch.Tensor:
        """frames: (N, H, W, 3) uint8 upright frames; states: (N, S) (ignored unless needs_states).
        Returns (N,) float32 on self.device."""
        if self.encoder is None:
            raise RuntimeError(f"{type(self).__name__} has no encoder to embed frames with.")
        return self.reward_from_embeddings(self.encoder.encode_frames(frames))

    def reset(self, env_ids: int | Sequence[int] | None = None) -> None:
        """Start new episodes in environment slots env_ids (default: all). Stateless: nothing."""

    def close(self) -> None:
        """Free resources (worker processes); stateless models hold none."""

    def _check_emb(self, emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not emb.is_floating_point():
            raise ValueError(f"{type(self).__name__}.reward_from_embeddings: 'emb' must be a (N, D) "
                             f"floating tensor, got {getattr(emb, 'shape', type(emb))}.")
        want = self.encoder.embed_dim if self.encoder is not None else emb.shape[1]
        if emb.shape[1] != want:
            raise ValueError(f"{type(self).__name__}.reward_from_embeddings: 'emb' has width "
                             f"{emb.shape[1]}, the encoder's embeddings have {want}.")
        return emb.to(self.device)


class CosineReward(RewardModel):
    """reward = cos(image embedding, task prompt embedding), in [-1, 1].

    prompt: the goal text (default: task_prompt(task), FuRL's MT10 table).
    Equivalent: ops.clip_similarity(emb, text)[:, 0].
    """

    name = "cosine"
    offline_scorable = True

    @classmethod
    def from_config(cls, config: Any, context: RewardContext) -> CosineReward:
        return cls(context.encoder, context.task, prompt=context.prompt)

    def __init__(self, encoder: Encoder, task: str, *, prompt: str | None = None) -> None:
        super().__init__(encoder)
        self.prompt = task_prompt(task, prompt)
        self.text_emb = encoder.encode_text([self.prompt])  # (1, D)

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return ops.clip_similarity(self._check_emb(emb), self.text_emb)[:, 0]


class GoalBaselineReward(RewardModel):
    """VLM-RM: reward = 1 - 0.5 |(x - g) P|^2, P = alpha d d^T / |d|^2 + (1 - alpha) I, d = g - b.

    x: the L2-normalised image embedding; g (b): the mean of the L2-normalised embeddings of the goal
    (baseline) prompts. alpha = 0 gives 0.5 + cos(x, g)|g| - 0.5|g|^2, an affine map of the cosine.
    goal_prompts: default [task_prompt(task)]; baseline_prompts: default [DEFAULT_BASELINE_PROMPT].
    alpha: in [0, 1]; 0.5 by default (the paper sweeps it; 1 projects fully onto the goal direction).
    Equivalent: ops.goal_baseline_reward(emb, g, b, alpha).
    """

    name = "goal_baseline"
    offline_scorable = True

    @classmethod
    def from_config(cls, config: Any, context: RewardContext) -> GoalBaselineReward:
        goal_prompts = config.goal_prompts if config.goal_prompts is not None else \
            task_prompt(context.task, context.prompt)
        return cls(context.encoder, context.task, goal_prompts=goal_prompts,
                   baseline_prompts=config.baseline_prompts, alpha=config.alpha)

    def __init__(self, encoder: Encoder, task: str, *,
                 goal_prompts: str | Sequence[str] | None = None,
                 baseline_prompts: str | Sequence[str] = (DEFAULT_BASELINE_PROMPT,),
                 alpha: float = 0.5) -> None:
        super().__init__(encoder)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"GoalBaselineReward: 'alpha' must be a number in [0, 1], got {alpha!r}.")
        self.goal_prompts = _prompt_list("goal_prompts", goal_prompts if goal_prompts is not None
                                         else task_prompt(task))
        self.baseline_prompts = _prompt_list("baseline_prompts", baseline_prompts)
        self.alpha = float(alpha)
        self.goal_emb = _normalised(encoder.encode_text(self.goal_prompts)).mean(0)  # (D,)
        self.baseline_emb = _normalised(encoder.encode_text(self.baseline_prompts)).mean(0)

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return ops.goal_baseline_reward(self._check_emb(emb), self.goal_emb, self.baseline_emb,
                                        self.alpha)


class BinaryReward(RewardModel):
    """Baumli et al.: p = softmax over {goal} + negatives of cos(image, text) / temperature, at the goal;
    reward = 1[p > threshold] (binary=True) or p itself (binary=False).

    prompt: the goal text (default task_prompt(task)). negatives: default the other MT10 tasks'
    prompts; duplicates (and copies of the goal prompt) are removed, order kept. temperature: default
    1 / encoder.logit_scale, the model's own learned temperature. threshold: beta, default 0.5.
    Equivalent: ops.softmax_goal_reward(emb, [goal; negatives], 0, temperature=..., threshold=...).
    """

    name = "binary"
    offline_scorable = True

    @classmethod
    def from_config(cls, config: Any, context: RewardContext) -> BinaryReward:
        negatives = config.negatives
        if negatives is None:
            negatives = None if context.suite is None else context.suite.negative_prompts(context.task)
            if negatives is None:
                raise ValueError(f"--reward binary: the task {context.task} has no default negative "
                                 "prompts; give them with --reward.negatives TEXT [TEXT ...] (other "
                                 "goals in the same scene).")
        return cls(context.encoder, context.task, prompt=context.prompt, negatives=negatives,
                   temperature=config.temperature, threshold=config.threshold, binary=config.binary)

    def __init__(self, encoder: Encoder, task: str, *, prompt: str | None = None,
                 negatives: Sequence[str] | None = None, temperature: float | None = None,
                 threshold: float = 0.5, binary: bool = True) -> None:
        super().__init__(encoder)
        self.prompt = task_prompt(task, prompt)
        if negatives is None:
            negatives = list(MT10_PROMPTS.values())
        elif isinstance(negatives, str):
            negatives = [negatives]
        negatives = _prompt_list("negatives", negatives) if len(negatives) else []
        # dict.fromkeys keeps the first occurrence of each prompt, in order.
        self.negatives = [p for p in dict.fromkeys(negatives) if p != self.prompt]
        if not self.negatives:
            raise ValueError("BinaryReward: needs at least one negative prompt different from the goal "
                             "prompt (with the goal alone, p is always 1).")
        self.temperature = float(1.0 / encoder.logit_scale if temperature is None else temperature)
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"BinaryReward: 'temperature' must be > 0, got {self.temperature!r}.")
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
            raise ValueError(f"BinaryReward: 'threshold' must be in [0, 1), got {threshold!r}.")
        self.threshold, self.binary = float(threshold), bool(binary)
        self.decision_threshold = self.threshold
        self.text_emb = encoder.encode_text([self.prompt, *self.negatives])  # goal is row 0

    def probability(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, D) image embeddings -> (N,) float32 goal probability p, whatever `binary` says."""
        return ops.softmax_goal_reward(self._check_emb(emb), self.text_emb, 0,
                                       temperature=self.temperature)

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        return self.probability(emb)

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return ops.softmax_goal_reward(self._check_emb(emb), self.text_emb, 0,
                                       temperature=self.temperature,
                                       threshold=self.threshold if self.binary else None)


class FuRLRewardModel(RewardModel):
    """FuRL's aligned reward cos(f_I(emb), f_L(text)) with the heads of a FuRLReward, as they are now.

    furl: the FuRLReward to read; default a fresh one on the task prompt (untrained heads: the reward
    means nothing yet). In training (from_config) it also trains them: update() takes one head step
    per agent update, end_episode() fills FuRL's embedding buffer, and phase A ranks frames by their
    distance to the goal image's embedding.
    Equivalent: ops.mlp_cosine_reward(emb, *furl.fused_params()).
    """

    name = "furl"

    @classmethod
    def from_config(cls, config: Any, context: RewardContext) -> FuRLRewardModel:
        model = cls(context.encoder, context.task, prompt=context.prompt, config=context.furl,
                    seed=context.seed)
        if model.furl.config.phase_a:  # only phase A reads the goal image (and its expert rollout)
            goal = context.encoder.encode_frames(context.goal_frame()[None])[0]
            model.furl.set_goal(goal.float())
        return model

    def __init__(self, encoder: Encoder, task: str, *, furl: Any = None, prompt: str | None = None,
                 config: Any = None, seed: int = 0) -> None:
        super().__init__(encoder)
        if furl is None:
            from furl_fast.rewards.furl import FuRLReward

            text = encoder.encode_text([task_prompt(task, prompt)])[0].float()
            furl = FuRLReward(encoder.embed_dim, text, config, device=encoder.device, seed=seed)
        self.furl = furl

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return ops.mlp_cosine_reward(self._check_emb(emb), *self.furl.fused_params())

    def end_episode(self, stored: torch.Tensor, success: np.ndarray) -> None:
        self.furl.add_episode(stored, success)

    def update(self, batch: Any, log: bool = False) -> dict[str, Any]:
        return self.furl.update(batch.next_embedding, log=log)

    def state_dict(self) -> dict[str, Any]:
        return self.furl.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.furl.load_state_dict(state)


class CodeRewardModel(RewardModel):
    """Code-as-reward: (sub-tasks completed so far, in order) / (number of sub-tasks), per episode.

    program_set: default the task's hand-written reference programs. num_envs: the batch size every call
    must have (one episode state per slot). Needs states: (num_envs, S) float, the env's state.
    Stateful: reset(env_ids) at each episode start, then score every observation of the episode,
    the reset one included (see furl_fast.rewards.code.reward). The encoder is not used.
    In training the replay buffer stores each observation's progress ((1,) float32) and the reward
    of a sampled batch is that stored progress: the programs run once per observation, at collection.
    """

    name = "code"
    needs_states = True
    stateful = True
    stored_dtype = torch.float32

    @classmethod
    def from_config(cls, config: Any, context: RewardContext) -> CodeRewardModel:
        from furl_fast.rewards.code import SandboxLimits, load_program_set

        reference = None if context.suite is None else context.suite.reference_programs(context.task)
        programs = load_program_set(context.task, config.programs, reference)
        return cls(context.encoder, context.task, program_set=programs, num_envs=context.num_envs,
                   limits=SandboxLimits(isolation=config.isolation), device=context.device)

    def __init__(self, encoder: Encoder | None, task: str, *, program_set: Any = None,
                 num_envs: int = 1, limits: Any = None, device: torch.device | str = "cpu") -> None:
        super().__init__(encoder)
        import dataclasses

        from furl_fast.rewards.code import CodeReward, reference_program_set

        program_set = program_set or reference_program_set(task)
        # The sandbox calls done(frame, state): frame-only programs run behind their adapter.
        runnable = dataclasses.replace(program_set, programs=program_set.worker_programs, inputs="state")
        self.code = CodeReward(runnable, num_envs, limits)
        if all(reason is not None for reason in self.code.disabled):
            self.code.close()
            raise ValueError(f"--reward code: every program of the {task} set was rejected (sub-task 1: "
                             f"{self.code.disabled[0]}); the reward would be 0 throughout.")
        self.num_envs = num_envs
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def stored_width(self) -> int:
        return 1

    @property
    def reads_frames(self) -> bool:
        return self.code.reads_frames

    def observe(self, frames: np.ndarray | None, states: np.ndarray,
                env_ids: np.ndarray) -> torch.Tensor:
        if frames is None:  # no program reads its frame: a 1x1 stand-in spares the render
            frames = np.zeros((len(env_ids), 1, 1, 3), np.uint8)
        progress = self.code.batch(frames, states, env_ids=env_ids)
        return torch.from_numpy(progress).unsqueeze(1).to(self.device)

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, 0]

    def __call__(self, frames: np.ndarray | torch.Tensor,
                 states: np.ndarray | None = None) -> torch.Tensor:
        if states is None:
            raise ValueError("CodeRewardModel: the code reward needs 'states' (N, S) with the frames.")
        if isinstance(frames, torch.Tensor):
            frames = frames.cpu().numpy()
        frames, states = np.asarray(frames), np.asarray(states)
        if frames.ndim != 4 or frames.dtype != np.uint8:
            raise ValueError(f"CodeRewardModel: 'frames' must be (N, H, W, 3) uint8, got "
                             f"{frames.dtype} {frames.shape}.")
        if states.ndim != 2 or len(states) != len(frames):
            raise ValueError(f"CodeRewardModel: 'states' must be (N, S) with N = {len(frames)} "
                             f"frames, got {states.shape}.")
        return torch.from_numpy(self.code.batch(frames, states)).to(self.device)

    def reset(self, env_ids: int | Sequence[int] | None = None) -> None:
        self.code.reset(env_ids)

    def close(self) -> None:
        self.code.close()


REWARD_MODELS: dict[str, type[RewardModel]] = {
    cls.name: cls
    for cls in (CosineReward, GoalBaselineReward, BinaryReward, FuRLRewardModel, CodeRewardModel)
}
"""The registry: reward name -> class. A new reward registers its class here and its config class
in furl_fast.config.REWARD_CONFIGS (the names match)."""


def build_reward(config: Any, context: RewardContext) -> RewardModel:
    """The reward of a training run from its config dataclass (furl_fast.config.RewardConfig)."""
    return REWARD_MODELS[config.name].from_config(config, context)


def make_reward_model(name: str, encoder: Encoder | None, task: str, **kwargs: Any) -> RewardModel:
    """The reward model `name` (cosine, goal_baseline, binary, furl, code) for `task`, built on
    `encoder`; kwargs go to its class (e.g. alpha=, threshold=, binary=, num_envs=)."""
    if name not in REWARD_MODELS:
        raise ValueError(f"make_reward_model: unknown reward {name!r}; choose one of "
                         f"{', '.join(REWARD_MODELS)}.")
    from furl_fast.config import REWARD_CONFIG_CLASSES

    if encoder is None and REWARD_CONFIG_CLASSES[name].needs_encoder:
        raise ValueError(f"make_reward_model: the {name!r} reward needs a VLM encoder.")
    return REWARD_MODELS[name](encoder, task, **kwargs)
