"""Frozen vision-language encoders (open_clip) for VLM rewards: batched frame encoding through the fused
preprocess op, cached text embeddings. MT10_PROMPTS and task_prompt are Meta-World's
(furl_fast.envs.metaworld), importable here for the reward models."""

from __future__ import annotations

from furl_fast.envs.metaworld.prompts import MT10_PROMPTS, task_prompt
from furl_fast.vlm.encoder import Encoder, load_encoder

__all__ = ["MT10_PROMPTS", "Encoder", "load_encoder", "task_prompt"]
