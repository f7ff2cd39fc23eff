from __future__ import annotations

import itertools

import numpy as np
import pytest

from furl_fast.agents.relay import RelaySchedule
from furl_fast.config import FuRLConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """Run-length encoding of a boolean sequence: [(value, length), ...]."""
    runs: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


def _episode(sched: RelaySchedule, length: int = 500) -> np.ndarray:
    sched.begin_episode()
    mask = []
    for _ in range(length):
        mask.append(sched.relay_mask()[0])
        sched.step()
    return np.array(mask)


def test_segments_have_length_k_and_the_starter_flips_every_episode():
    sched = RelaySchedule.from_config(FuRLConfig(), num_envs=1, seed=0)
    ks = []
    for episode in range(12):
        runs = _runs(_episode(sched))
        k = int(sched.k[0])
        ks.append(k)
        assert k in (50, 100, 150, 200)
        assert runs[0][0] == (episode % 2 == 1)  # FuRL agent starts episode 0, relay episode 1, ...
        assert all(length == k for _, length in runs[:-1])  # every full segment is K long
        assert 0 < runs[-1][1] <= k and sum(n for _, n in runs) == 500
        assert all(a != b for (a, _), (b, _) in itertools.pairwise(runs))  # control alternates
    assert len(set(ks)) > 1  # K is redrawn per episode


def test_k_is_drawn_from_every_choice():
    sched = RelaySchedule(num_envs=1, seed=1)
    seen = set()
    for _ in range(200):
        sched.begin_episode()
        seen.add(int(sched.k[0]))
    assert seen == {50, 100, 150, 200}


def test_relay_stops_for_good_at_2500_positives():
    sched = RelaySchedule(num_envs=2, seed=0)
    sched.begin_episode()
    sched.begin_episode()  # second episode: the relay agent starts in both environments
    assert sched.relay_mask().all()
    assert sched.observe_positives(2_499)
    assert sched.relay_mask().all()
    assert not sched.observe_positives(2_500)
    assert not sched.relay_mask().any()
    assert not sched.observe_positives(0)  # never comes back
    sched.begin_episode()
    sched.begin_episode()
    assert not sched.relay_mask().any()
    furl = np.full((2, 3), 0.5, np.float32)
    assert np.array_equal(sched.choose_actions(furl, None), furl)


def test_trainer_counts_positives_for_furl_and_success_steps_for_relay(tmp_path):
    """FuRL stops relay on its stored positives (the paper); the relay baseline on its success steps
    (FuRL's release). The episode below succeeds at steps 1, 3 and 4: FuRL's positives are frames
    0..1 (success turns back to 0 at step 2), 2 frames; its success steps are 3."""
    import torch

    from furl_fast.agents.relay import relay_stop_count
    from furl_fast.config import Config, SACConfig
    from furl_fast.trainer import Trainer

    success = np.array([False, True, False, True, True])
    assert relay_stop_count("furl", success) == 2
    assert relay_stop_count("relay", success) == 3
    assert relay_stop_count("relay", np.zeros(500, bool)) == 0
    with pytest.raises(ValueError, match="algo must be 'furl' or 'relay'"):
        relay_stop_count("vlm", success)

    cfg = Config(algo="relay", reward="code", task="reach-v3", total_steps=1000, warmup_steps=500,
                 batch_size=8, buffer_size=2000, eval_video=False, device="cpu",
                 run_dir=str(tmp_path), sac=SACConfig(hidden_dims=(8,)),
                 furl=FuRLConfig(relay_stop_positives=5))
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.ep_return, trainer.ep_env_return = [0.0], [0.0]
        trainer.ep_embs = [[torch.zeros(1)] * 5]
        trainer.schedule.begin_episode()
        trainer.ep_success = [success.tolist()]
        trainer.finish_episode(0)
        assert trainer.relay_positives == 3 and trainer.schedule.enabled
        trainer.ep_success = [success.tolist()]
        trainer.finish_episode(0)  # 6 success steps >= 5 (FuRL's count would be 4)
        assert trainer.relay_positives == 6 and not trainer.schedule.enabled
    finally:
        trainer.close()


def test_choose_actions_mixes_agents_and_adds_clipped_noise():
    n = 4000
    sched = RelaySchedule(num_envs=n, seed=0, noise_std=0.2)
    sched.begin_episode()
    sched.begin_episode(np.arange(n // 2))  # first half on its second episode: relay acts there
    mask = sched.relay_mask()
    assert mask[: n // 2].all() and not mask[n // 2:].any()
    furl = np.full((n, 2), 0.3, np.float32)
    relay = np.zeros((n, 2), np.float32)
    relay[:10] = 0.99  # near the bound: the noise must be clipped
    out = sched.choose_actions(furl, relay)
    assert out.dtype == np.float32 and np.array_equal(out[n // 2:], furl[n // 2:])
    assert out.min() >= -1 and out.max() <= 1 and (out[:10] == 1.0).any()
    noise = out[10: n // 2]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.2) < 0.02
    with pytest.raises(ValueError, match="pass relay_actions"):
        sched.choose_actions(furl, None)


def test_environments_keep_independent_episodes():
    sched = RelaySchedule(num_envs=3, seed=0)
    sched.begin_episode()
    for _ in range(7):
        sched.step()
    sched.begin_episode([1])
    assert sched.t.tolist() == [7, 0, 7] and sched.episodes.tolist() == [1, 2, 1]
    with pytest.raises(IndexError):
        sched.begin_episode([3])


def test_mask_before_any_episode_is_an_error():
    with pytest.raises(RuntimeError, match="begin_episode"):
        RelaySchedule().relay_mask()


def test_deterministic_given_seed_and_resumable():
    def trace(sched: RelaySchedule, episodes: int) -> list:
        out = []
        for _ in range(episodes):
            sched.begin_episode()
            for _ in range(120):
                out.append(sched.choose_actions(np.zeros((2, 1)), np.zeros((2, 1))).tolist())
                sched.step()
        return out

    a, b = RelaySchedule(num_envs=2, seed=5), RelaySchedule(num_envs=2, seed=5)
    assert trace(a, 3) == trace(b, 3)
    state = a.state_dict()
    c = RelaySchedule(num_envs=2, seed=99)
    c.load_state_dict(state)
    assert trace(a, 4) == trace(c, 4)
    assert trace(RelaySchedule(num_envs=2, seed=6), 3) != trace(RelaySchedule(num_envs=2, seed=5), 3)
    with pytest.raises(ValueError, match="for 2 environments"):
        RelaySchedule(num_envs=3).load_state_dict(state)


def test_pieces_compose_into_a_furl_step_loop():
    """A miniature of the training loop the pieces are built for: two SAC agents take turns per the
    schedule, the critic reward is sparse + rho * aligned reward (heads before their update), the
    relay agent learns from the sparse reward of the same batch, episodes fill the embedding buffer,
    the first success switches phase B on and 2,500 positives would stop relay."""
    import torch

    from furl_fast.agents.sac import SAC
    from furl_fast.config import SACConfig
    from furl_fast.rewards.furl import FuRLReward

    torch.manual_seed(0)
    obs_dim, act_dim, emb_dim, horizon = 6, 2, 12, 40
    cfg = SACConfig(hidden_dims=(16,))
    furl_agent, relay_agent = SAC(obs_dim, act_dim, cfg), SAC(obs_dim, act_dim, cfg, metric_prefix="relay_")
    reward_model = FuRLReward(emb_dim, torch.randn(emb_dim), FuRLConfig(head_hidden=8, head_out=4,
                              pair_batch=16, relay_stop_positives=60), goal_emb=torch.randn(emb_dim))
    sched = RelaySchedule(num_envs=1, k_choices=(10, 15), stop_positives=60, seed=0)
    rng = np.random.default_rng(0)
    used_relay = False
    for episode in range(4):
        sched.begin_episode()
        embs, flags = torch.randn(horizon, emb_dim), np.zeros(horizon, bool)
        if episode in (1, 3):
            flags[25:] = True  # this episode succeeds from step 25 on
        for t in range(horizon):
            obs = torch.randn(1, obs_dim)
            relay_on = sched.relay_mask()[0]
            used_relay |= bool(relay_on)
            action = sched.choose_actions(furl_agent.act(obs).numpy(),
                                          relay_agent.act(obs).numpy() if relay_on else None)
            assert action.shape == (1, act_dim)
            sched.step()
            batch = {"obs": torch.randn(8, obs_dim), "action": torch.rand(8, act_dim) * 2 - 1,
                     "discount": torch.full((8,), 0.99), "next_obs": torch.randn(8, obs_dim)}
            sparse = torch.as_tensor(rng.choice([-1.0, 0.0], 8), dtype=torch.float32)
            batch_emb = torch.randn(8, emb_dim)
            vlm = reward_model.reward(batch_emb)  # heads before this step's update
            furl_agent.update({**batch, "reward": sparse + 0.05 * vlm})
            if sched.enabled:
                relay_agent.update({**batch, "reward": sparse})
            reward_model.update(batch_emb)
        reward_model.add_episode(embs, flags)
        sched.observe_positives(reward_model.buffer.positives_added)
    assert used_relay and reward_model.phase == "B"
    assert reward_model.buffer.positives_added == 80 and not sched.enabled  # 2 x 40 >= 60: relay off
    assert reward_model.buffer.num_negatives == 80


@pytest.mark.slow
def test_trainer_switches_control_every_k_steps_from_each_episodes_first_action(tmp_path):
    """The training loop's order of schedule.step() and episode resets: in each of the first three
    episodes control switches after exactly K actions (at steps K, 2K, ...), not K - 1 after the
    first episode. Recorded at every env.step of a real (state SAC, relay) run."""
    from furl_fast.config import Config, SACConfig
    from furl_fast.trainer import Trainer

    cfg = Config(algo="relay", reward="code", task="reach-v3", total_steps=1500, warmup_steps=1499,
                 batch_size=8, buffer_size=2000, eval_every=1500, eval_video=False, eval_episodes=1,
                 checkpoint_every=1500, log_every=1500, device="cpu", run_dir=str(tmp_path),
                 sac=SACConfig(hidden_dims=(8,)))
    trainer = Trainer(cfg, tmp_path)
    relay, ks = [], []
    env_step = trainer.envs.step

    def recording_step(actions):
        relay.append(bool(trainer.schedule.relay_mask()[0]))
        ks.append(int(trainer.schedule.k[0]))
        return env_step(actions)

    trainer.envs.step = recording_step
    try:
        assert trainer.run([]) == 0
    finally:
        trainer.close()
    assert len(relay) == 1500
    for episode in range(3):
        mask, k = np.array(relay[500 * episode: 500 * (episode + 1)]), ks[500 * episode]
        assert set(ks[500 * episode: 500 * (episode + 1)]) == {k}
        runs = _runs(mask)
        assert runs[0][0] == (episode % 2 == 1)
        assert [n for _, n in runs[:-1]] == [k] * (len(runs) - 1), (episode, k, runs)
        assert 0 < runs[-1][1] <= k
