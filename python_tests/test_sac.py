from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from furl_fast.agents.sac import SAC, squashed_gaussian_log_prob
from furl_fast.config import SACConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A tiny agent whose losses can be recomputed by hand: obs_dim 1, act_dim 1, one hidden layer of 2.
TINY = SACConfig(hidden_dims=(2,), init_alpha=0.5, tau=0.25)


def _set_tiny_weights(agent: SAC) -> None:
    with torch.no_grad():
        l1, l2 = agent.actor.net[0], agent.actor.net[2]
        l1.weight.copy_(torch.tensor([[0.5], [-1.0]]))
        l1.bias.copy_(torch.tensor([0.1, 0.2]))
        l2.weight.copy_(torch.tensor([[0.3, -0.2], [0.4, 0.1]]))  # rows: mean, raw std
        l2.bias.copy_(torch.tensor([0.05, -0.3]))
        w1, w2 = agent.critic.weights
        b1, b2 = agent.critic.biases
        w1.copy_(torch.tensor([[[0.2, -0.4], [0.7, 0.3]], [[-0.5, 0.6], [0.1, 0.8]]]))  # (q, in, h)
        b1.copy_(torch.tensor([[[0.1, 0.0]], [[0.0, -0.2]]]))
        w2.copy_(torch.tensor([[[1.0], [-0.5]], [[0.6], [0.9]]]))
        b2.copy_(torch.tensor([[[0.3]], [[-0.1]]]))
        agent.critic_target.load_state_dict(agent.critic.state_dict())
        for p in agent.critic_target.parameters():
            p.mul_(0.9)  # target differs from the online critic, so the test sees which one is used


def _relu(x: float) -> float:
    return max(0.0, x)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _hand_actor(obs: float, eps: float) -> tuple[float, float]:
    """(action, log_prob) of the tiny actor, written out by hand."""
    h = [_relu(0.5 * obs + 0.1), _relu(-1.0 * obs + 0.2)]
    mean = 0.3 * h[0] - 0.2 * h[1] + 0.05
    std = _softplus(0.4 * h[0] + 0.1 * h[1] - 0.3) + 1e-3
    u = mean + std * eps
    a = math.tanh(u)
    log_prob = -0.5 * eps**2 - math.log(std) - 0.5 * math.log(2 * math.pi) - math.log(1 - a**2)
    return a, log_prob


def _hand_q(obs: float, act: float, scale: float = 1.0) -> list[float]:
    """Both Q-values of the tiny critic (scale=0.9: its target copy)."""
    w1 = [[[0.2, -0.4], [0.7, 0.3]], [[-0.5, 0.6], [0.1, 0.8]]]
    b1 = [[0.1, 0.0], [0.0, -0.2]]
    w2 = [[1.0, -0.5], [0.6, 0.9]]
    b2 = [0.3, -0.1]
    qs = []
    for q in range(2):
        h = [_relu(scale * (obs * w1[q][0][k] + act * w1[q][1][k] + b1[q][k])) for k in range(2)]
        qs.append(scale * (h[0] * w2[q][0] + h[1] * w2[q][1] + b2[q]))
    return qs


def _tiny_batch() -> dict[str, torch.Tensor]:
    return {
        "obs": torch.tensor([[0.4], [-0.3]]),
        "action": torch.tensor([[0.2], [-0.7]]),
        "reward": torch.tensor([-1.0, 0.5]),
        "discount": torch.tensor([0.99, 0.0]),
        "next_obs": torch.tensor([[0.1], [0.9]]),
    }


def assert_lecun_normal(weight: torch.Tensor, bias: torch.Tensor, fan_in: int) -> None:
    """FuRL's release initialisation (flax's lecun_normal Dense default): weights from a normal
    truncated at two standard deviations with std 1 / sqrt(fan_in), biases zero. (nn.Linear's
    default uniform(+-1/sqrt(fan_in)) has std 1 / sqrt(3 fan_in), and nonzero biases.)"""
    assert torch.count_nonzero(bias) == 0
    w, std = weight.detach().double(), 1.0 / math.sqrt(fan_in)
    assert w.abs().max() <= 2 * std / 0.87962566103423978 + 1e-6  # the truncation
    if w.numel() >= 2_000:  # enough draws: the std within 6% (the spread of the estimate is ~1.6%)
        assert abs(w.std().item() / std - 1) < 0.06, (w.std().item(), std, tuple(w.shape))
        assert abs(w.mean().item()) < 0.1 * std  # centred


def test_actor_and_critics_start_lecun_normal_with_zero_biases():
    torch.manual_seed(0)
    agent = SAC(39, 4, SACConfig())
    layers = [m for m in agent.actor.net if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in layers] == [39, 256, 256]
    for layer in layers:  # nn.Linear weights are (out, in)
        assert_lecun_normal(layer.weight, layer.bias, layer.in_features)
    for w, b in zip(agent.critic.weights, agent.critic.biases):  # (num_q, in, out)
        assert_lecun_normal(w, b, w.shape[1])
    torch.testing.assert_close(agent.critic_target.state_dict(), agent.critic.state_dict())


def test_squashed_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.1
    eps = torch.randn(5, 3, generator=g)
    u = mean + std * eps
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform()]
    )
    expected = dist.log_prob(torch.tanh(u)).sum(-1)
    torch.testing.assert_close(squashed_gaussian_log_prob(eps, u, std), expected, rtol=1e-4, atol=1e-4)
    # Stays finite where tanh saturates (the naive log(1 - tanh^2) gives -inf there).
    big = torch.tensor([[30.0]])
    assert torch.isfinite(squashed_gaussian_log_prob(torch.zeros(1, 1), big, torch.ones(1, 1))).all()


def test_losses_match_hand_computation_from_pre_update_networks():
    agent = SAC(1, 1, TINY)
    _set_tiny_weights(agent)
    batch = _tiny_batch()
    # update() draws the next-state noise first, then the current-state noise: replay those draws.
    torch.manual_seed(123)
    eps_next, eps_now = torch.randn(2, 1), torch.randn(2, 1)
    torch.manual_seed(123)
    metrics = agent.update(batch, log=True)

    alpha = 0.5
    target_entropy = -0.5
    critic_loss = [0.0, 0.0]
    actor_terms, log_probs = [], []
    for i in range(2):
        obs, act = batch["obs"][i].item(), batch["action"][i].item()
        next_a, next_lp = _hand_actor(batch["next_obs"][i].item(), eps_next[i].item())
        next_q = min(_hand_q(batch["next_obs"][i].item(), next_a, scale=0.9))
        target = batch["reward"][i].item() + batch["discount"][i].item() * (next_q - alpha * next_lp)
        for q, value in enumerate(_hand_q(obs, act)):
            critic_loss[q] += (value - target) ** 2 / 2
        a_new, lp = _hand_actor(obs, eps_now[i].item())
        actor_terms.append(alpha * lp - min(_hand_q(obs, a_new)))
        log_probs.append(lp)
    entropy = -sum(log_probs) / 2
    assert metrics["losses/critic"] == pytest.approx(sum(critic_loss), rel=1e-5)
    assert metrics["losses/actor"] == pytest.approx(sum(actor_terms) / 2, rel=1e-5)
    assert metrics["losses/alpha"] == pytest.approx(alpha * (entropy - target_entropy), rel=1e-5)
    assert metrics["charts/alpha"] == pytest.approx(alpha)
    assert metrics["charts/entropy"] == pytest.approx(entropy, rel=1e-5)


def test_critic_gradient_comes_from_critic_loss_only_and_targets_are_polyak_averaged():
    torch.manual_seed(0)
    agent = SAC(3, 2, SACConfig(hidden_dims=(8, 8), tau=0.1))
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(6, 3, generator=g), "action": torch.rand(6, 2, generator=g) * 2 - 1,
             "reward": torch.randn(6, generator=g), "discount": torch.full((6,), 0.99),
             "next_obs": torch.randn(6, 3, generator=g)}
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.05)
    before = [p.detach().clone() for p in agent.critic.parameters()]
    target_before = [p.detach().clone() for p in agent.critic_target.parameters()]

    # Recompute the critic loss alone with the same noise and compare gradients.
    torch.manual_seed(7)
    with torch.no_grad():
        next_a, next_lp = agent.actor.sample(batch["next_obs"])
        next_q = agent.critic_target(batch["next_obs"], next_a).min(0).values
        target = batch["reward"] + batch["discount"] * (next_q - agent.alpha * next_lp)
    critic_loss = (agent.critic(batch["obs"], batch["action"]) - target).square().mean(1).sum()
    expected_grads = torch.autograd.grad(critic_loss, list(agent.critic.parameters()))
    torch.manual_seed(7)
    agent.update(batch)
    for p, g_exp in zip(agent.critic.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g_exp)
    for p_t, p_old_t, p in zip(agent.critic_target.parameters(), target_before, agent.critic.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p_old_t + 0.1 * p.detach())
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.critic.parameters()))
    assert agent.log_alpha.grad is not None and agent.log_alpha.grad.abs() > 0


def test_layer_norm_critic_normalises_each_hidden_layer_before_its_relu():
    # Hidden width 3 (LayerNorm over 2 units is only ever +-1), so the hand version is a real check.
    torch.manual_seed(0)
    agent = SAC(2, 1, SACConfig(hidden_dims=(3, 3), critic_layer_norm=True))
    obs, act = torch.randn(5, 2), torch.rand(5, 1) * 2 - 1
    (w1, w2, w3), (b1, b2, b3) = agent.critic.weights, agent.critic.biases

    def normalised(h: torch.Tensor) -> torch.Tensor:
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5)

    h = torch.cat([obs, act], -1).expand(2, 5, 3)
    h = torch.relu(normalised(h @ w1 + b1))
    h = torch.relu(normalised(h @ w2 + b2))
    torch.testing.assert_close(agent.critic(obs, act), (h @ w3 + b3).squeeze(-1))
    # Scale-free hidden layers: scaling the first layer leaves Q unchanged (it would not without).
    with torch.no_grad():
        before = agent.critic(obs, act)
        w1.mul_(7.0), b1.mul_(7.0)
        torch.testing.assert_close(agent.critic(obs, act), before, rtol=1e-4, atol=1e-5)
    plain = SAC(2, 1, SACConfig(hidden_dims=(3, 3)))
    assert plain.critic.state_dict().keys() == agent.critic.state_dict().keys()  # no new parameters


def test_update_returns_tensors_without_log_and_floats_with_log():
    agent = SAC(3, 2, SACConfig(hidden_dims=(8,)))
    batch = {"obs": torch.randn(4, 3), "action": torch.zeros(4, 2), "reward": torch.zeros(4),
             "discount": torch.ones(4), "next_obs": torch.randn(4, 3)}
    metrics = agent.update(batch)
    assert set(metrics) >= {"losses/critic", "losses/actor", "losses/alpha", "charts/alpha"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    logged = agent.update(batch, log=True)
    assert all(isinstance(v, float) for v in logged.values())
    assert all(k.startswith(("losses/", "charts/")) for k in logged)


def test_adam_is_fused_on_the_cpu_too():
    # One vectorised pass per parameter instead of one pass per step of Adam's maths (foreach).
    assert SAC(3, 2, SACConfig(hidden_dims=(8,))).optimizer.defaults["fused"]


def test_act_shapes_bounds_and_deterministic_mean():
    agent = SAC(5, 3, SACConfig(hidden_dims=(16,)))
    obs = torch.randn(7, 5)
    a = agent.act(obs)
    assert a.shape == (7, 3) and a.dtype == torch.float32 and a.abs().max() <= 1
    assert agent.act(np.zeros(5, dtype=np.float64)).shape == (3,)
    torch.testing.assert_close(agent.act(obs, deterministic=True), torch.tanh(agent.actor(obs)[0]))
    with pytest.raises(ValueError, match="obs must have shape"):
        agent.act(torch.zeros(2, 4))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    cfg = SACConfig(hidden_dims=(16, 16))
    a, b = SAC(3, 2, cfg), SAC(3, 2, cfg)
    batch = {"obs": torch.randn(8, 3), "action": torch.rand(8, 2) * 2 - 1, "reward": torch.randn(8),
             "discount": torch.full((8,), 0.99), "next_obs": torch.randn(8, 3)}
    for _ in range(3):
        a.update(batch)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    ma = a.update(batch, log=True)
    torch.manual_seed(5)
    mb = b.update(batch, log=True)
    assert ma == mb
    for pa, pb in zip(a.actor.parameters(), b.actor.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    torch.testing.assert_close(a.log_alpha, b.log_alpha, rtol=0, atol=0)


@pytest.mark.slow
def test_sac_learns_pendulum():
    """SAC beats a random policy on Pendulum-v1 by a wide margin (random: about -1,200 per episode).

    Smaller nets and a higher learning rate than the spec's FuRL settings keep this at a few thousand
    updates on a 2-core CPU; the algorithm under test is the same.
    """
    gym = pytest.importorskip("gymnasium")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    env = gym.make("Pendulum-v1")
    cfg = SACConfig(hidden_dims=(64, 64), actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3,
                    init_alpha=0.1)
    agent = SAC(3, 1, cfg)
    steps, warmup, batch_size = 6_000, 1_000, 128
    store = {"obs": np.zeros((steps, 3), np.float32), "action": np.zeros((steps, 1), np.float32),
             "reward": np.zeros(steps, np.float32), "discount": np.zeros(steps, np.float32),
             "next_obs": np.zeros((steps, 3), np.float32)}
    obs, _ = env.reset(seed=0)
    for t in range(steps):
        if t < warmup:
            action = rng.uniform(-1, 1, 1).astype(np.float32)
        else:
            action = agent.act(obs).numpy()
        next_obs, reward, terminated, truncated, _ = env.step(2.0 * action)  # torque in [-2, 2]
        for key, value in (("obs", obs), ("action", action), ("reward", reward),
                           ("discount", 0.99 * (1.0 - terminated)), ("next_obs", next_obs)):
            store[key][t] = value
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if t >= warmup:
            idx = rng.integers(0, t + 1, batch_size)
            agent.update({k: torch.from_numpy(v[idx]) for k, v in store.items()})

    def mean_return(policy, episodes: int = 5) -> float:
        total = 0.0
        for e in range(episodes):
            o, _ = env.reset(seed=1000 + e)
            done = False
            while not done:
                o, r, term, trunc, _ = env.step(2.0 * policy(o))
                total += r
                done = term or trunc
        return total / episodes

    learned = mean_return(lambda o: agent.act(o, deterministic=True).numpy())
    random_policy = mean_return(lambda o: rng.uniform(-1, 1, 1).astype(np.float32))
    env.close()
    assert random_policy < -900, random_policy
    assert learned > -400, (learned, random_policy)


@pytest.mark.cuda
def test_cuda_update_uses_fused_adam_and_matches_cpu_losses():
    torch.manual_seed(0)
    cpu = SAC(5, 2, SACConfig(hidden_dims=(32, 32)))
    gpu = SAC(5, 2, SACConfig(hidden_dims=(32, 32)), device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.optimizer.defaults["fused"]
    batch = {"obs": torch.randn(16, 5), "action": torch.rand(16, 2) * 2 - 1, "reward": torch.randn(16),
             "discount": torch.full((16,), 0.99), "next_obs": torch.randn(16, 5)}
    # The critic loss needs the policy noise; with the same actor, compare the deterministic parts.
    q_cpu = cpu.critic(batch["obs"], batch["action"])
    q_gpu = gpu.critic(batch["obs"].cuda(), batch["action"].cuda())
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, rtol=1e-4, atol=1e-4)
    metrics = gpu.update({k: v.cuda() for k, v in batch.items()})
    assert all(v.is_cuda for v in metrics.values())
    assert all(np.isfinite(v) for v in gpu.update({k: v.cuda() for k, v in batch.items()}, log=True).values())
    assert gpu.act(torch.randn(3, 5)).is_cuda


def test_batch_may_be_a_named_tuple_and_metric_prefix_applies():
    from typing import NamedTuple

    class Batch(NamedTuple):
        obs: torch.Tensor
        action: torch.Tensor
        reward: torch.Tensor
        discount: torch.Tensor
        next_obs: torch.Tensor

    agent = SAC(3, 2, SACConfig(hidden_dims=(8,)), metric_prefix="relay_")
    batch = Batch(torch.randn(4, 3), torch.zeros(4, 2), torch.zeros(4), torch.ones(4), torch.randn(4, 3))
    assert "losses/relay_critic" in agent.update(batch, log=True)


def _compiled_and_eager(device: str) -> tuple[SAC, SAC, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    eager = SAC(5, 2, SACConfig(hidden_dims=(32, 32)), device=device)
    compiled = SAC(5, 2, SACConfig(hidden_dims=(32, 32), compile=True), device=device)
    compiled.load_state_dict(eager.state_dict())
    batch = {"obs": torch.randn(16, 5), "action": torch.rand(16, 2) * 2 - 1, "reward": torch.randn(16),
             "discount": torch.full((16,), 0.99), "next_obs": torch.randn(16, 5)}
    return eager, compiled, {k: v.to(device) for k, v in batch.items()}


def _assert_same_training(eager: SAC, compiled: SAC, batch: dict[str, torch.Tensor]) -> None:
    # fallback_random: the compiled graph draws the policy noise from torch's generator, as eager
    # does, so the same seed gives the same samples.
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(3):
            torch.manual_seed(step)
            expected = eager.update(batch, log=True)
            torch.manual_seed(step)
            got = compiled.update(batch, log=True)
            assert got.keys() == expected.keys()
            np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-4,
                                       atol=1e-5)
    for module in ("actor", "critic", "critic_target"):
        for pe, pc in zip(getattr(eager, module).parameters(), getattr(compiled, module).parameters()):
            torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.log_alpha, eager.log_alpha)


@pytest.mark.slow
def test_compiled_update_trains_like_eager():
    eager, compiled, batch = _compiled_and_eager("cpu")
    _assert_same_training(eager, compiled, batch)


@pytest.mark.cuda
def test_cuda_graphed_update_trains_like_eager_and_keeps_its_metrics():
    eager, compiled, batch = _compiled_and_eager("cuda")
    assert compiled._graphed
    _assert_same_training(eager, compiled, batch)
    first = compiled.update(batch)
    kept = {k: v.item() for k, v in first.items()}
    compiled.update(batch)  # replays the graph over its output buffers
    assert {k: v.item() for k, v in first.items()} == kept
