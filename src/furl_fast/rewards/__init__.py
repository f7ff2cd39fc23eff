"""Reward models on top of VLM embeddings (FuRL aligned heads, ...)."""
