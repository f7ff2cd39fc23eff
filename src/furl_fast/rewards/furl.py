"""FuRL's aligned VLM reward (the FuRL paper, "Reward alignment").

Two trainable projection heads map the frozen VLM's image and text embeddings (D wide) to a small
space (D -> 256 -> ReLU -> 64); the fuzzy reward is cos(f_I(e_img), f_L(e_text)). The heads are trained
online with ranking losses:
- Phase A (until a *valid* positive is stored, i.e. one with a frame `lag` steps earlier in its
  episode, as FuRL's release does): frames closer to the goal image's embedding must score higher
  (`phase_a_loss`). A successful episode that succeeds within its first `lag` steps has no valid
  positive, so it does not end phase A. With `FuRLConfig.phase_a=False` (the "no goal image"
  ablation) the heads are not trained at all in this phase.
- Phase B (from then on, never back): positives must score higher than negatives and than the frame
  `lag` steps earlier in the same episode (`phase_b_loss`), with triples drawn from an
  `EmbeddingBuffer` of labelled episodes.

Episode labelling (`label_episode`): a failed episode (success never 1) gives only negatives. A
successful one, with first success at step s, gives positives for frames 0..s and the following frames
while success stays 1. Frames after success turns back to 0 are DROPPED, neither positive nor
negative: they show a state that has just been at the goal (e.g. an object that slipped away), so as
negatives they would push down near-goal frames that look like the positives, and as positives they
would reward undoing the task. Dropping them also keeps each episode's positives one contiguous run,
so a positive's lag frame is simply the positive stored `lag` slots earlier.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from furl_fast.agents.sac import lecun_normal_
from furl_fast.config import FuRLConfig

__all__ = [
    "EmbeddingBuffer",
    "FuRLReward",
    "ProjectionHead",
    "label_episode",
    "phase_a_active_pairs",
    "phase_a_loss",
    "phase_b_loss",
]


class ProjectionHead(nn.Module):
    """x (N, D) float32 -> relu(x @ w1 + b1) @ w2 + b2, (N, P) float32.

    Weights are stored input-major, w1 (D, H) and w2 (H, P): the layout furl_fast.ops.mlp_cosine_reward
    takes, so handing them over needs no transpose or copy. Initialised like FuRL's release:
    LeCun-normal weights (std 1 / sqrt(fan_in), furl_fast.agents.sac.lecun_normal_), zero biases.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1, self.b1 = self._linear(in_dim, hidden)
        self.w2, self.b2 = self._linear(hidden, out_dim)

    @staticmethod
    def _linear(d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
        return (nn.Parameter(lecun_normal_(torch.empty(d_in, d_out), d_in)),
                nn.Parameter(torch.zeros(d_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b2, torch.relu(torch.addmm(self.b1, x, self.w1)), self.w2)


def phase_a_loss(c: torch.Tensor, dist: torch.Tensor, gap: float, margin: float) -> torch.Tensor:
    """Goal-distance ranking loss.

    c: (N,) rewards, dist: (N,) L2 distances of the frames' embeddings to the goal image's.
    M_ij = [dist_i < dist_j - gap] (frame i clearly closer to the goal than frame j);
    loss = mean_i sum_j M_ij * max(0, margin - (c_i - c_j)). Returns a 0-dim tensor.
    """
    hinge = torch.relu(margin - (c.unsqueeze(1) - c.unsqueeze(0)))
    return (hinge * _ranked_pairs(dist, gap)).sum(dim=1).mean()


def phase_a_active_pairs(dist: torch.Tensor, gap: float) -> torch.Tensor:
    """The fraction of frame pairs phase A ranks: pairs {i, j} whose goal distances differ by more
    than gap (M_ij or M_ji of phase_a_loss), out of the N (N - 1) / 2 pairs. dist: (N,).
    Returns a 0-dim float32 tensor in [0, 1]: near 0, the gap is too wide for the VLM's embedding
    scale and phase A learns nothing; near 1, it ranks almost every pair, however close."""
    n = dist.shape[0]
    return _ranked_pairs(dist, gap).sum(dtype=torch.float32) / max(n * (n - 1) // 2, 1)


def _ranked_pairs(dist: torch.Tensor, gap: float) -> torch.Tensor:
    """M_ij = [dist_i < dist_j - gap], (N, N) bool."""
    return dist.unsqueeze(1) < dist.unsqueeze(0) - gap


def phase_b_loss(
    c_pos: torch.Tensor, c_neg: torch.Tensor | None, c_lag: torch.Tensor, margin: float
) -> torch.Tensor:
    """Positive/negative/lag ranking loss.

    c_pos, c_lag: (N,) rewards of positives and of their lag frames; c_neg: (M,) rewards of negatives,
    or None when no negative is stored yet (then only the lag term counts).
    loss = mean(max(0, c_neg - c_pos + margin)) + mean(max(0, c_lag - c_pos + margin)).
    """
    loss = torch.relu(c_lag - c_pos + margin).mean()
    if c_neg is not None:
        loss = loss + torch.relu(c_neg - c_pos + margin).mean()
    return loss


def label_episode(success: np.ndarray | torch.Tensor | list[bool]) -> int:
    """How many leading frames of an episode are positives (0 for a failed episode).

    success: (T,) per-step success flags. With s = the first step where success holds, frames 0..s and
    the following frames while success stays 1 are positives. Frames from the first step where
    success turns back to 0 on are dropped (see the module docstring); in a failed episode every
    frame is a negative.
    """
    flags = np.asarray(torch.as_tensor(success).cpu(), dtype=bool).reshape(-1)
    if not flags.any():
        return 0
    s = int(flags.argmax())
    drops = np.flatnonzero(~flags[s:])
    return int(s + drops[0]) if drops.size else int(flags.size)


class _Ring:
    """Fixed-capacity FIFO of embeddings (device) with their episode id and step (host)."""

    def __init__(self, capacity: int, emb_dim: int, device: torch.device, dtype: torch.dtype):
        self.capacity = capacity
        self.emb = torch.zeros(capacity, emb_dim, device=device, dtype=dtype)
        self.episode = np.full(capacity, -1, dtype=np.int64)
        self.step = np.full(capacity, -1, dtype=np.int64)
        self.ptr = 0
        self.size = 0

    def add(self, emb: torch.Tensor, episode: int, steps: np.ndarray) -> None:
        if emb.shape[0] > self.capacity:  # only the newest `capacity` frames would survive anyway
            emb, steps = emb[-self.capacity:], steps[-self.capacity:]
        n = emb.shape[0]
        slots = (self.ptr + np.arange(n)) % self.capacity
        self.emb[torch.from_numpy(slots).to(self.emb.device)] = emb.to(self.emb.device, self.emb.dtype)
        self.episode[slots] = episode
        self.step[slots] = steps
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def state_dict(self) -> dict[str, Any]:
        # Until the ring has wrapped, slots [0, size) are the filled ones; save only those.
        n = self.size
        return {"emb": self.emb[:n].cpu().clone(), "episode": self.episode[:n].copy(),
                "step": self.step[:n].copy(), "ptr": self.ptr, "size": n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        if n > self.capacity or state["emb"].shape[1:] != self.emb.shape[1:]:
            raise ValueError(
                f"EmbeddingBuffer checkpoint holds {n} x {tuple(state['emb'].shape[1:])} embeddings; "
                f"this buffer takes at most {self.capacity} x {tuple(self.emb.shape[1:])}."
            )
        self.emb.zero_()
        self.emb[:n] = state["emb"].to(self.emb.device, self.emb.dtype)
        self.episode.fill(-1)
        self.step.fill(-1)
        self.episode[:n] = state["episode"]
        self.step[:n] = state["step"]
        self.ptr, self.size = int(state["ptr"]), n


class EmbeddingBuffer:
    """Positive and negative frame embeddings for phase B, filled one whole episode at a time.

    Embeddings live on `device` (emb_dim wide, `dtype`); bookkeeping (episode ids, steps, sampling RNG)
    lives on the host, so sampling needs no device sync. A positive is valid when the frame `lag` steps
    earlier in the same episode is still stored; lag frames therefore never cross episodes.
    """

    def __init__(self, emb_dim: int, positive_capacity: int = 20_000, negative_capacity: int = 20_000,
                 lag: int = 10, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0):
        if lag < 1 or lag >= positive_capacity:
            raise ValueError(f"EmbeddingBuffer: lag={lag} must be in [1, positive_capacity).")
        self.emb_dim, self.lag = emb_dim, lag
        self.device = torch.device(device)
        self.positives = _Ring(positive_capacity, emb_dim, self.device, dtype)
        self.negatives = _Ring(negative_capacity, emb_dim, self.device, dtype)
        self.rng = np.random.default_rng(seed)
        self.episodes_added = 0
        self.positives_added = 0
        self.negatives_added = 0
        self._valid: np.ndarray | None = None  # slots of valid positives; recomputed after each add

    @property
    def num_positives(self) -> int:
        return self.positives.size

    @property
    def num_negatives(self) -> int:
        return self.negatives.size

    @property
    def valid_positive_slots(self) -> np.ndarray:
        """Slots of positives whose lag frame (same episode, `lag` steps earlier) is still stored."""
        if self._valid is None:
            ring, lag = self.positives, self.lag
            slots = np.arange(ring.size)
            prev = (slots - lag) % ring.capacity
            ok = ((ring.step[slots] >= lag)
                  & (ring.episode[prev] == ring.episode[slots])
                  & (ring.step[prev] == ring.step[slots] - lag))
            self._valid = slots[ok]
        return self._valid

    def add_episode(self, embs: torch.Tensor, success: np.ndarray | torch.Tensor | list[bool]) -> int:
        """Labels one finished episode and stores its frames; returns the number of positives added.

        embs: (T, emb_dim) float, embs[t] the frame rendered after step t; success: (T,) the success
        flag of step t. See label_episode for the labels.
        """
        if embs.dim() != 2 or embs.shape[1] != self.emb_dim:
            raise ValueError(f"EmbeddingBuffer.add_episode: embs must be (T, {self.emb_dim}), "
                             f"got {tuple(embs.shape)}.")
        t = embs.shape[0]
        n_success = np.asarray(torch.as_tensor(success).cpu()).reshape(-1).shape[0]
        if n_success != t:
            raise ValueError(f"EmbeddingBuffer.add_episode: success has {n_success} flags for {t} frames.")
        n_pos = label_episode(success)
        episode = self.episodes_added
        self.episodes_added += 1
        if t == 0:
            return 0
        if n_pos == 0:
            self.negatives.add(embs, episode, np.arange(t))
            self.negatives_added += t
        else:
            self.positives.add(embs[:n_pos], episode, np.arange(n_pos))
            self.positives_added += n_pos
            self._valid = None
        return n_pos

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """n triples: (positive (n, D), negative (n, D) or None if none stored, lag (n, D)).

        Positives are drawn uniformly among valid ones, negatives uniformly; the lag frame is the
        positive's own episode frame `lag` steps earlier. Raises RuntimeError if no positive is valid.
        """
        valid = self.valid_positive_slots
        if valid.size == 0:
            raise RuntimeError("EmbeddingBuffer.sample: no valid positive (a positive needs a frame "
                               f"{self.lag} steps earlier in its episode); check has_valid_positives.")
        pos = valid[self.rng.integers(0, valid.size, n)]
        lag = (pos - self.lag) % self.positives.capacity
        # One host->device copy for all index vectors.
        neg = self.rng.integers(0, self.negatives.size, n) if self.negatives.size else None
        idx = np.concatenate([pos, lag] + ([neg] if neg is not None else []))
        idx_t = torch.from_numpy(idx).to(self.device, non_blocking=True)
        p = self.positives.emb[idx_t[:n]]
        lg = self.positives.emb[idx_t[n:2 * n]]
        ng = self.negatives.emb[idx_t[2 * n:]] if neg is not None else None
        return p, ng, lg

    def state_dict(self) -> dict[str, Any]:
        return {
            "positives": self.positives.state_dict(),
            "negatives": self.negatives.state_dict(),
            "rng": self.rng.bit_generator.state,
            "episodes_added": self.episodes_added,
            "positives_added": self.positives_added,
            "negatives_added": self.negatives_added,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.positives.load_state_dict(state["positives"])
        self.negatives.load_state_dict(state["negatives"])
        self.rng.bit_generator.state = state["rng"]
        self.episodes_added = int(state["episodes_added"])
        self.positives_added = int(state["positives_added"])
        self.negatives_added = int(state["negatives_added"])
        self._valid = None


class FuRLReward:
    """The aligned reward model: projection heads, their optimiser, the embedding buffer and phase.

    emb_dim: D, the VLM's embedding width; text_emb: (D,) float, the task text's embedding.
    Use per environment step (after warm-up): r = reward(batch_emb) with the heads as they are, then
    update(batch_emb); at each episode end: add_episode(embs, success).
    """

    def __init__(self, emb_dim: int, text_emb: torch.Tensor, config: FuRLConfig | None = None,
                 device: torch.device | str = "cpu", goal_emb: torch.Tensor | None = None,
                 seed: int = 0):
        self.config = config = config or FuRLConfig()
        self.device = torch.device(device)
        self.emb_dim = emb_dim
        self.text_emb = self._check_vector("text_emb", text_emb)
        self.goal_emb = None if goal_emb is None else self._check_vector("goal_emb", goal_emb)
        self.image_head = ProjectionHead(emb_dim, config.head_hidden, config.head_out).to(self.device)
        self.text_head = ProjectionHead(emb_dim, config.head_hidden, config.head_out).to(self.device)
        params = [*self.image_head.parameters(), *self.text_head.parameters()]
        if self.device.type == "cuda":
            self.optimizer = torch.optim.Adam(params, lr=config.head_lr, fused=True)
        else:
            self.optimizer = torch.optim.Adam(params, lr=config.head_lr, foreach=True)
        self.buffer = EmbeddingBuffer(emb_dim, config.positive_capacity, config.negative_capacity,
                                      config.lag, self.device, seed=seed)
        self.phase = "A"

    def _check_vector(self, name: str, v: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v).reshape(-1)
        if v.shape[0] != self.emb_dim or not v.is_floating_point():
            raise ValueError(f"FuRLReward: {name} must be a float vector of {self.emb_dim} values, "
                             f"got {v.dtype} {tuple(v.shape)}.")
        return v.to(self.device, torch.float32)

    def set_goal(self, goal_emb: torch.Tensor) -> None:
        """goal_emb: (D,) float, the goal image's embedding (phase A needs it)."""
        self.goal_emb = self._check_vector("goal_emb", goal_emb)

    def _rewards(self, img_emb: torch.Tensor) -> torch.Tensor:
        target = self.text_head(self.text_emb.unsqueeze(0))
        return F.cosine_similarity(self.image_head(img_emb.float()), target, dim=-1)

    @torch.no_grad()
    def reward(self, img_emb: torch.Tensor) -> torch.Tensor:
        """img_emb: (N, D) float -> (N,) float32 cosine rewards in [-1, 1] with the current heads.

        Equivalent: furl_fast.ops.mlp_cosine_reward(img_emb, *self.fused_params()).
        """
        return self._rewards(img_emb)

    @torch.no_grad()
    def fused_params(self) -> tuple[torch.Tensor, ...]:
        """(w1 (D, H), b1 (H,), w2 (H, P), b2 (P,), target (P,)), float32, for mlp_cosine_reward.

        w1..b2 are the image head's live weights (detached views, no copy: read them before the next
        update()); target = the text head applied to the text embedding.
        """
        h = self.image_head
        target = self.text_head(self.text_emb.unsqueeze(0)).squeeze(0)
        return h.w1.detach(), h.b1.detach(), h.w2.detach(), h.b2.detach(), target

    @property
    def has_valid_positives(self) -> bool:
        return self.buffer.valid_positive_slots.size > 0

    def add_episode(self, embs: torch.Tensor, success: np.ndarray | torch.Tensor | list[bool]) -> int:
        """Stores a finished episode (see EmbeddingBuffer.add_episode); once a valid positive is
        stored (one whose frame `lag` steps earlier in its episode is stored too), phase B starts for
        good. Returns the number of positives added."""
        n_pos = self.buffer.add_episode(embs, success)
        if n_pos > 0 and self.has_valid_positives:
            self.phase = "B"
        return n_pos

    def update(self, replay_emb: torch.Tensor | None = None, log: bool = False) -> dict[str, Any]:
        """One Adam step of both heads.

        replay_emb: (N, D) float embeddings of sampled replay frames (phase A ranks them by distance
        to the goal image; phase B samples its own triples and ignores them). Returns losses/*,
        charts/* and furl/phase_a_active_pairs (phase_a_active_pairs of the batch) metrics as 0-dim
        tensors, or floats with log=True; empty when the step is skipped: in phase A with
        config.phase_a=False, or in phase B when no positive is valid.
        """
        cfg = self.config
        if self.phase == "A" and not cfg.phase_a:
            return {}  # the no-goal-image ablation: the heads wait for phase B
        if self.phase == "A":
            if self.goal_emb is None:
                raise RuntimeError("FuRLReward.update: phase A needs the goal image's embedding; "
                                   "call set_goal() first.")
            if replay_emb is None:
                raise ValueError("FuRLReward.update: phase A needs replay_emb (N, D).")
            emb = replay_emb.float()
            dist = (emb - self.goal_emb).norm(dim=-1)
            c = self._rewards(emb)
            loss = phase_a_loss(c, dist, cfg.phase_a_gap, cfg.phase_a_margin)
            metrics = {"losses/heads_phase_a": loss.detach(), "charts/heads_reward_mean": c.detach().mean(),
                       "furl/phase_a_active_pairs": phase_a_active_pairs(dist, cfg.phase_a_gap)}
        else:
            if not self.has_valid_positives:  # phase B starts with one, but the FIFO may evict them all
                return {}
            pos, neg, lag = self.buffer.sample(cfg.pair_batch)
            n = pos.shape[0]
            parts = [pos, lag] + ([neg] if neg is not None else [])
            c = self._rewards(torch.cat(parts))  # one head pass for all triples
            c_pos, c_lag = c[:n], c[n:2 * n]
            c_neg = c[2 * n:] if neg is not None else None
            loss = phase_b_loss(c_pos, c_neg, c_lag, cfg.phase_b_margin)
            metrics = {"losses/heads_phase_b": loss.detach(), "charts/heads_reward_pos": c_pos.detach().mean(),
                       "charts/heads_reward_lag": c_lag.detach().mean()}
            if c_neg is not None:
                metrics["charts/heads_reward_neg"] = c_neg.detach().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if log:
            return dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Heads, optimiser, phase, text and goal embeddings, and the embedding buffer."""
        return {
            "image_head": self.image_head.state_dict(),
            "text_head": self.text_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "phase": self.phase,
            "text_emb": self.text_emb.cpu(),
            "goal_emb": None if self.goal_emb is None else self.goal_emb.cpu(),
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.image_head.load_state_dict(state["image_head"])
        self.text_head.load_state_dict(state["text_head"])
        # Optimizer.load_state_dict keeps the given moment tensors: copy so two models never share them.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.phase = state["phase"]
        # The heads were trained against this text embedding; keep it with them.
        self.text_emb = self._check_vector("text_emb", state["text_emb"])
        self.goal_emb = None if state["goal_emb"] is None else self._check_vector("goal_emb", state["goal_emb"])
        self.buffer.load_state_dict(state["buffer"])
