"""RL agents: SAC (state), an ensemble of SAC agents trained by one update (the FuRL and relay
agents), DrQ-v2 (pixels) and relay RL scheduling."""
