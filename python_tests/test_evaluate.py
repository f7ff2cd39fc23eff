"""Using a trained agent: python -m furl_fast.evaluate, load_agent / export_actor / load_actor, and
the trainer's own evaluation they must agree with. One small run (state SAC, tiny networks, the
dense reward so that returns differ from run to run) serves every test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import furl_fast
from furl_fast.config import Config, config_to_dict
from furl_fast.evaluate import evaluate_policy, make_eval_env
from furl_fast.runs import CHECKPOINT_DIR, STATE_FILE, save_state

STEPS = 600  # warm-up 500, then 100 updates: enough for weights that differ from their start


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FURL_FAST_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    args = ["--no-eval-video", "--algo", "sac", "--task", "reach", "--seed", "0", "--env-reward",
            "dense", "--total-steps", str(STEPS), "--warmup-steps", "500", "--batch-size", "32",
            "--buffer-size", "5000", "--eval-every", str(STEPS), "--checkpoint-every", str(STEPS),
            "--run-dir", str(run_dir), "--device", "cpu", "--sac.hidden-dims", "32", "32",
            "--torch-threads", "1", "--log-every", "100"]
    result = run_module("furl_fast.train", args, root)
    assert result.returncode == 0, result.stderr[-3000:]
    # The replay buffer is never read: without it every test below still passes.
    for replay in (run_dir / CHECKPOINT_DIR).glob("replay-*.bin"):
        replay.write_bytes(b"damaged")
    return run_dir


@pytest.mark.slow
def test_command_reproduces_the_trainers_evaluation(run_dir, tmp_path):
    trainer = json.loads((run_dir / "eval.json").read_text())
    result = run_module("furl_fast.evaluate", [str(run_dir)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / f"evaluate-{STEPS}.json").read_text())
    assert report["step"] == trainer["step"] == STEPS and report["seed"] == 0
    for key in ("eval/success", "eval/ever_success", "eval/return", "eval/length", "eval/episodes"):
        assert report[key] == trainer[key], key  # the same episode, action for action
    (episode,) = report["episodes"]
    assert episode == {"success": bool(trainer["eval/success"]),
                       "ever_success": bool(trainer["eval/ever_success"]),
                       "return": trainer["eval/return"], "length": 500}
    assert f"return {trainer['eval/return']:.2f}, length 500" in result.stdout

    out = tmp_path / "other.json"
    result = run_module("furl_fast.evaluate", [str(run_dir), "--checkpoint", str(STEPS), "--seed", "1",
                                               "--episodes", "2", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    other = json.loads(out.read_text())
    assert other["seed"] == 1 and len(other["episodes"]) == 2
    assert other["eval/return"] != trainer["eval/return"]  # another scene


@pytest.mark.slow
def test_api_acts_as_the_trainer_and_the_exported_actor_as_the_agent(run_dir, tmp_path):
    agent = furl_fast.load_agent(run_dir)
    assert agent.config.algo == "sac" and agent.config.sac.hidden_dims == (32, 32)
    assert agent.step == STEPS
    env = make_eval_env(agent.config)
    try:
        (episode,) = evaluate_policy(agent.act, env, agent.config, agent.step)
    finally:
        env.close()
    assert episode.episode_return == json.loads((run_dir / "eval.json").read_text())["eval/return"]

    obs = np.random.default_rng(0).normal(size=(5, 39)).astype(np.float32)
    actions = agent.act(obs)
    assert actions.shape == (5, 4) and actions.dtype == np.float32
    assert np.abs(actions).max() <= 1.0
    # One observation, no batch axis: a batch of 1 may take another matmul kernel, hence a tolerance.
    torch.testing.assert_close(agent.act(obs[2]), actions[2])
    assert not np.array_equal(agent.act(obs, deterministic=False), actions)

    path = agent.export_actor(tmp_path / "actor.pt")
    assert path.stat().st_size < 50_000  # the actor only: no critics, optimiser or replay
    actor = furl_fast.load_actor(path)
    np.testing.assert_array_equal(actor.act(obs), actions)
    assert actor.config == agent.config and actor.step == STEPS


# Each: what to set up, the arguments after the run directory, what the one line on stderr says.
BAD_INPUT = {
    "not a run dir": ("empty", [], "is not a run directory with a checkpoint"),
    "damaged checkpoint": ("damaged", [], "state.pt is damaged or incomplete"),
    "unknown step": ("ok", ["--checkpoint", "500"],
                     "keeps only its latest checkpoint, so the one step available is 1000"),
    "no episodes": ("ok", ["--episodes", "0"], "--episodes 0: give 1 or more"),
    "not a number": ("ok", ["--episodes", "ten"], "argument --episodes: invalid int value"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    setup, args, message = BAD_INPUT[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if setup != "empty":  # a checkpoint's state without any agent: every refusal comes before one
        (run_dir / CHECKPOINT_DIR).mkdir()
        cfg = Config(algo="sac", task="reach", device="cpu", run_dir=str(run_dir))
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))
        state = run_dir / CHECKPOINT_DIR / STATE_FILE
        save_state(state, {"step": 1000, "replay": None})
        if setup == "damaged":
            state.write_bytes(state.read_bytes()[:-20])
    result = run_module("furl_fast.evaluate", [str(run_dir), *args], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("furl_fast.evaluate: ")
    assert message in result.stderr, result.stderr


def test_load_agent_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="is not a run directory"):
        furl_fast.load_agent(tmp_path)
    with pytest.raises(ValueError, match="cannot be read as an exported actor"):
        (tmp_path / "actor.pt").write_bytes(b"not a torch file")
        furl_fast.load_actor(tmp_path / "actor.pt")
