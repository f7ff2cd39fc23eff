"""RL agents: SAC (state) and relay RL scheduling."""
