"""The paper's configuration in the trainer: render quality reaching every env and the goal image, the
ablation flags (FuRL without relay, without phase A), and the start-up log line. Trainers are built
in-process with a tiny random-weight encoder and never stepped, so each test takes seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import furl_fast.envs.metaworld.rollout
from furl_fast.config import Config, FuRLConfig, SACConfig, VLMConfig
from furl_fast.envs import Rollout, make_env
from furl_fast.train import train
from furl_fast.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from furl_fast.vlm import load_encoder

    return load_encoder(tiny_model, device="cpu")


@pytest.fixture
def expert_calls(monkeypatch):
    """Replaces the scripted-expert rollout with a two-frame stand-in and records its arguments."""
    calls = []

    def fake_expert_rollout(task, seed, **kwargs):
        calls.append(kwargs)
        frames = np.zeros((2, 256, 256, 3), np.uint8)
        frames[1] = 200  # the "success" frame
        return Rollout(states=np.zeros((2, 39), np.float32), actions=np.zeros((1, 4), np.float32),
                       frames=frames, successes=np.ones(1, bool))

    monkeypatch.setattr(furl_fast.envs.metaworld.rollout, "expert_rollout", fake_expert_rollout)
    return calls


def make_trainer(tmp_path, tiny_model, encoder, **changes) -> Trainer:
    cfg = Config(algo="furl", task="reach", device="cpu", buffer_size=1000, batch_size=32,
                 sac=SACConfig(hidden_dims=(16,)), vlm=VLMConfig(model=tiny_model))
    return Trainer(dataclasses.replace(cfg, **changes), tmp_path, encoder)


@pytest.mark.parametrize("quality", ["paper", "fast"])
def test_render_quality_reaches_training_and_eval_envs_and_the_goal_image(
        quality, tmp_path, tiny_model, encoder, expert_calls):
    trainer = make_trainer(tmp_path, tiny_model, encoder, render_quality=quality)
    try:
        fast = quality == "fast"
        assert [env.unwrapped.fast_render for env in trainer.envs.envs] == [fast]
        assert trainer.eval_env.unwrapped.fast_render is fast
        assert len(expert_calls) == 1 and expert_calls[0]["fast_render"] is fast
        assert expert_calls[0]["goal"] == "fixed" and expert_calls[0]["stop_on_success"]
        assert trainer.reward.furl.goal_emb is not None
    finally:
        trainer.close()


def test_paper_frames_differ_from_fast_frames(closing):
    paper = closing(make_env("reach", seed=0, fast_render=False, frame_size=96))
    fast = closing(make_env("reach", seed=0, fast_render=True, frame_size=96))
    paper_frame = paper.reset()[1]["vlm_frame"].astype(np.int16)
    fast_frame = fast.reset()[1]["vlm_frame"].astype(np.int16)
    assert paper.unwrapped._raw.model.vis.quality.shadowsize == 4096  # Meta-World's own visuals
    diff = np.abs(paper_frame - fast_frame)
    # Same scene and camera: shadows darken whole regions, multisampling softens every edge.
    assert diff.mean() > 1.0 and (diff.max(axis=-1) > 10).mean() > 0.01


def test_no_relay_ablation_builds_no_relay_agent(tmp_path, tiny_model, encoder, expert_calls):
    with_relay = make_trainer(tmp_path / "a", tiny_model, encoder)
    without = make_trainer(tmp_path / "b", tiny_model, encoder, furl=FuRLConfig(relay=False))
    try:
        assert with_relay.relay_agent is not None and with_relay.schedule is not None
        assert without.relay_agent is None and without.schedule is None
        assert without.reward.furl is not None and without.reward.furl.goal_emb is not None  # still FuRL
    finally:
        with_relay.close()
        without.close()


def test_no_phase_a_ablation_runs_no_expert_rollout(tmp_path, tiny_model, encoder, expert_calls):
    trainer = make_trainer(tmp_path, tiny_model, encoder, furl=FuRLConfig(phase_a=False))
    try:
        assert expert_calls == [] and trainer.reward.furl.goal_emb is None
        assert trainer.relay_agent is not None  # relay stays on
    finally:
        trainer.close()


def test_start_up_line_records_render_quality(tmp_path, capsys):
    cfg = Config(algo="furl", task="reach", render_quality="paper", run_dir=str(tmp_path / "run"),
                 vlm=VLMConfig(pretrained=str(tmp_path / "missing.pt")))
    assert train(cfg) == 2  # the weights are missing: stops right after the line
    out = capsys.readouterr().out
    assert "render quality paper" in out and "starting furl reach" in out and "furl-sac" in out
