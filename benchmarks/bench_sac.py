"""SAC update throughput (FuRL's sizes: 39-d state, 4-d action, 256-256 nets, batch 256): furl_fast's
SAC.update, eager and compiled (`SACConfig.compile`: torch.compile, on CUDA as CUDA graphs), vs a
straightforward PyTorch SAC update measured in the same run; FuRL's per-step pair of updates (the
FuRL agent and the relay agent) as one SACEnsemble.update vs two SAC.update and two textbook updates;
plus the FuRL head update.

Run: python -m pytest benchmarks/bench_sac.py --benchmark-only -o python_files='bench_*.py' \
         --benchmark-json=sac.json && python benchmarks/report.py sac.json --unit updates --baseline naive_torch
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from furl_fast.agents.ensemble import SACEnsemble
from furl_fast.agents.sac import SAC
from furl_fast.config import FuRLConfig, SACConfig
from furl_fast.rewards.furl import FuRLReward

OBS, ACT, BATCH, HIDDEN = 39, 4, 256, 256


def _batch(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = {"obs": torch.randn(BATCH, OBS, generator=g), "action": torch.rand(BATCH, ACT, generator=g) * 2 - 1,
         "reward": -torch.rand(BATCH, generator=g), "discount": torch.full((BATCH,), 0.99),
         "next_obs": torch.randn(BATCH, OBS, generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def _mlp(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, o))


class NaiveSAC:
    """The textbook update: two critic modules, three optimisers with default settings, three
    backward passes, a Python loop for the Polyak average. Same maths as furl_fast's SAC."""

    def __init__(self, device: str):
        self.actor = _mlp(OBS, 2 * ACT).to(device)
        self.q1, self.q2 = _mlp(OBS + ACT, 1).to(device), _mlp(OBS + ACT, 1).to(device)
        self.q1_t, self.q2_t = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=1e-4)
        self.critic_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=1e-4)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=1e-4)

    def sample(self, obs):
        mean, raw = self.actor(obs).chunk(2, -1)
        dist = torch.distributions.Normal(mean, F.softplus(raw) + 1e-3)
        u = dist.rsample()
        a = torch.tanh(u)
        return a, (dist.log_prob(u) - torch.log(1 - a.square() + 1e-6)).sum(-1)

    def update(self, b):
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            na, nlp = self.sample(b["next_obs"])
            x = torch.cat([b["next_obs"], na], -1)
            nq = torch.min(self.q1_t(x), self.q2_t(x)).squeeze(-1)
            target = b["reward"] + b["discount"] * (nq - alpha * nlp)
        x = torch.cat([b["obs"], b["action"]], -1)
        critic_loss = F.mse_loss(self.q1(x).squeeze(-1), target) + F.mse_loss(self.q2(x).squeeze(-1), target)
        a, lp = self.sample(b["obs"])
        xa = torch.cat([b["obs"], a], -1)
        actor_loss = (alpha * lp - torch.min(self.q1(xa), self.q2(xa)).squeeze(-1)).mean()
        alpha_loss = (self.log_alpha.exp() * (-lp.detach() + ACT / 2)).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward(retain_graph=True)
        self.actor_opt.zero_grad()
        actor_loss.backward()  # also writes critic grads, but the critic step already happened
        self.critic_opt.step()
        self.actor_opt.step()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.q1, self.q1_t), (self.q2, self.q2_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(0.99).add_(0.01 * p)


IMPLS = ["furl_fast", "furl_fast_compiled", "naive_torch"]


def _make(impl: str, device: str):
    torch.manual_seed(0)
    if impl == "naive_torch":
        return NaiveSAC(device)
    return SAC(OBS, ACT, SACConfig(compile=impl == "furl_fast_compiled"), device=device)


@pytest.mark.parametrize("impl", IMPLS)
def test_sac_update_cpu(benchmark, impl):
    agent, batch = _make(impl, "cpu"), _batch("cpu")
    benchmark.group = f"sac update cpu B={BATCH}"
    benchmark.extra_info.update(updates=1, impl=impl)
    benchmark.pedantic(agent.update, args=(batch,), rounds=100, warmup_rounds=10)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_sac_update_cuda(benchmark, impl):
    agent, batch = _make(impl, "cuda"), _batch("cuda")

    def run():
        agent.update(batch)
        torch.cuda.synchronize()

    benchmark.group = f"sac update cuda B={BATCH}"
    benchmark.extra_info.update(updates=1, impl=impl)
    benchmark.pedantic(run, rounds=200, warmup_rounds=20)


def _make_pair(impl: str, device: str):
    """FuRL's two updates per environment step (FuRL agent, relay agent: same batch, own rewards) as
    one callable (batch, rewards (2, B))."""
    torch.manual_seed(0)
    if impl == "two_naive":
        naive = [NaiveSAC(device), NaiveSAC(device)]
        return lambda batch, rewards: [a.update(dict(batch, reward=r)) for a, r in zip(naive, rewards)]
    cfg = SACConfig(compile=impl.endswith("_compiled"))
    agents = [SAC(OBS, ACT, cfg, device=device), SAC(OBS, ACT, cfg, device=device, metric_prefix="relay_")]
    if impl.startswith("ensemble"):
        return SACEnsemble(agents).update
    return lambda batch, rewards: [a.update(dict(batch, reward=r)) for a, r in zip(agents, rewards)]


@pytest.mark.parametrize("impl", ["ensemble", "two_sac", "two_naive"])
def test_sac_pair_update_cpu(benchmark, impl):
    update, batch = _make_pair(impl, "cpu"), _batch("cpu")
    rewards = torch.stack([batch["reward"], batch["reward"] - 1.0])
    benchmark.group = f"sac + relay updates cpu B={BATCH}"
    benchmark.extra_info.update(updates=2, impl=impl)
    benchmark.pedantic(update, args=(batch, rewards), rounds=100, warmup_rounds=10)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["ensemble", "ensemble_compiled", "two_sac", "two_sac_compiled",
                                  "two_naive"])
def test_sac_pair_update_cuda(benchmark, impl):
    update, batch = _make_pair(impl, "cuda"), _batch("cuda")
    rewards = torch.stack([batch["reward"], batch["reward"] - 1.0])

    def run():
        update(batch, rewards)
        torch.cuda.synchronize()

    benchmark.group = f"sac + relay updates cuda B={BATCH}"
    benchmark.extra_info.update(updates=2, impl=impl)
    benchmark.pedantic(run, rounds=200, warmup_rounds=20)


@pytest.mark.parametrize("phase", ["A", "B"])
def test_furl_heads_update_cpu(benchmark, phase):
    """One reward-alignment step on 1024-d embeddings (RN50's width), 256 samples / triples."""
    torch.manual_seed(0)
    model = FuRLReward(1024, torch.randn(1024), FuRLConfig(), goal_emb=torch.randn(1024))
    emb = torch.randn(BATCH, 1024)
    if phase == "B":
        for _ in range(4):
            model.add_episode(torch.randn(500, 1024), np.zeros(500, bool))
            model.add_episode(torch.randn(500, 1024), np.ones(500, bool))
    benchmark.group = f"furl heads update cpu ({BATCH} samples)"
    benchmark.extra_info.update(updates=1, impl=f"phase_{phase}")
    benchmark.pedantic(model.update, args=(emb,), rounds=100, warmup_rounds=10)
