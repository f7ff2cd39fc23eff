"""Frozen vision-language encoders (open_clip, LIV) for VLM rewards: batched frame encoding through the
fused preprocess op, cached text embeddings."""

from __future__ import annotations

from furl_fast.vlm.encoder import Encoder, load_encoder

__all__ = ["Encoder", "load_encoder"]
