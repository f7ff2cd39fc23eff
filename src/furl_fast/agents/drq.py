"""DrQ-v2 (Yarats, Fergus, Lazaric, Pinto 2021): a deterministic actor-critic from pixels.

- Encoder: a conv stack (32 filters 3x3: stride 2, then three of stride 1, ReLU) on stacked 84x84
  RGB frames, flattened. Only the critic loss trains it; the actor reads its output detached.
- Actor and critic each have their own trunk, Linear -> LayerNorm -> tanh to feature_dim, then MLPs
  with hidden_dim units: the policy mean tanh(mu(s)), twin Q(s, a) on [trunk(s), a].
- Exploration: a = mu(s) + N(0, std^2), std on a linear schedule over agent steps; the target and
  the actor loss use the same noise clipped to +-stddev_clip. Actions are clamped to [-1, 1] with a
  straight-through gradient.
- Critic: n-step TD (the replay buffer sums the rewards) against min of the twin target critics;
  the target critic (its trunk included) follows by Polyak averaging. The actor maximises min Q of
  the critic after this step's critic update.
- One update every update_every_steps agent steps (the trainer calls update() that often).

The random-shift augmentation is NOT done here: the replay buffer applies it while gathering the
batch (furl_fast.replay, augment=True). Hyper-parameters: furl_fast.config.DrQConfig.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from furl_fast.agents.sac import _adam
from furl_fast.config import DrQConfig

__all__ = ["DrQV2", "PixelEncoder", "exploration_std"]


def _orthogonal_init(module: nn.Module) -> None:
    # DrQ-v2's initialisation: orthogonal weights (ReLU gain for convolutions), zero biases.
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.orthogonal_(module.weight, nn.init.calculate_gain("relu"))
        nn.init.zeros_(module.bias)


class PixelEncoder(nn.Module):
    """(B, C, H, W) uint8 (or float in [0, 255]) -> (B, repr_dim) float32 conv features.

    conv_dtype: torch.bfloat16 runs the conv stack (forward and backward: the agent's hot path) under
    autocast; weights and gradients stay float32. bfloat16 keeps float32's range, so no loss scaling
    is needed.
    """

    def __init__(self, input_shape: tuple[int, int, int], conv_dtype: torch.dtype = torch.float32):
        super().__init__()
        if conv_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"PixelEncoder: conv_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{conv_dtype}.")
        if len(input_shape) != 3 or min(input_shape[1:]) < 16:
            raise ValueError(f"PixelEncoder: input_shape must be (C, H, W) with H, W >= 16, got "
                             f"{tuple(input_shape)}.")
        self.conv_dtype = conv_dtype
        self.input_shape = tuple(int(v) for v in input_shape)
        c, h, w = self.input_shape
        self.convs = nn.Sequential(
            nn.Conv2d(c, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.apply(_orthogonal_init)
        with torch.no_grad():
            self.repr_dim = int(self.convs(torch.zeros(1, c, h, w)).shape[1])  # 32 * 35 * 35 at 84

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dim() != 4 or tuple(obs.shape[1:]) != self.input_shape:
            raise ValueError(f"PixelEncoder: obs must have shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(obs.shape)}.")
        x = obs.float() / 255.0 - 0.5
        if self.conv_dtype == torch.float32:
            return self.convs(x)
        with torch.autocast(x.device.type, dtype=self.conv_dtype):
            h = self.convs(x)
        return h.float()


def exploration_std(config: DrQConfig, step: int) -> float:
    """Exploration std at agent step `step`: linear from stddev_init to stddev_final over
    stddev_steps agent steps, then constant (DrQ-v2's linear schedule)."""
    mix = min(max(step / config.stddev_steps, 0.0), 1.0)
    return (1.0 - mix) * config.stddev_init + mix * config.stddev_final


def _trunk(repr_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                         nn.ReLU(), nn.Linear(hidden_dim, out_dim))


def _clamp_straight_through(x: torch.Tensor) -> torch.Tensor:
    """x clamped to [-1, 1] in the forward pass, with the gradient of the identity (DrQ-v2)."""
    return x + (x.clamp(-1.0, 1.0) - x).detach()


class Actor(nn.Module):
    """conv features (B, repr_dim) -> policy mean tanh(mu) (B, act_dim), through its own trunk."""

    def __init__(self, repr_dim: int, act_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.policy = _mlp(feature_dim, hidden_dim, act_dim)
        self.apply(_orthogonal_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.policy(self.trunk(h)))

    def sample(self, h: torch.Tensor, std: float, clip: float | None) -> torch.Tensor:
        """mean + N(0, std^2) noise (clipped to +-clip unless None), clamped to [-1, 1]."""
        mean = self(h)
        noise = torch.randn_like(mean) * std
        if clip is not None:
            noise = noise.clamp(-clip, clip)
        return _clamp_straight_through(mean + noise)


class Critic(nn.Module):
    """(conv features (B, repr_dim), actions (B, act_dim)) -> twin Q-values (2, B), own trunk."""

    def __init__(self, repr_dim: int, act_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.q1 = _mlp(feature_dim + act_dim, hidden_dim, 1)
        self.q2 = _mlp(feature_dim + act_dim, hidden_dim, 1)
        self.apply(_orthogonal_init)

    def forward(self, h: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.trunk(h), action], dim=-1)
        return torch.stack([self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)])


class DrQV2:
    """DrQ-v2 agent (see the module docstring).

    obs_shape: (frame_stack * 3, image_size, image_size) of the uint8 pixel stacks it acts on.
    act_dim: action width (actions live in [-1, 1]).
    step: agent steps taken so far (simulator steps / action_repeat); the exploration std follows it.
    The trainer sets it before acting and updating, and state_dict() keeps it.
    metric_prefix: inserted into metric names, e.g. "relay_" -> "losses/relay_critic".
    """

    def __init__(self, obs_shape: tuple[int, int, int], act_dim: int, config: DrQConfig | None = None,
                 device: torch.device | str = "cpu", metric_prefix: str = ""):
        if act_dim <= 0:
            raise ValueError(f"DrQV2: act_dim must be positive, got {act_dim}.")
        self.config = config = config or DrQConfig()
        self.device = torch.device(device)
        self.act_dim = act_dim
        self.metric_prefix = metric_prefix
        self.update_every_steps = config.update_every_steps
        self.step = 0
        conv_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        self.encoder = PixelEncoder(obs_shape, conv_dtype).to(self.device)
        repr_dim = self.encoder.repr_dim
        self.actor = Actor(repr_dim, act_dim, config.feature_dim, config.hidden_dim).to(self.device)
        self.critic = Critic(repr_dim, act_dim, config.feature_dim, config.hidden_dim).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # DrQ-v2 steps separate encoder and critic Adams after the same backward pass; Adam is
        # per-parameter, so one optimiser over both is the same update.
        self.critic_optimizer = _adam(
            [{"params": [*self.encoder.parameters(), *self.critic.parameters()], "lr": config.lr}],
            self.device)
        self.actor_optimizer = _adam([{"params": list(self.actor.parameters()), "lr": config.lr}],
                                     self.device)
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())

    def stddev(self, step: int | None = None) -> float:
        """Exploration std at agent step `step` (default: self.step): exploration_std."""
        return exploration_std(self.config, self.step if step is None else step)

    @torch.no_grad()
    def act(self, obs: torch.Tensor | np.ndarray, deterministic: bool = False) -> torch.Tensor:
        """obs: (B, C, H, W) or (C, H, W) uint8 pixel stacks -> actions (B, act_dim) or (act_dim,)
        float32 in [-1, 1] on the agent's device: the policy mean plus the scheduled exploration
        noise (unclipped, as DrQ-v2 acts), or the mean alone when deterministic (evaluation)."""
        obs = torch.as_tensor(obs, device=self.device)
        single = obs.dim() == len(self.encoder.input_shape)
        if single:
            obs = obs.unsqueeze(0)
        h = self.encoder(obs)
        action = self.actor(h) if deterministic else self.actor.sample(h, self.stddev(), clip=None)
        return action[0] if single else action

    def update(self, batch: Mapping[str, torch.Tensor] | Any, log: bool = False) -> dict[str, Any]:
        """One DrQ-v2 update: critic and encoder, then actor, then the target critic.

        batch: a mapping or an object with attributes (e.g. furl_fast.replay.Batch) holding obs and
        next_obs (B, C, H, W) uint8 (already random-shifted), action (B, act_dim), reward (B,) (the
        n-step sum), discount (B,) = gamma^n * (1 - terminated), on the agent's device.
        Returns losses/* and charts/* metrics: 0-dim tensors (no host sync) unless log=True, then
        Python floats (one sync for all of them).
        """
        get = batch.__getitem__ if isinstance(batch, Mapping) else partial(getattr, batch)
        obs, action, next_obs = get("obs"), get("action"), get("next_obs")
        reward, discount = get("reward").reshape(-1), get("discount").reshape(-1)
        std, clip = self.stddev(), self.config.stddev_clip

        h = self.encoder(obs)  # the critic loss trains the encoder through these
        with torch.no_grad():
            next_h = self.encoder(next_obs)
            next_action = self.actor.sample(next_h, std, clip)
            target = reward + discount * self.critic_target(next_h, next_action).min(dim=0).values
        q = self.critic(h, action)
        critic_loss = (q - target).square().mean(dim=1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        # The actor reads detached features and the critic just updated; no gradient for the critic.
        h = h.detach()
        self.critic.requires_grad_(False)
        q_pi = self.critic(h, self.actor.sample(h, std, clip)).min(dim=0).values
        self.critic.requires_grad_(True)
        actor_loss = -q_pi.mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._critic_params, self.config.critic_target_tau)

        p = self.metric_prefix
        stats = torch.stack([critic_loss.detach(), actor_loss.detach(), q.detach().mean(),
                             target.mean()])
        names = [f"losses/{p}critic", f"losses/{p}actor", f"charts/{p}q", f"charts/{p}target_q"]
        metrics: dict[str, Any] = dict(zip(names, stats.tolist() if log else stats.unbind()))
        metrics[f"charts/{p}stddev"] = std
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Networks, target critic, both optimisers and the agent step (the std schedule's clock)."""
        return {
            "agent": "drqv2",
            "step": self.step,
            "encoder": self.encoder.state_dict(),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("agent") != "drqv2":
            raise ValueError("DrQV2.load_state_dict: the checkpoint is not a DrQ-v2 agent's (agent sac "
                             "vs drq).")
        self.step = int(state["step"])
        self.encoder.load_state_dict(state["encoder"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        # Optimizer.load_state_dict keeps the given moment tensors: copy so two agents never share them.
        self.critic_optimizer.load_state_dict(copy.deepcopy(state["critic_optimizer"]))
        self.actor_optimizer.load_state_dict(copy.deepcopy(state["actor_optimizer"]))
