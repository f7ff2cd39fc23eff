from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from furl_fast.config import FuRLConfig
from furl_fast.rewards.furl import (
    EmbeddingBuffer,
    FuRLReward,
    label_episode,
    phase_a_active_pairs,
    phase_a_loss,
    phase_b_loss,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = FuRLConfig(head_hidden=8, head_out=4, pair_batch=32, positive_capacity=200,
                   negative_capacity=200)


def _tagged(episode: int, length: int, dim: int = 4) -> torch.Tensor:
    """Embeddings that carry (episode, step) in their first two columns, to trace sampled frames."""
    e = torch.zeros(length, dim)
    e[:, 0] = episode
    e[:, 1] = torch.arange(length, dtype=torch.float32)
    return e


def test_heads_start_lecun_normal_with_zero_biases():
    from test_sac import assert_lecun_normal

    torch.manual_seed(0)
    model = FuRLReward(1024, torch.randn(1024), FuRLConfig())
    for head in (model.image_head, model.text_head):  # weights (in, out)
        assert_lecun_normal(head.w1, head.b1, 1024)
        assert_lecun_normal(head.w2, head.b2, 256)


def test_phase_a_loss_hand_computed():
    c = torch.tensor([0.1, 0.15, 0.0])
    d = torch.tensor([0.1, 0.5, 1.0])
    # Pairs with d_i < d_j - 0.25: (0,1), (0,2), (1,2). Hinges max(0, 0.1 - (c_i - c_j)):
    # (0,1): 0.1 + 0.05 = 0.15; (0,2): 0.1 - 0.1 = 0; (1,2): 0.1 - 0.15 < 0 -> 0. Mean over i of row sums.
    assert phase_a_loss(c, d, gap=0.25, margin=0.1).item() == pytest.approx(0.15 / 3)
    # The gap is strict: d_0 = d_1 - 0.25 exactly is not a pair, so nothing is ranked.
    assert phase_a_loss(c[:2], torch.tensor([0.25, 0.5]), gap=0.25, margin=0.1).item() == 0.0
    # Reversing the rewards makes every ranked pair violate the margin.
    c_bad = torch.tensor([0.0, 0.2, 0.4])
    expected = ((0.1 + 0.2) + (0.1 + 0.4) + (0.1 + 0.2)) / 3
    assert phase_a_loss(c_bad, d, 0.25, 0.1).item() == pytest.approx(expected)


def test_phase_b_loss_hand_computed():
    c_p = torch.tensor([0.5, 0.0])
    c_n = torch.tensor([0.45, -0.5])
    c_l = torch.tensor([0.2, 0.05])
    # negatives: max(0, 0.45 - 0.5 + 0.1) = 0.05, max(0, -0.5 + 0.1) = 0 -> 0.025
    # lag:       max(0, 0.2 - 0.5 + 0.1) = 0,    max(0, 0.05 + 0.1) = 0.15 -> 0.075
    assert phase_b_loss(c_p, c_n, c_l, 0.1).item() == pytest.approx(0.1)
    assert phase_b_loss(c_p, None, c_l, 0.1).item() == pytest.approx(0.075)


@pytest.mark.parametrize(
    ("flags", "positives"),
    [
        ([0, 0, 0, 0], 0),  # failed: every frame is a negative
        ([0, 0, 1, 1], 4),  # success to the end
        ([0, 1, 1, 0, 0, 1], 3),  # frames after success turns back to 0 are dropped
        ([1, 0, 0], 1),
        ([0, 0, 0, 1], 4),  # success only at the last step
    ],
)
def test_label_episode(flags, positives):
    assert label_episode(np.array(flags, dtype=bool)) == positives
    assert label_episode(torch.tensor(flags, dtype=torch.bool)) == positives


def test_buffer_labels_failed_and_successful_episodes():
    buf = EmbeddingBuffer(4, 100, 100, lag=2)
    assert buf.add_episode(_tagged(0, 5), [0, 0, 0, 0, 0]) == 0
    assert (buf.num_positives, buf.num_negatives) == (0, 5)
    assert buf.add_episode(_tagged(1, 8), [0, 0, 0, 1, 1, 0, 1, 0]) == 5
    assert (buf.num_positives, buf.num_negatives) == (5, 5)
    pos = buf.positives.emb[:5]
    assert pos[:, 0].tolist() == [1] * 5 and pos[:, 1].tolist() == [0, 1, 2, 3, 4]
    neg = buf.negatives.emb[:5]
    assert neg[:, 0].tolist() == [0] * 5
    assert buf.positives_added == 5 and buf.negatives_added == 5 and buf.episodes_added == 2
    with pytest.raises(ValueError, match="success has 3 flags for 4 frames"):
        buf.add_episode(_tagged(2, 4), [0, 0, 1])


def test_lag_frames_never_cross_episodes_even_when_the_fifo_wraps():
    lag, cap = 10, 45
    buf = EmbeddingBuffer(4, cap, 50, lag=lag, seed=3)
    buf.add_episode(_tagged(0, 30), np.zeros(30, bool))
    with pytest.raises(RuntimeError, match="no valid positive"):
        buf.sample(4)
    lengths = [12, 25, 7, 30, 16]  # a short episode (7 < lag) has no valid positive at all
    for ep, n in enumerate(lengths, start=1):
        buf.add_episode(_tagged(ep, n), np.ones(n, bool))
    # 90 positives went into a ring of 45: only the newest survive, some without their lag frame.
    ep_col, step_col = buf.positives.emb[:, 0], buf.positives.emb[:, 1]
    brute = [i for i in range(cap)
             if step_col[i] >= lag and any((ep_col == ep_col[i]) & (step_col == step_col[i] - lag))]
    assert sorted(buf.valid_positive_slots.tolist()) == brute
    assert len(brute) > 0
    pos, neg, lg = buf.sample(2000)
    assert torch.equal(lg[:, 0], pos[:, 0])  # same episode
    assert torch.equal(lg[:, 1], pos[:, 1] - lag)  # exactly lag steps earlier
    assert (pos[:, 1] >= lag).all()
    assert (neg[:, 0] == 0).all()
    # Every valid positive gets sampled: the draw is uniform over them, not restricted further.
    assert len({(int(a), int(b)) for a, b in pos[:, :2].tolist()}) == len(brute)


def test_sample_without_negatives_returns_none():
    buf = EmbeddingBuffer(4, 100, 100, lag=3)
    buf.add_episode(_tagged(0, 6), np.ones(6, bool))
    pos, neg, lg = buf.sample(5)
    assert neg is None and pos.shape == lg.shape == (5, 4)


def _model(seed: int = 0, **kw) -> FuRLReward:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    return FuRLReward(16, torch.randn(16, generator=g), kw.pop("config", SMALL), **kw)


def test_reward_matches_direct_torch_computation_and_fused_params():
    m = _model()
    emb = torch.randn(9, 16)
    ih, th = m.image_head, m.text_head
    img = torch.relu(emb @ ih.w1 + ih.b1) @ ih.w2 + ih.b2
    txt = torch.relu(m.text_emb @ th.w1 + th.b1) @ th.w2 + th.b2
    expected = (img @ txt) / (img.norm(dim=1) * txt.norm())
    torch.testing.assert_close(m.reward(emb), expected)
    w1, b1, w2, b2, target = m.fused_params()
    assert w1.shape == (16, 8) and b1.shape == (8,) and w2.shape == (8, 4) and b2.shape == (4,)
    torch.testing.assert_close(target, txt)
    direct = torch.nn.functional.cosine_similarity(torch.relu(emb @ w1 + b1) @ w2 + b2, target[None], dim=1)
    torch.testing.assert_close(m.reward(emb), direct)
    assert m.reward(emb.half()).dtype == torch.float32


def test_phase_switches_at_first_successful_episode_and_never_back():
    m = _model()
    assert m.phase == "A"
    m.add_episode(torch.randn(20, 16), np.zeros(20, bool))
    assert m.phase == "A"
    m.add_episode(torch.randn(20, 16), np.r_[np.zeros(15, bool), np.ones(5, bool)])
    assert m.phase == "B"
    m.add_episode(torch.randn(20, 16), np.zeros(20, bool))
    assert m.phase == "B"


def test_phase_a_update_uses_pre_update_heads_and_goal_distance():
    m = _model()
    emb = torch.randn(32, 16)
    with pytest.raises(RuntimeError, match="set_goal"):
        m.update(emb)
    goal = torch.randn(16)
    m.set_goal(goal)
    c = m.reward(emb)
    expected = phase_a_loss(c, (emb - goal).norm(dim=1), SMALL.phase_a_gap, SMALL.phase_a_margin)
    w_before = m.image_head.w1.detach().clone()
    metrics = m.update(emb, log=True)
    assert metrics["losses/heads_phase_a"] == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(w_before, m.image_head.w1)


def test_phase_b_update_loss_matches_sampled_triples():
    m = _model()
    m.add_episode(torch.randn(30, 16), np.zeros(30, bool))
    m.add_episode(torch.randn(30, 16), np.ones(30, bool))
    state = m.buffer.rng.bit_generator.state
    pos, neg, lag = m.buffer.sample(SMALL.pair_batch)
    expected = phase_b_loss(m.reward(pos), m.reward(neg), m.reward(lag), SMALL.phase_b_margin)
    m.buffer.rng.bit_generator.state = state
    metrics = m.update(None, log=True)
    assert metrics["losses/heads_phase_b"] == pytest.approx(expected.item(), rel=1e-5)


def test_phase_a_lasts_until_a_positive_is_valid():
    """As in FuRL's release: positives without a frame `lag` steps earlier in their episode do not end
    phase A, and the heads keep training on the goal image meanwhile."""
    m = _model()
    m.set_goal(torch.randn(16))
    m.add_episode(torch.randn(5, 16), np.ones(5, bool))  # success within the first lag steps
    m.add_episode(torch.randn(12, 16), np.r_[np.zeros(3, bool), np.ones(7, bool), np.zeros(2, bool)])
    assert m.buffer.num_positives == 15 and not m.has_valid_positives
    assert m.phase == "A"
    w_before = m.image_head.w1.detach().clone()
    assert "losses/heads_phase_a" in m.update(torch.randn(32, 16), log=True)
    assert not torch.equal(w_before, m.image_head.w1)
    m.add_episode(torch.randn(12, 16), np.ones(12, bool))  # steps 10, 11 have their lag frame
    assert m.phase == "B" and m.buffer.valid_positive_slots.size == 2
    assert "losses/heads_phase_b" in m.update(None, log=True)


def test_phase_a_active_pairs_hand_computed_and_logged():
    dist = torch.tensor([0.0, 0.1, 0.5, 1.0])
    # Pairs whose distances differ by more than 0.25: (0,2) (0,3) (1,2) (1,3) (2,3); not (0,1).
    assert phase_a_active_pairs(dist, 0.25).item() == pytest.approx(5 / 6)
    assert phase_a_active_pairs(dist, 2.0).item() == 0.0
    m = _model()
    goal = torch.randn(16)
    m.set_goal(goal)
    emb = torch.randn(32, 16)
    expected = phase_a_active_pairs((emb - goal).norm(dim=1), SMALL.phase_a_gap).item()
    assert 0 < expected < 1
    assert m.update(emb, log=True)["furl/phase_a_active_pairs"] == pytest.approx(expected)


def test_without_phase_a_the_heads_wait_for_phase_b():
    """The no-goal-image ablation: no goal needed, no head update until a valid positive exists."""
    m = _model(config=dataclasses.replace(SMALL, phase_a=False))
    w_before = m.image_head.w1.detach().clone()
    assert m.update(torch.randn(32, 16), log=True) == {}
    assert torch.equal(w_before, m.image_head.w1)
    m.add_episode(torch.randn(30, 16), np.ones(30, bool))
    assert m.phase == "B" and "losses/heads_phase_b" in m.update(None, log=True)
    assert not torch.equal(w_before, m.image_head.w1)


def test_phase_b_training_ranks_positives_above_negatives():
    cfg = FuRLConfig(head_hidden=32, head_out=8, head_lr=3e-3, pair_batch=64, positive_capacity=500,
                     negative_capacity=500)
    m = _model(config=cfg)
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(16, generator=g)
    for ep in range(4):
        progress = torch.linspace(0, 1, 40).unsqueeze(1)  # successful episodes move towards `direction`
        m.add_episode(progress * direction + 0.1 * torch.randn(40, 16, generator=g), np.ones(40, bool))
        m.add_episode(-direction + 0.1 * torch.randn(40, 16, generator=g), np.zeros(40, bool))
    late_pos = direction + 0.1 * torch.randn(50, 16, generator=g)
    neg = -direction + 0.1 * torch.randn(50, 16, generator=g)
    for _ in range(150):
        m.update(None)
    assert m.reward(late_pos).mean() > m.reward(neg).mean() + 0.5


def test_state_dict_round_trip():
    a = _model(seed=0)
    a.set_goal(torch.randn(16))
    a.add_episode(torch.randn(30, 16), np.zeros(30, bool))
    a.add_episode(torch.randn(30, 16), np.ones(30, bool))
    a.update(None)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = _model(seed=1)
    b.load_state_dict(torch.load(blob, weights_only=False))
    assert b.phase == "B" and b.buffer.num_positives == 30 and b.buffer.num_negatives == 30
    emb = torch.randn(5, 16)
    torch.testing.assert_close(a.reward(emb), b.reward(emb))
    ma, mb = a.update(None, log=True), b.update(None, log=True)
    assert ma == mb
    torch.testing.assert_close(a.image_head.w1, b.image_head.w1, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="text_emb must be a float vector of 16"):
        FuRLReward(16, torch.zeros(8))
    buf = EmbeddingBuffer(4, 10, 10, lag=2)
    with pytest.raises(ValueError, match=r"embs must be \(T, 4\)"):
        buf.add_episode(torch.zeros(3, 5), [0, 0, 0])
    with pytest.raises(ValueError, match="lag"):
        EmbeddingBuffer(4, 10, 10, lag=10)


@pytest.mark.cuda
def test_cuda_reward_buffer_and_update_match_cpu():
    cpu = _model(seed=0)
    gpu = _model(seed=0, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    emb = torch.randn(33, 16)
    torch.testing.assert_close(gpu.reward(emb.cuda()).cpu(), cpu.reward(emb), rtol=1e-4, atol=1e-5)
    for m in (cpu, gpu):
        m.set_goal(torch.ones(16))
        m.update(emb.to(m.device))
    torch.testing.assert_close(gpu.image_head.w1.cpu(), cpu.image_head.w1, rtol=1e-4, atol=1e-5)
    for m in (cpu, gpu):
        m.add_episode(_tagged(0, 30, 16).to(m.device), np.zeros(30, bool))
        m.add_episode(_tagged(1, 30, 16).to(m.device), np.ones(30, bool))
    pos, neg, lag = gpu.buffer.sample(64)
    assert pos.is_cuda and torch.equal(lag[:, 1], pos[:, 1] - SMALL.lag) and (neg[:, 0] == 0).all()
    assert gpu.update(None, log=True)
