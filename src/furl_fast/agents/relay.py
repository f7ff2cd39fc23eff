"""Relay RL scheduling (the FuRL paper, "Relay RL").

Within an episode, control alternates between the FuRL agent and the relay agent every K steps, K drawn
per episode from {50, 100, 150, 200}; which agent starts flips every episode (the FuRL agent starts each
environment's first episode). The relay agent's actions get N(0, 0.2^2) noise, clipped to [-1, 1].
Relay stops for good once a count reaches 2,500 (relay_stop_count): for FuRL the positive frames its
embedding buffer has stored (the paper's rule), for the relay baseline (raw VLM reward + relay) the
steps with success, as FuRL's release counts them for that baseline; from then on only the first
agent acts.

The schedule is a small state machine, deterministic given its seed, with one stream per parallel
environment, and is checkpointed with state_dict()/load_state_dict(). Steps count actions (agent
steps; with action repeat each is several simulator steps). Per environment step:

    sched.begin_episode()                  # once, after the first reset (all envs)
    ...
    mask = sched.relay_mask()              # (num_envs,) bool: where the relay agent acts now
    actions = sched.choose_actions(furl_actions, relay_actions)
    ... env.step(actions) ...
    sched.step()                           # every env advanced one step
    sched.begin_episode(done_ids)          # after step(): a new episode's first action is its step 0
    sched.observe_positives(count)         # after each episode: count += relay_stop_count(...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from furl_fast.config import FuRLConfig

__all__ = ["RelaySchedule", "relay_stop_count"]


def relay_stop_count(algo: str, success: np.ndarray) -> int:
    """What a finished episode adds to the count that ends relay RL
    (FuRLConfig.relay_stop_positives).

    algo: "furl": the positive frames FuRL's embedding buffer stores of the episode
    (rewards.furl.label_episode), the FuRL paper's rule; "relay": its steps with success, the
    rule of FuRL's release for the relay baseline.
    success: (T,) bool, the episode's per-step success flags.
    """
    if algo == "furl":
        from furl_fast.rewards.furl import label_episode

        return label_episode(success)
    if algo == "relay":
        return int(np.count_nonzero(success))
    raise ValueError(f"relay_stop_count: algo must be 'furl' or 'relay' (the algos with relay RL), "
                     f"got {algo!r}.")


class RelaySchedule:
    """Which agent controls each of num_envs environments at each step of its episode."""

    def __init__(self, num_envs: int = 1, k_choices: Sequence[int] = (50, 100, 150, 200),
                 noise_std: float = 0.2, stop_positives: int = 2_500, seed: int = 0):
        if num_envs < 1:
            raise ValueError(f"RelaySchedule: num_envs={num_envs} must be >= 1.")
        if not k_choices or any(int(k) <= 0 for k in k_choices):
            raise ValueError(f"RelaySchedule: k_choices={tuple(k_choices)} must be positive segment lengths.")
        if noise_std < 0:
            raise ValueError(f"RelaySchedule: noise_std={noise_std} must be >= 0.")
        self.num_envs = num_envs
        self.k_choices = np.asarray(k_choices, dtype=np.int64)
        self.noise_std = float(noise_std)
        self.stop_positives = int(stop_positives)
        self.rng = np.random.default_rng(seed)
        self.enabled = True
        self.k = np.zeros(num_envs, dtype=np.int64)  # segment length of the current episode (0: none begun)
        self.t = np.zeros(num_envs, dtype=np.int64)  # step within the current episode
        self.relay_starts = np.zeros(num_envs, dtype=bool)
        self.episodes = np.zeros(num_envs, dtype=np.int64)  # episodes begun so far

    @classmethod
    def from_config(cls, config: FuRLConfig, num_envs: int = 1, seed: int = 0) -> RelaySchedule:
        return cls(num_envs, config.relay_k_choices, config.relay_noise_std,
                   config.relay_stop_positives, seed)

    def _ids(self, env_ids: Sequence[int] | np.ndarray | None) -> np.ndarray:
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_envs):
            raise IndexError(f"RelaySchedule: env ids {ids.tolist()} out of range [0, {self.num_envs}).")
        return ids

    def begin_episode(self, env_ids: Sequence[int] | np.ndarray | None = None) -> None:
        """A new episode starts in these environments (all when None): draw K, flip the starter."""
        ids = self._ids(env_ids)
        # Episode e of an environment starts with the relay agent when e is odd.
        self.relay_starts[ids] = self.episodes[ids] % 2 == 1
        self.k[ids] = self.rng.choice(self.k_choices, size=ids.size)
        self.t[ids] = 0
        self.episodes[ids] += 1

    def relay_mask(self) -> np.ndarray:
        """(num_envs,) bool: True where the relay agent acts at the current step."""
        if not self.enabled:
            return np.zeros(self.num_envs, dtype=bool)
        if (self.k == 0).any():
            raise RuntimeError("RelaySchedule: call begin_episode() after resetting the environments.")
        odd_segment = (self.t // self.k) % 2 == 1
        return self.relay_starts ^ odd_segment

    def choose_actions(self, furl_actions: np.ndarray, relay_actions: np.ndarray | None) -> np.ndarray:
        """(num_envs, act_dim) actions of both agents -> the ones to execute, float32.

        Where the relay agent acts, its action plus N(0, noise_std^2) noise, clipped to [-1, 1];
        elsewhere the FuRL agent's action. relay_actions may be None when relay_mask() is all False.
        """
        furl_actions = np.asarray(furl_actions, dtype=np.float32)
        if furl_actions.ndim != 2 or furl_actions.shape[0] != self.num_envs:
            raise ValueError(f"RelaySchedule.choose_actions: furl_actions must be (num_envs={self.num_envs}, "
                             f"act_dim), got {furl_actions.shape}.")
        mask = self.relay_mask()
        if not mask.any():
            return furl_actions
        if relay_actions is None:
            raise ValueError("RelaySchedule.choose_actions: the relay agent acts now; pass relay_actions.")
        relay_actions = np.asarray(relay_actions, dtype=np.float32)
        if relay_actions.shape != furl_actions.shape:
            raise ValueError(f"RelaySchedule.choose_actions: relay_actions shape {relay_actions.shape} "
                             f"differs from furl_actions {furl_actions.shape}.")
        out = furl_actions.copy()
        noise = self.rng.normal(0.0, self.noise_std, size=(int(mask.sum()), out.shape[1]))
        out[mask] = np.clip(relay_actions[mask] + noise, -1.0, 1.0)
        return out

    def step(self) -> None:
        """Every environment has taken one step."""
        self.t += 1

    def observe_positives(self, positives_stored: int) -> bool:
        """Turns relay off for good once positives_stored >= stop_positives; returns enabled."""
        if positives_stored >= self.stop_positives:
            self.enabled = False
        return self.enabled

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "enabled": self.enabled,
            "k": self.k.copy(),
            "t": self.t.copy(),
            "relay_starts": self.relay_starts.copy(),
            "episodes": self.episodes.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if np.asarray(state["k"]).shape != (self.num_envs,):
            raise ValueError(f"RelaySchedule checkpoint is for {np.asarray(state['k']).shape[0]} "
                             f"environments; this schedule has {self.num_envs}.")
        self.rng.bit_generator.state = state["rng"]
        self.enabled = bool(state["enabled"])
        self.k[:] = state["k"]
        self.t[:] = state["t"]
        self.relay_starts[:] = state["relay_starts"]
        self.episodes[:] = state["episodes"]
