from __future__ import annotations

import contextlib
import copy
import dataclasses

import numpy as np
import pytest
import torch

from furl_fast.agents.ensemble import SACEnsemble, split_state_dict, stack_state_dicts
from furl_fast.agents.sac import SAC
from furl_fast.config import SACConfig
from furl_fast.runs import load_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Odd sizes and two different hidden widths, so a transposed or swapped axis shows.
OBS, ACT, BATCH = 7, 3, 13
CONFIG = SACConfig(hidden_dims=(16, 24), tau=0.1)


def _agents(seed: int = 0, config: SACConfig = CONFIG) -> list[SAC]:
    """The FuRL agent and a relay agent with its own temperature and target entropy."""
    torch.manual_seed(seed)
    furl, relay = SAC(OBS, ACT, config), SAC(OBS, ACT, config, metric_prefix="relay_")
    with torch.no_grad():
        relay.log_alpha.fill_(-0.7)
    relay.target_entropy = -0.4
    return [furl, relay]


def _batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"obs": torch.randn(BATCH, OBS, generator=gen),
            "action": torch.rand(BATCH, ACT, generator=gen) * 2 - 1,
            "discount": torch.full((BATCH,), 0.99) * (torch.rand(BATCH, generator=gen) > 0.2),
            "next_obs": torch.randn(BATCH, OBS, generator=gen)}


@contextlib.contextmanager
def _policy_noise(monkeypatch, draws: list[torch.Tensor]):
    """SAC.update's two policy samples (next_obs first, then obs) take these draws."""
    queue = iter(draws)
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", lambda t: next(queue).clone())
        yield


def _separate_updates(agents, batch, rewards, noise, monkeypatch, log=True) -> dict:
    metrics = {}
    for k, agent in enumerate(agents):
        with _policy_noise(monkeypatch, [noise[0, k], noise[1, k]]):
            metrics.update(agent.update({**batch, "reward": rewards[k]}, log=log))
    return metrics


def _assert_states_close(got: dict, expected: dict, **tol) -> None:
    for name in ("actor", "critic", "critic_target"):
        assert got[name].keys() == expected[name].keys()
        for key in expected[name]:
            torch.testing.assert_close(got[name][key], expected[name][key], **tol, msg=f"{name}.{key}")
    torch.testing.assert_close(got["log_alpha"], expected["log_alpha"], **tol)
    got_opt, expected_opt = got["optimizer"]["state"], expected["optimizer"]["state"]
    assert got_opt.keys() == expected_opt.keys()
    for index, entry in expected_opt.items():
        assert got_opt[index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(got_opt[index][key], value, **tol, msg=f"Adam {index}.{key}")


@pytest.mark.parametrize("critic_layer_norm", [False, True])
def test_fused_update_equals_separate_sac_updates(gen, monkeypatch, critic_layer_norm):
    agents = _agents(config=dataclasses.replace(CONFIG, critic_layer_norm=critic_layer_norm))
    ensemble = SACEnsemble(agents)
    for _ in range(5):
        batch = _batch(gen)
        rewards = torch.randn(2, BATCH, generator=gen)
        noise = torch.randn(2, 2, BATCH, ACT, generator=gen)
        expected = _separate_updates(agents, batch, rewards, noise, monkeypatch)
        got = ensemble.update(batch, rewards, log=True, noise=noise)
        assert list(got) == list(expected)  # the same names, the relay member's with "relay_"
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-5, atol=1e-6)
    assert "losses/relay_critic" in got and got["charts/relay_alpha"] != got["charts/alpha"]
    for member, agent in zip(split_state_dict(ensemble.state_dict()), agents):
        _assert_states_close(member, agent.state_dict())
        assert float(member["optimizer"]["state"][0]["step"]) == 5


def test_update_returns_tensors_without_log_and_draws_its_own_noise(gen):
    ensemble = SACEnsemble(_agents())
    metrics = ensemble.update(_batch(gen), torch.zeros(2, BATCH))
    assert len(metrics) == 12 and all(isinstance(v, torch.Tensor) and v.dim() == 0
                                      for v in metrics.values())
    assert all(np.isfinite(v) for v in ensemble.update(_batch(gen), torch.zeros(2, BATCH),
                                                       log=True).values())


def test_members_act_as_their_sac_agents(gen):
    agents = _agents()
    members = SACEnsemble(agents).members()
    obs = torch.randn(5, OBS, generator=gen)
    for member, agent in zip(members, agents):
        torch.testing.assert_close(member.act(obs, deterministic=True),
                                   agent.act(obs, deterministic=True))
        torch.manual_seed(3)
        sampled = member.act(obs)
        torch.manual_seed(3)
        torch.testing.assert_close(sampled, agent.act(obs))
        assert member.act(np.zeros(OBS)).shape == (ACT,) and member.update_every_steps == 1


def test_members_export_as_sac_agents_that_train_on_identically(gen, monkeypatch):
    """to_agents / SACEnsemble(agents) and split_state_dict / stack_state_dicts are exact round trips:
    exported agents, or an ensemble rebuilt from them, continue exactly as the ensemble does."""
    ensemble = SACEnsemble(_agents())
    for _ in range(3):
        ensemble.update(_batch(gen), torch.randn(2, BATCH, generator=gen))
    state = ensemble.state_dict()
    exported = ensemble.to_agents()
    assert [a.metric_prefix for a in exported] == ["", "relay_"]
    assert [a.target_entropy for a in exported] == pytest.approx([-1.5, -0.4])
    for member, agent in zip(split_state_dict(state), exported):
        _assert_states_close(agent.state_dict(), member, rtol=0, atol=0)
    rebuilt = SACEnsemble(exported)
    reloaded = SACEnsemble(_agents(seed=1))
    reloaded.load_state_dict(stack_state_dicts(split_state_dict(state)))

    batch, rewards = _batch(gen), torch.randn(2, BATCH, generator=gen)
    noise = torch.randn(2, 2, BATCH, ACT, generator=gen)
    expected = ensemble.update(batch, rewards, log=True, noise=noise)
    assert rebuilt.update(batch, rewards, log=True, noise=noise) == expected
    assert reloaded.update(batch, rewards, log=True, noise=noise) == expected
    separate = _separate_updates(exported, batch, rewards, noise, monkeypatch)
    np.testing.assert_allclose(list(separate.values()), list(expected.values()), rtol=1e-5, atol=1e-6)
    for other in (rebuilt, reloaded):
        _assert_states_close(other.state_dict(), ensemble.state_dict(), rtol=0, atol=0)


def test_building_from_agents_leaves_them_unchanged(gen):
    agents = _agents()
    agents[0].update({**_batch(gen), "reward": torch.zeros(BATCH)})
    agents[1].update({**_batch(gen), "reward": torch.zeros(BATCH)})
    before = [copy.deepcopy(a.state_dict()) for a in agents]  # state_dict() shares the tensors
    ensemble = SACEnsemble(agents)
    ensemble.update(_batch(gen), torch.randn(2, BATCH, generator=gen))
    for agent, state in zip(agents, before):
        _assert_states_close(agent.state_dict(), state, rtol=0, atol=0)


def test_bad_input_is_a_clear_value_error(gen):
    agents = _agents()
    ensemble = SACEnsemble(agents)
    batch = _batch(gen)
    with pytest.raises(ValueError, match=r"rewards must be \(num_members, batch\) = \(2, 13\).*got \(13,\)"):
        ensemble.update(batch, torch.zeros(BATCH))
    with pytest.raises(ValueError, match=r"rewards must be .*got \(2, 12\)"):
        ensemble.update(batch, torch.zeros(2, BATCH - 1))
    with pytest.raises(ValueError, match=r"noise must be \(2, num_members, batch, act_dim\)"):
        ensemble.update(batch, torch.zeros(2, BATCH), noise=torch.zeros(2, BATCH, ACT))
    with pytest.raises(ValueError, match="obs must have shape"):
        ensemble.act(torch.zeros(2, OBS + 1), member=0)
    with pytest.raises(ValueError, match=r"member=2 is not in \[0, 2\)"):
        ensemble.act(torch.zeros(2, OBS), member=2)
    with pytest.raises(ValueError, match="same obs_dim, act_dim, SACConfig"):
        SACEnsemble([agents[0], SAC(OBS, ACT, SACConfig(hidden_dims=(16,)))])
    with pytest.raises(ValueError, match="at least one"):
        SACEnsemble([])

    # A member that trained alone (relay had ended) has taken more Adam steps: not stackable.
    agents[0].update({**batch, "reward": torch.zeros(BATCH)})
    with pytest.raises(ValueError, match="Adam step counts differ"):
        SACEnsemble(agents)
    agents[1].update({**batch, "reward": torch.zeros(BATCH)})
    agents[0].update({**batch, "reward": torch.zeros(BATCH)})
    with pytest.raises(ValueError, match=r"Adam step counts differ \(\[2.0, 1.0\]\)"):
        stack_state_dicts([a.state_dict() for a in agents])
    with pytest.raises(ValueError, match="not a SAC agent's"):
        ensemble.load_state_dict({"actor": {}, "critic": {}})
    wrong = stack_state_dicts([SAC(OBS, ACT, CONFIG).state_dict()] * 3)
    with pytest.raises(ValueError, match=r"actor.net.0.weight has shape \(3, 16, 7\).*\(2, 16, 7\)"):
        ensemble.load_state_dict(wrong)


def test_losses_are_one_graph_for_torch_compile(gen):
    """What --sac.compile captures (on CUDA as one CUDA graph): the whole loss computation of every
    member, with no graph break."""
    ensemble = SACEnsemble(_agents())
    batch = _batch(gen)
    args = (batch["obs"], batch["action"], torch.zeros(2, BATCH), batch["discount"],
            batch["next_obs"], torch.randn(2, 2, BATCH, ACT, generator=gen))
    explanation = torch._dynamo.explain(ensemble._eager_losses)(*args)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def _compiled_and_eager(device: str) -> tuple[SACEnsemble, SACEnsemble]:
    agents = _agents()
    compiled_cfg = SACConfig(hidden_dims=CONFIG.hidden_dims, tau=CONFIG.tau, compile=True)
    compiled_agents = [SAC(OBS, ACT, compiled_cfg, device, metric_prefix=a.metric_prefix)
                       for a in agents]
    eager_agents = [SAC(OBS, ACT, CONFIG, device, metric_prefix=a.metric_prefix) for a in agents]
    for a, c, e in zip(agents, compiled_agents, eager_agents):
        c.load_state_dict(a.state_dict())
        e.load_state_dict(a.state_dict())
        c.target_entropy = e.target_entropy = a.target_entropy
    return SACEnsemble(eager_agents), SACEnsemble(compiled_agents)


def _assert_same_training(eager: SACEnsemble, compiled: SACEnsemble, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = {k: v.to(device) for k, v in _batch(g).items()}
        rewards = torch.randn(2, BATCH, generator=g).to(device)
        noise = torch.randn(2, 2, BATCH, ACT, generator=g).to(device)
        expected = eager.update(batch, rewards, log=True, noise=noise)
        got = compiled.update(batch, rewards, log=True, noise=noise)
        assert got.keys() == expected.keys()
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-4, atol=1e-5)
    _assert_states_close(compiled.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_update_trains_like_eager():
    eager, compiled = _compiled_and_eager("cpu")
    _assert_same_training(eager, compiled, "cpu")


@pytest.mark.cuda
def test_cuda_graphed_update_trains_like_eager_and_keeps_its_metrics():
    eager, compiled = _compiled_and_eager("cuda")
    assert compiled._graphed and compiled.optimizer.defaults["fused"]
    _assert_same_training(eager, compiled, "cuda")
    batch = {k: v.cuda() for k, v in _batch(torch.Generator().manual_seed(1)).items()}
    first = compiled.update(batch, torch.zeros(2, BATCH, device="cuda"))
    kept = {k: v.item() for k, v in first.items()}
    compiled.update(batch, torch.zeros(2, BATCH, device="cuda"))  # replays the graph
    assert {k: v.item() for k, v in first.items()} == kept


def test_trainer_trains_both_agents_as_one_until_relay_ends_then_freezes_the_relay_agent(tmp_path):
    """State SAC with relay: one ensemble update per step while relay lasts; once it ends, the FuRL
    agent trains on alone and the relay agent stays bit-identical (weights, targets, temperature,
    Adam state). A checkpoint holds the two agents as plain SAC agents either way."""
    from furl_fast.agents.ensemble import EnsembleMember
    from furl_fast.config import Config
    from furl_fast.trainer import Trainer

    cfg = Config(algo="relay", reward="code", task="reach-v3", total_steps=80, warmup_steps=40,
                 batch_size=8, buffer_size=2000, eval_every=10**6, eval_video=False, eval_episodes=1,
                 checkpoint_every=10**6, log_every=10**6, device="cpu", run_dir=str(tmp_path),
                 sac=SACConfig(hidden_dims=(8,)))
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.evaluate = lambda writer=None: {}
        assert isinstance(trainer.agent, EnsembleMember) and trainer.ensemble is not None
        trainer.run([])
        assert "losses/relay_critic" in trainer.update(log=True)
        state = load_state(trainer.save_checkpoint())
        relay_before = state["relay_agent"]
        SAC(39, 4, cfg.sac).load_state_dict(state["agent"])  # a plain SAC agent's state

        trainer.schedule.enabled = False  # as observe_positives does after 2,500 positives
        metrics = trainer.update(log=True)
        assert trainer.ensemble is None and isinstance(trainer.relay_agent, SAC)
        assert "losses/critic" in metrics and not any("relay_" in k for k in metrics)
        for _ in range(3):
            trainer.update(log=False)
        _assert_states_close(trainer.relay_agent.state_dict(), relay_before, rtol=0, atol=0)
        furl_after = trainer.agent.state_dict()
        assert float(furl_after["optimizer"]["state"][0]["step"]) == \
            float(state["agent"]["optimizer"]["state"][0]["step"]) + 4
        assert not torch.equal(furl_after["actor"]["net.0.weight"], state["agent"]["actor"]["net.0.weight"])
        after = load_state(trainer.save_checkpoint())
        _assert_states_close(after["relay_agent"], relay_before, rtol=0, atol=0)

        # Resuming: a checkpoint from before relay ended loads into the ensemble again, one from
        # after into two agents that train apart.
        for ckpt, ensemble_expected in ((state, True), (after, False)):
            resumed = Trainer(cfg, tmp_path)
            try:
                resumed.load_checkpoint(ckpt)
                assert (resumed.ensemble is not None) == ensemble_expected
                agents = split_state_dict(resumed.ensemble.state_dict()) if ensemble_expected else \
                    [resumed.agent.state_dict(), resumed.relay_agent.state_dict()]
                _assert_states_close(agents[0], ckpt["agent"], rtol=0, atol=0)
                _assert_states_close(agents[1], ckpt["relay_agent"], rtol=0, atol=0)
            finally:
                resumed.close()
    finally:
        trainer.close()
