from __future__ import annotations

import pytest
import torch

from furl_fast.agents.drq import PixelEncoder, make_drq
from furl_fast.agents.sac import SAC
from furl_fast.config import DrQConfig, SACConfig

SHAPE = (9, 84, 84)  # 3 stacked RGB frames


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g),
            "action": torch.rand(n, 2, generator=g) * 2 - 1, "reward": torch.randn(n, generator=g),
            "discount": torch.full((n,), 0.99),
            "next_obs": torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)}


def test_encoder_shapes_and_range():
    enc = PixelEncoder(SHAPE, 50)
    out = enc(torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8))
    assert out.shape == (3, 50) and out.dtype == torch.float32 and out.abs().max() <= 1
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 9, 84, 84\)"):
        enc(torch.zeros(3, 3, 84, 84))


def test_bf16_conv_stack_matches_fp32_and_trains_fp32_weights():
    torch.manual_seed(0)
    fp32 = PixelEncoder(SHAPE, 16)
    bf16 = PixelEncoder(SHAPE, 16, conv_dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    conv_out_dtypes = []
    bf16.convs[-2].register_forward_hook(lambda _m, _i, out: conv_out_dtypes.append(out.dtype))
    obs = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8)
    want, got = fp32(obs), bf16(obs)
    assert conv_out_dtypes == [torch.bfloat16] and got.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: features in [-1, 1] agree to a few hundredths after LayerNorm.
    torch.testing.assert_close(got, want, atol=5e-2, rtol=0)
    assert not torch.equal(got, want)  # it really ran in bf16

    agent = make_drq(SHAPE, 2, SACConfig(hidden_dims=(32,)), DrQConfig(feature_dim=16, precision="bf16"))
    assert agent.encoder.conv_dtype == torch.bfloat16
    before = [p.detach().clone() for p in agent.encoder.parameters()]
    metrics = agent.update(_batch(), log=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    for p, old in zip(agent.encoder.parameters(), before):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert not torch.equal(p, old)
    assert make_drq(SHAPE, 2).encoder.conv_dtype == torch.float32  # auto on a CPU
    with pytest.raises(ValueError, match="conv_dtype must be"):
        PixelEncoder(SHAPE, 16, conv_dtype=torch.float16)


def test_encoder_is_trained_by_the_critic_loss_only():
    torch.manual_seed(0)
    agent = make_drq(SHAPE, 2, SACConfig(hidden_dims=(32,)), DrQConfig(feature_dim=16))
    batch = _batch()
    torch.manual_seed(1)
    agent.update(batch)
    got = [p.grad.clone() for p in agent.encoder.parameters()]

    # The same step's critic loss alone, recomputed with the same noise from a copy of the pre-update
    # agent, gives the same encoder gradient: the actor loss does not reach the encoder.
    torch.manual_seed(0)
    ref = make_drq(SHAPE, 2, SACConfig(hidden_dims=(32,)), DrQConfig(feature_dim=16))
    torch.manual_seed(1)
    with torch.no_grad():
        nf = ref.encoder(batch["next_obs"])
        na, nlp = ref.actor.sample(nf)
        target = batch["reward"] + batch["discount"] * (
            ref.critic_target(nf, na).min(0).values - ref.alpha * nlp)
    loss = (ref.critic(ref.encoder(batch["obs"]), batch["action"]) - target).square().mean(1).sum()
    expected = torch.autograd.grad(loss, list(ref.encoder.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_act_single_and_batched_and_state_round_trip():
    torch.manual_seed(0)
    agent = make_drq(SHAPE, 2, SACConfig(hidden_dims=(32,)), DrQConfig(feature_dim=16))
    obs = _batch(3)["obs"]
    assert agent.act(obs).shape == (3, 2)
    assert agent.act(obs[0], deterministic=True).shape == (2,)
    other = make_drq(SHAPE, 2, SACConfig(hidden_dims=(32,)), DrQConfig(feature_dim=16))
    other.load_state_dict(agent.state_dict())
    torch.testing.assert_close(other.act(obs, deterministic=True), agent.act(obs, deterministic=True))
    with pytest.raises(ValueError, match="pixel encoder"):
        SAC(16, 2, SACConfig(hidden_dims=(32,))).load_state_dict(agent.state_dict())


@pytest.mark.cuda
def test_auto_precision_is_bf16_on_cuda_and_updates():
    agent = make_drq(SHAPE, 2, SACConfig(hidden_dims=(32,)), DrQConfig(feature_dim=16), device="cuda")
    assert agent.encoder.conv_dtype == torch.bfloat16
    batch = {k: v.cuda() for k, v in _batch().items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in agent.update(batch, log=True).values())
