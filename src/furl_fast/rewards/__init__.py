"""Reward models on top of VLM embeddings behind one interface (models.RewardModel): zero-shot cosine
and goal-baseline (VLM-RM), binary (Baumli et al.), FuRL's aligned heads, code-as-reward; Gymnasium
wrappers that add any of them to an env; goal-detection metrics for reward evaluation."""

from __future__ import annotations

from furl_fast.rewards.models import (
    DEFAULT_BASELINE_PROMPT,
    REWARD_MODELS,
    BinaryReward,
    CodeRewardModel,
    CosineReward,
    FuRLRewardModel,
    GoalBaselineReward,
    RewardContext,
    RewardModel,
    build_reward,
    make_reward_model,
)
from furl_fast.rewards.wrapper import VLMRewardVectorWrapper, VLMRewardWrapper

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
    "VLMRewardVectorWrapper",
    "VLMRewardWrapper",
    "build_reward",
    "make_reward_model",
]
