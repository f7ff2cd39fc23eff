"""Frozen vision-language encoders (open_clip) for VLM rewards: batched frame encoding through the fused
preprocess op, cached text embeddings, and the task-prompt table."""

from __future__ import annotations

from furl_fast.vlm.encoder import Encoder, furl_crop, load_encoder
from furl_fast.vlm.prompts import MT10_PROMPTS, task_prompt

__all__ = ["MT10_PROMPTS", "Encoder", "furl_crop", "load_encoder", "task_prompt"]
