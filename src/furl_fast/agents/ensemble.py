"""K SAC agents of one shape trained by one update: FuRL's agent and its relay agent.

FuRL trains two SAC agents (agents.sac) on every sampled batch: the FuRL agent on the shaped reward,
the relay agent on the environment reward alone. SACEnsemble stacks the members' actors, twin critics
and target critics along a leading member axis, so each layer of every member is one batched matmul,
and one backward pass and one Adam step train all of them. No parameter is shared, so the summed loss
gives each member the gradient of its own loss, and Adam (elementwise, same step count) moves each
member's slice as that member's own optimiser would: one update equals K SAC.update calls on the same
batch, each with its own reward, temperature and target entropy (up to float rounding).

Its state_dict is the members' SAC state_dicts stacked (stack_state_dicts / split_state_dict), so a
member can be exported as a plain SAC agent (to_agents) and SAC checkpoints load into it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from furl_fast.agents.sac import (SAC, _adam, batch_fields, metric_names, observation_batch,
                                  squashed_gaussian_log_prob)

__all__ = ["EnsembleMember", "SACEnsemble", "split_state_dict", "stack_state_dicts"]

_NETWORKS = ("actor", "critic", "critic_target")


class SACEnsemble:
    """K SAC agents trained together; member k starts as a copy of agents[k].

    agents: SAC agents with the same obs_dim, act_dim, config and device; the ensemble copies their
    state (networks, target critics, log_alpha, Adam moments and step count, which must be equal),
    metric prefixes and target entropies. The agents themselves are neither changed nor used again.
    """

    def __init__(self, agents: Sequence[SAC]):
        if not agents:
            raise ValueError("SACEnsemble: give at least one SAC agent.")
        first = agents[0]
        for agent in agents[1:]:
            if (agent.obs_dim, agent.act_dim, agent.config, agent.device) != \
                    (first.obs_dim, first.act_dim, first.config, first.device):
                raise ValueError("SACEnsemble: every agent needs the same obs_dim, act_dim, SACConfig "
                                 f"and device; got ({agent.obs_dim}, {agent.act_dim}, {agent.config}, "
                                 f"{agent.device}) beside ({first.obs_dim}, {first.act_dim}, "
                                 f"{first.config}, {first.device}).")
        self.config, self.device = first.config, first.device
        self.obs_dim, self.act_dim = first.obs_dim, first.act_dim
        self.num_members = len(agents)
        self.metric_prefixes = [agent.metric_prefix for agent in agents]
        self._metric_names = [name for prefix in self.metric_prefixes for name in metric_names(prefix)]
        self.update_every_steps = 1  # FuRL: one update per environment step
        self.target_entropy = torch.tensor([agent.target_entropy for agent in agents],
                                           dtype=torch.float32, device=self.device)
        # Parameters in the SAC modules' order (and names): the optimiser's state then lines up
        # index by index with each member's SAC optimiser.
        stacked = stack_state_dicts([agent.state_dict() for agent in agents])

        def parameters(name: str) -> list[nn.Parameter]:
            return [nn.Parameter(t.to(self.device)) for t in stacked[name].values()]

        self._keys = {name: list(stacked[name]) for name in _NETWORKS}
        self.actor = parameters("actor")  # (K, out, in) weights, (K, out) biases: nn.Linear's layout
        self.critic = parameters("critic")  # (K, Q, in, out) weights, then (K, Q, 1, out) biases
        self.critic_target = [p.requires_grad_(False) for p in parameters("critic_target")]
        self.log_alpha = nn.Parameter(stacked["log_alpha"].to(self.device))  # (K,)
        self.optimizer = _adam(
            [{"params": self.actor, "lr": self.config.actor_lr},
             {"params": self.critic, "lr": self.config.critic_lr},
             {"params": [self.log_alpha], "lr": self.config.alpha_lr}],
            self.device,
        )
        # A copy: the agents' step counts are their own tensors, which Adam increments in place.
        self.optimizer.load_state_dict(copy.deepcopy(stacked["optimizer"]))
        self._losses = self._eager_losses
        self._graphed = self.config.compile and self.device.type == "cuda"
        if self.config.compile:
            # fullgraph: the whole loss computation of every member is one graph (an error, not a
            # silent split, otherwise), so on CUDA its forward and its backward replay as one CUDA
            # graph each.
            self._losses = torch.compile(self._eager_losses, fullgraph=True,
                                         mode="reduce-overhead" if self._graphed else "default")

    def members(self) -> list[EnsembleMember]:
        """One acting view per member: members()[k].act is member k's policy."""
        return [EnsembleMember(self, k) for k in range(self.num_members)]

    # -- networks --------------------------------------------------------------------------------

    def _policy(self, obs: torch.Tensor, members: slice = slice(None)
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, obs_dim), shared by the members -> (mean, std) of each member's pre-tanh Gaussian,
        each (M, B, act_dim) for the M members selected."""
        h = obs
        last = len(self.actor) // 2 - 1
        for i, (w, b) in enumerate(zip(self.actor[0::2], self.actor[1::2])):
            w, b = w[members], b[members]
            h = torch.baddbmm(b.unsqueeze(1), h.expand(w.shape[0], *h.shape[-2:]), w.transpose(1, 2))
            if i < last:
                h = torch.relu_(h)  # in place: baddbmm's backward does not read its output
        mean, raw_std = h.chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.config.std_min

    def _sample(self, obs: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised actions (K, B, act_dim) = tanh(mean + std * eps) and their log-probs (K, B)."""
        mean, std = self._policy(obs)
        u = mean + std * eps
        return torch.tanh(u), squashed_gaussian_log_prob(eps, u, std)

    def _q(self, params: list[torch.Tensor], obs: torch.Tensor, act: torch.Tensor,
           detach: bool = False) -> torch.Tensor:
        """Every member's twin Q-values (K, Q, B) of obs (B, obs_dim) and act (B, act_dim) or
        (K, B, act_dim); all K * Q networks in one batched matmul per layer. detach=True reads the
        weights without recording gradients for them (the actor loss)."""
        k, b = self.num_members, obs.shape[0]
        x = torch.cat([obs.expand(k, b, -1), act.expand(k, b, -1)], dim=-1)
        weights, biases = params[: len(params) // 2], params[len(params) // 2:]
        num_q = weights[0].shape[1]
        h = x.unsqueeze(1).expand(k, num_q, *x.shape[1:]).flatten(0, 1)
        for i, (w, bias) in enumerate(zip(weights, biases)):
            if detach:
                w, bias = w.detach(), bias.detach()
            h = torch.baddbmm(bias.flatten(0, 1), h, w.flatten(0, 1))
            if i < len(weights) - 1:
                if self.config.critic_layer_norm:
                    h = F.layer_norm(h, h.shape[-1:])
                h = torch.relu_(h)
        return h.view(k, num_q, b)

    # -- acting and training ---------------------------------------------------------------------

    @torch.no_grad()
    def act(self, obs: torch.Tensor | np.ndarray, member: int, deterministic: bool = False
            ) -> torch.Tensor:
        """Member `member`'s actions, as SAC.act: obs (B, obs_dim) or (obs_dim,) float -> (B, act_dim)
        or (act_dim,) float32 in [-1, 1]; deterministic=True gives tanh(mean)."""
        if not 0 <= member < self.num_members:
            raise ValueError(f"SACEnsemble.act: member={member} is not in [0, {self.num_members}).")
        obs, single = observation_batch(obs, self.obs_dim, self.device, "SACEnsemble.act")
        mean, std = self._policy(obs, slice(member, member + 1))
        u = mean[0] if deterministic else mean[0] + std[0] * torch.randn_like(mean[0])
        action = torch.tanh(u)
        return action[0] if single else action

    def update(self, batch: Mapping[str, torch.Tensor] | Any, rewards: torch.Tensor,
               log: bool = False, noise: torch.Tensor | None = None) -> dict[str, Any]:
        """One SAC.update of every member on the same transitions, as one backward pass and one Adam
        step, then the Polyak average of every member's target critics.

        batch: as for SAC.update (a mapping or an object with attributes), of which obs (B, obs_dim),
        action (B, act_dim), discount (B,) and next_obs (B, obs_dim) are read; its reward is not.
        rewards: (K, B) float32, row k member k's reward.
        noise: (2, K, B, act_dim) standard normal draws for the policy samples at next_obs and at obs;
        None draws them. All on the ensemble's device.
        Returns every member's SAC.update metrics under its own prefix: 0-dim tensors, or Python
        floats with log=True (one host sync for all of them).
        """
        obs, action, discount, next_obs = batch_fields(batch, "obs", "action", "discount", "next_obs")
        discount = discount.reshape(-1)
        shape = (self.num_members, obs.shape[0])
        if rewards.shape != shape:
            raise ValueError(f"SACEnsemble.update: rewards must be (num_members, batch) = {shape}, one "
                             f"row per member, got {tuple(rewards.shape)}.")
        noise_shape = (2, *shape, self.act_dim)
        if noise is None:
            noise = torch.randn(noise_shape, device=self.device)
        elif noise.shape != noise_shape:
            raise ValueError(f"SACEnsemble.update: noise must be (2, num_members, batch, act_dim) = "
                             f"{noise_shape}, got {tuple(noise.shape)}.")
        if self._graphed:
            torch.compiler.cudagraph_mark_step_begin()  # the last update's outputs are consumed
        loss, stats = self._losses(obs, action, rewards, discount, next_obs, noise)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.critic_target, self.critic, self.config.tau)

        if log:
            return dict(zip(self._metric_names, stats.flatten().tolist()))
        if self._graphed:
            stats = stats.clone()  # the next replay of the graph overwrites its outputs
        return dict(zip(self._metric_names, stats.flatten().unbind()))

    def _eager_losses(self, obs: torch.Tensor, action: torch.Tensor, rewards: torch.Tensor,
                      discount: torch.Tensor, next_obs: torch.Tensor, noise: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAC._eager_losses of every member, summed over members, and (K, 6) detached stats."""
        alpha = self.log_alpha.detach().exp()  # (K,)
        with torch.no_grad():
            next_action, next_log_prob = self._sample(next_obs, noise[0])
            next_q = self._q(self.critic_target, next_obs, next_action).min(dim=1).values
            target = rewards + discount * (next_q - alpha[:, None] * next_log_prob)  # (K, B)
        q = self._q(self.critic, obs, action)  # (K, Q, B)
        critic_loss = (q - target[:, None]).square().mean(dim=2).sum(dim=1)

        new_action, log_prob = self._sample(obs, noise[1])
        q_pi = self._q(self.critic, obs, new_action, detach=True).min(dim=1).values
        actor_loss = (alpha[:, None] * log_prob - q_pi).mean(dim=1)

        entropy = -log_prob.detach().mean(dim=1)
        alpha_loss = self.log_alpha.exp() * (entropy - self.target_entropy)
        stats = torch.stack([critic_loss, actor_loss, alpha_loss, alpha, entropy, q.mean(dim=(1, 2))],
                            dim=1).detach()
        return (critic_loss + actor_loss + alpha_loss).sum(), stats

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The members' SAC.state_dict()s stacked (stack_state_dicts); split_state_dict undoes it."""
        state: dict[str, Any] = {
            name: {key: p.detach().clone() for key, p in zip(self._keys[name], getattr(self, name))}
            for name in _NETWORKS
        }
        state["log_alpha"] = self.log_alpha.detach().clone()
        state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a state_dict() or stack_state_dicts() of K SAC agents' state_dicts."""
        if "log_alpha" not in state:
            raise ValueError("SACEnsemble.load_state_dict: the state is not a SAC agent's (agent sac vs "
                             "drq).")
        for name in _NETWORKS:
            if list(state[name]) != self._keys[name]:
                raise ValueError(f"SACEnsemble.load_state_dict: {name} holds {list(state[name])}, "
                                 f"this ensemble's {self._keys[name]}.")
            for key, p in zip(self._keys[name], getattr(self, name)):
                if state[name][key].shape != p.shape:
                    raise ValueError(f"SACEnsemble.load_state_dict: {name}.{key} has shape "
                                     f"{tuple(state[name][key].shape)}, this ensemble's is "
                                     f"{tuple(p.shape)} (members, then the SAC agent's shape).")
        with torch.no_grad():
            for name in _NETWORKS:
                for key, p in zip(self._keys[name], getattr(self, name)):
                    p.copy_(state[name][key])
            self.log_alpha.copy_(state["log_alpha"])
        # Optimizer.load_state_dict keeps the given moment tensors: copy so nothing shares them.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def to_agents(self) -> list[SAC]:
        """Each member as a plain SAC agent holding its current state (networks, targets, log_alpha,
        optimiser); the caller's random stream is left as it was."""
        with torch.random.fork_rng(devices=[]):  # new SACs draw initial weights (on the CPU)
            agents = [SAC(self.obs_dim, self.act_dim, self.config, self.device, metric_prefix=prefix)
                      for prefix in self.metric_prefixes]
        for agent, state, entropy in zip(agents, split_state_dict(self.state_dict()),
                                         self.target_entropy.tolist()):
            agent.load_state_dict(state)
            agent.target_entropy = entropy
        return agents


class EnsembleMember:
    """Member `index` of an SACEnsemble as an acting agent (act, update_every_steps, as SAC's); the
    ensemble trains it."""

    def __init__(self, ensemble: SACEnsemble, index: int):
        self.ensemble, self.index = ensemble, index
        self.update_every_steps = ensemble.update_every_steps

    def act(self, obs: torch.Tensor | np.ndarray, deterministic: bool = False) -> torch.Tensor:
        """SAC.act of this member."""
        return self.ensemble.act(obs, self.index, deterministic)


def stack_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """K SAC.state_dict()s -> one SACEnsemble.state_dict(): every tensor stacked along a new leading
    member axis; the Adam step counts, which the members share, must be equal."""
    if not states:
        raise ValueError("stack_state_dicts: give at least one SAC state_dict.")
    if any("log_alpha" not in s for s in states):
        raise ValueError("stack_state_dicts: every state must be a SAC agent's (agent sac vs drq).")
    first = states[0]
    stacked: dict[str, Any] = {name: {key: torch.stack([s[name][key] for s in states])
                                      for key in first[name]} for name in _NETWORKS}
    stacked["log_alpha"] = torch.stack([s["log_alpha"] for s in states])
    optimizers = [s["optimizer"] for s in states]
    settings = [[{k: v for k, v in g.items() if k != "params"} for g in o["param_groups"]]
                for o in optimizers]
    if any(s != settings[0] for s in settings):
        raise ValueError("stack_state_dicts: the agents' optimisers differ in their settings (learning "
                         "rates, betas, ...); one Adam step trains all members, so they must agree.")
    param_states = {}
    for index in optimizers[0]["state"]:
        entries = [o["state"].get(index) for o in optimizers]
        if any(e is None for e in entries) or any(not torch.equal(e["step"], entries[0]["step"])
                                                  for e in entries):
            steps = [None if e is None else float(e["step"]) for e in entries]
            raise ValueError(f"stack_state_dicts: the agents' Adam step counts differ ({steps}); one "
                             "Adam step trains all members, so they must have taken the same steps.")
        param_states[index] = {key: value if key == "step" else torch.stack([e[key] for e in entries])
                               for key, value in entries[0].items()}
    if any(len(o["state"]) != len(param_states) for o in optimizers):
        raise ValueError("stack_state_dicts: the agents' Adam step counts differ (some have not "
                         "stepped); one Adam step trains all members, so they must have taken the same "
                         "steps.")
    stacked["optimizer"] = {"state": param_states,
                            "param_groups": copy.deepcopy(optimizers[0]["param_groups"])}
    return stacked


def split_state_dict(state: dict[str, Any]) -> list[dict[str, Any]]:
    """SACEnsemble.state_dict() -> its members' SAC.state_dict()s (stack_state_dicts undone)."""
    num_members = state["log_alpha"].shape[0]

    def member(k: int) -> dict[str, Any]:
        out: dict[str, Any] = {name: {key: t[k].clone() for key, t in state[name].items()}
                               for name in _NETWORKS}
        out["log_alpha"] = state["log_alpha"][k].clone()
        out["optimizer"] = {
            "state": {index: {key: value.clone() if key == "step" else value[k].clone()
                              for key, value in entry.items()}
                      for index, entry in state["optimizer"]["state"].items()},
            "param_groups": copy.deepcopy(state["optimizer"]["param_groups"]),
        }
        return out

    return [member(k) for k in range(num_members)]
