from __future__ import annotations

import dataclasses

import pytest
import torch

from furl_fast.agents.drq import DrQV2, PixelEncoder
from furl_fast.agents.sac import SAC
from furl_fast.config import DrQConfig, SACConfig

SHAPE = (9, 84, 84)  # 3 stacked RGB frames
SMALL = DrQConfig(feature_dim=16, hidden_dim=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g),
            "action": torch.rand(n, 2, generator=g) * 2 - 1, "reward": torch.randn(n, generator=g),
            "discount": torch.full((n,), 0.99),
            "next_obs": torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)}


def _agent(seed: int = 0, config: DrQConfig = SMALL, **kw) -> DrQV2:
    torch.manual_seed(seed)
    return DrQV2(SHAPE, 2, config, **kw)


def test_defaults_are_drqv2s_published_hyper_parameters():
    # drqv2 cfgs/config.yaml and cfgs/task/easy.yaml (the 1.1M-frame budget).
    c = DrQConfig()
    assert (c.lr, c.feature_dim, c.hidden_dim, c.n_step, c.gamma) == (1e-4, 50, 1024, 3, 0.99)
    assert (c.critic_target_tau, c.update_every_steps, c.stddev_clip) == (0.01, 2, 0.3)
    assert (c.stddev_init, c.stddev_final, c.stddev_steps) == (1.0, 0.1, 100_000)
    assert (c.action_repeat, c.frame_stack, c.image_size, c.shift_pad) == (2, 3, 84, 4)


def test_encoder_shapes_and_range():
    enc = PixelEncoder(SHAPE)
    out = enc(torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8))
    assert enc.repr_dim == 32 * 35 * 35 and out.shape == (3, enc.repr_dim)
    assert out.dtype == torch.float32 and out.min() >= 0  # ReLU features
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 9, 84, 84\)"):
        enc(torch.zeros(3, 3, 84, 84))
    with pytest.raises(ValueError, match="H, W >= 16"):
        PixelEncoder((9, 8, 8))


def test_actor_and_critic_have_their_own_trunks_and_a_target_critic():
    agent = _agent()
    actor, critic, target = (set(map(id, m.parameters())) for m in
                             (agent.actor, agent.critic, agent.critic_target))
    encoder = set(map(id, agent.encoder.parameters()))
    assert not (actor & critic or actor & encoder or critic & encoder or target & critic)
    for trunk in (agent.actor.trunk, agent.critic.trunk):
        assert [type(m) for m in trunk] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Tanh]
        assert trunk[0].in_features == agent.encoder.repr_dim and trunk[0].out_features == 16
    for a, b in zip(agent.critic.parameters(), agent.critic_target.parameters()):
        assert torch.equal(a, b) and not b.requires_grad


def test_encoder_and_critic_gradients_come_from_the_critic_loss_only():
    agent, batch = _agent(), _batch()
    torch.manual_seed(1)
    agent.update(batch)
    encoder_grads = [p.grad.clone() for p in agent.encoder.parameters()]
    critic_grads = [p.grad.clone() for p in agent.critic.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.actor.trunk.parameters())

    # The same step's critic loss alone, recomputed with the same noise from a copy of the pre-update
    # agent, gives the same encoder and critic gradients: the actor loss reaches neither.
    ref = _agent()
    torch.manual_seed(1)
    with torch.no_grad():
        nh = ref.encoder(batch["next_obs"])
        mean = ref.actor(nh)
        na = (mean + (torch.randn_like(mean) * ref.stddev()).clamp(-0.3, 0.3)).clamp(-1, 1)
        target = batch["reward"] + batch["discount"] * ref.critic_target(nh, na).min(0).values
    loss = (ref.critic(ref.encoder(batch["obs"]), batch["action"]) - target).square().mean(1).sum()
    params = [*ref.encoder.parameters(), *ref.critic.parameters()]
    expected = torch.autograd.grad(loss, params)
    for g, e in zip(encoder_grads + critic_grads, expected):
        torch.testing.assert_close(g, e)


def test_target_critic_follows_by_polyak_averaging():
    agent = _agent(config=dataclasses.replace(SMALL, critic_target_tau=0.25))
    before = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(_batch())
    critic = list(agent.critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(critic, before))  # the critic moved
    for t, old, c in zip(agent.critic_target.parameters(), before, critic):
        torch.testing.assert_close(t, 0.75 * old + 0.25 * c)


def test_exploration_std_follows_the_linear_schedule():
    agent = _agent()  # SMALL keeps the default schedule
    # linear(1.0, 0.1, 100000) over agent steps, then constant.
    for step, want in [(0, 1.0), (25_000, 0.775), (50_000, 0.55), (100_000, 0.1), (10**7, 0.1)]:
        assert agent.stddev(step) == pytest.approx(want)
    agent.step = 50_000
    assert agent.stddev() == pytest.approx(0.55)
    assert agent.update(_batch(), log=True)["charts/stddev"] == pytest.approx(0.55)

    # act() adds N(0, std^2) around the deterministic mean at the agent's current step.
    agent = _agent(config=dataclasses.replace(SMALL, stddev_init=0.5, stddev_final=0.0,
                                              stddev_steps=100))
    obs = _batch(1)["obs"].expand(400, *SHAPE)
    mean = agent.act(obs[:1], deterministic=True)
    assert mean.abs().max() < 0.8  # far enough from the bounds that clamping is rare
    for step, std in [(0, 0.5), (80, 0.1)]:
        agent.step = step
        noise = agent.act(obs) - mean
        assert abs(noise.std().item() - std) < 0.1 * std and abs(noise.mean().item()) < 0.1 * std
    agent.step = 100
    torch.testing.assert_close(agent.act(obs[:2]), mean.expand(2, 2))  # std 0: the mean


def test_target_and_actor_noise_are_clipped_and_actions_stay_in_bounds():
    agent = _agent()
    h = agent.encoder(_batch(1)["obs"]).expand(1000, -1)
    mean = agent.actor(h)
    sampled = agent.actor.sample(h, std=10.0, clip=0.3)
    assert (sampled - mean).abs().max() <= 0.3 + 1e-6
    wide = agent.actor.sample(h, std=10.0, clip=None)
    assert wide.abs().max() <= 1.0 and (wide.abs() == 1.0).any()  # clamped, not clipped noise


def test_update_every_steps_is_the_config_value():
    assert _agent().update_every_steps == 2
    assert _agent(config=dataclasses.replace(SMALL, update_every_steps=3)).update_every_steps == 3
    assert SAC(4, 2, SACConfig(hidden_dims=(8,))).update_every_steps == 1


def test_bf16_conv_stack_matches_fp32_and_trains_fp32_weights():
    torch.manual_seed(0)
    fp32 = PixelEncoder(SHAPE)
    bf16 = PixelEncoder(SHAPE, conv_dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    conv_out_dtypes = []
    bf16.convs[-2].register_forward_hook(lambda _m, _i, out: conv_out_dtypes.append(out.dtype))
    obs = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8)
    want, got = fp32(obs), bf16(obs)
    assert conv_out_dtypes == [torch.bfloat16] and got.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: four convolutions agree to about 2^-8 relative to the features' scale.
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)
    assert not torch.equal(got, want)  # it really ran in bf16

    agent = _agent(config=dataclasses.replace(SMALL, precision="bf16"))
    assert agent.encoder.conv_dtype == torch.bfloat16
    before = [p.detach().clone() for p in agent.encoder.parameters()]
    metrics = agent.update(_batch(), log=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    for p, old in zip(agent.encoder.parameters(), before):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert not torch.equal(p, old)
    assert _agent().encoder.conv_dtype == torch.float32  # the default
    with pytest.raises(ValueError, match="conv_dtype must be"):
        PixelEncoder(SHAPE, conv_dtype=torch.float16)


def test_act_single_and_batched_and_state_round_trip():
    agent = _agent()
    obs = _batch(3)["obs"]
    assert agent.act(obs).shape == (3, 2)
    assert agent.act(obs[0], deterministic=True).shape == (2,)
    agent.update(_batch())
    agent.step = 1234
    other = _agent(seed=1)
    other.load_state_dict(agent.state_dict())
    assert other.step == 1234
    torch.testing.assert_close(other.act(obs, deterministic=True), agent.act(obs, deterministic=True))
    for a, b in zip(agent.critic_target.parameters(), other.critic_target.parameters()):
        assert torch.equal(a, b)
    # The optimiser moments travel too: the next update is the same on both.
    batch = _batch()
    torch.manual_seed(5)
    agent.update(batch)
    torch.manual_seed(5)
    other.update(batch)
    for a, b in zip(agent.encoder.parameters(), other.encoder.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="agent sac vs drq"):
        SAC(16, 2, SACConfig(hidden_dims=(32,))).load_state_dict(agent.state_dict())
    with pytest.raises(ValueError, match="agent sac vs drq"):
        agent.load_state_dict(SAC(16, 2, SACConfig(hidden_dims=(32,))).state_dict())


def test_precision_is_fp32_unless_bf16_is_asked_for():
    """DrQ-v2 as published runs fp32; bf16 is an explicit choice, on every device."""
    from furl_fast.config import Config

    assert DrQConfig().precision == "fp32"
    with pytest.raises(ValueError, match="--drq.precision auto is unknown; use one of fp32"):
        Config(agent="drq", drq=DrQConfig(precision="auto")).validate()


@pytest.mark.cuda
def test_precision_on_cuda_is_fp32_by_default_and_bf16_updates():
    assert _agent(device="cuda").encoder.conv_dtype == torch.float32
    agent = _agent(config=dataclasses.replace(SMALL, precision="bf16"), device="cuda")
    assert agent.encoder.conv_dtype == torch.bfloat16
    batch = {k: v.cuda() for k, v in _batch().items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in agent.update(batch, log=True).values())
    assert agent.act(batch["obs"]).device.type == "cuda"


def test_bad_drq_settings_are_refused_by_name():
    from furl_fast.config import Config

    bad = DrQConfig(n_step=0, update_every_steps=0, stddev_clip=-0.1, critic_target_tau=0.0)
    with pytest.raises(ValueError) as err:
        Config(agent="drq", drq=bad).validate()
    for name in ("--drq.n-step 0", "--drq.update-every-steps 0", "--drq.stddev-clip -0.1",
                 "--drq.critic-target-tau 0.0"):
        assert name in str(err.value), name
