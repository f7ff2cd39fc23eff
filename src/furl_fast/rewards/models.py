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

make_reward_model(name, encoder, task, **kwargs) builds any of them by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from furl_fast import ops
from furl_fast.vlm import MT10_PROMPTS, Encoder, task_prompt

__all__ = [
    "DEFAULT_BASELINE_PROMPT",
    "REWARD_MODELS",
    "BinaryReward",
    "CodeRewardModel",
    "CosineReward",
    "FuRLRewardModel",
    "GoalBaselineReward",
    "RewardModel",
    "make_reward_model",
]

DEFAULT_BASELINE_PROMPT = "a robot arm and a table"
"""VLM-RM's baseline describes the scene without the goal; this one fits every Meta-World task."""


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)


def _prompt_list(name: str, prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{name} must be a non-empty string or list of non-empty strings, "
                         f"got {prompts!r}.")
    return prompts


class RewardModel:
    """Base class: a batch of frames (or of image embeddings) in, one float32 reward per item out.

    Attributes: `name` (the factory name); `needs_states` (True: __call__ requires `states`);
    `stateful` (True: call reset(env_ids) at episode starts); `decision_threshold` (the reward's own
    success threshold on its continuous score, or None when it has none: see evaluate_reward).
    """

    name: str = ""
    needs_states: bool = False
    stateful: bool = False
    decision_threshold: float | None = None

    def __init__(self, encoder: Encoder | None) -> None:
        self.encoder = encoder

    @property
    def device(self) -> torch.device:
        return self.encoder.device if self.encoder is not None else torch.device("cpu")

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """emb: (N, D) float image embeddings (not necessarily normalised) -> (N,) float32."""
        raise NotImplementedError(f"{type(self).__name__} does not score image embeddings.")

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

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return ops.softmax_goal_reward(self._check_emb(emb), self.text_emb, 0,
                                       temperature=self.temperature,
                                       threshold=self.threshold if self.binary else None)


class FuRLRewardModel(RewardModel):
    """FuRL's aligned reward cos(f_I(emb), f_L(text)) with the heads of a FuRLReward, as they are now.

    furl: the FuRLReward to read (training it stays the caller's job: furl.update / add_episode);
    default a fresh one on the task prompt (untrained heads: the reward means nothing yet).
    Equivalent: ops.mlp_cosine_reward(emb, *furl.fused_params()).
    """

    name = "furl"

    def __init__(self, encoder: Encoder, task: str, *, furl: Any = None, prompt: str | None = None,
                 config: Any = None, seed: int = 0) -> None:
        super().__init__(encoder)
        if furl is None:
            from furl_fast.rewards.furl import FuRLReward

            text = encoder.encode_text([task_prompt(task, prompt)])[0]
            furl = FuRLReward(encoder.embed_dim, text, config, device=encoder.device, seed=seed)
        self.furl = furl

    def reward_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        return ops.mlp_cosine_reward(self._check_emb(emb), *self.furl.fused_params())


class CodeRewardModel(RewardModel):
    """Code-as-reward: (sub-tasks completed so far, in order) / (number of sub-tasks), per episode.

    program_set: default the task's hand-written reference set. num_envs: the batch size every call
    must have (one episode state per slot). Needs states: (num_envs, S) float, the env's state.
    Stateful: reset(env_ids) at each episode start, then score every observation of the episode,
    the reset one included (see furl_fast.rewards.code.reward). The encoder is not used.
    """

    name = "code"
    needs_states = True
    stateful = True

    def __init__(self, encoder: Encoder | None, task: str, *, program_set: Any = None,
                 num_envs: int = 1, limits: Any = None) -> None:
        super().__init__(encoder)
        from furl_fast.rewards.code import CodeReward, reference_program_set

        self.code = CodeReward(program_set or reference_program_set(task), num_envs, limits)
        self.num_envs = num_envs

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
"""Factory names -> classes."""


def make_reward_model(name: str, encoder: Encoder | None, task: str, **kwargs: Any) -> RewardModel:
    """The reward model `name` (cosine, goal_baseline, binary, furl, code) for `task`, built on
    `encoder`; kwargs go to its class (e.g. alpha=, threshold=, binary=, num_envs=)."""
    if name not in REWARD_MODELS:
        raise ValueError(f"make_reward_model: unknown reward {name!r}; choose one of "
                         f"{', '.join(REWARD_MODELS)}.")
    if encoder is None and name != "code":
        raise ValueError(f"make_reward_model: the {name!r} reward needs a VLM encoder.")
    return REWARD_MODELS[name](encoder, task, **kwargs)
