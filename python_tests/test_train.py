"""The training CLI end to end, in subprocesses, on Meta-World with a tiny random-weight encoder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from furl_fast import ReplayBuffer
from furl_fast.train import CHECKPOINT_DIR, STATE_FILE, nstep_vlm_reward, updates_due

# Per agent: total steps, warm-up, checkpoint interval (simulator steps), batch. State SAC: two
# 500-step episodes; DrQ (action repeat 2: 250 agent steps an episode, slow conv updates on a CPU):
# just over one, and 50 updates (one every 2 agent steps after the warm-up).
SETTINGS = {"sac": (1000, 600, 500, 32), "drq": (600, 400, 300, 8)}
REPEAT = {"sac": 1, "drq": 2}  # simulator steps per agent step (stored transition)


def sampleable(agent: str) -> int:
    """Transitions the replay buffer can sample at the end of a smoke run: one per agent step, less
    the last n - 1 of the episode still open (their n-step windows are incomplete; DrQ-v2: n = 3)."""
    steps, n_step = SETTINGS[agent][0], {"sac": 1, "drq": 3}[agent]
    return steps // REPEAT[agent] - (n_step - 1)
def train_args(run_dir: Path, algo: str, model: str, agent: str = "sac", video: bool = False,
               steps: int | None = None) -> list[str]:
    """CLI arguments of a smoke run; steps (total, and the one evaluation) default to SETTINGS'."""
    default_steps, warmup, checkpoint_every, batch = SETTINGS[agent]
    steps = steps or default_steps
    return ["--eval-video" if video else "--no-eval-video", "--algo", algo, "--agent", agent, "--task", "reach", "--seed", "0",
            "--total-steps", str(steps), "--warmup-steps", str(warmup), "--batch-size", str(batch),
            "--buffer-size", "5000", "--eval-every", str(steps), "--checkpoint-every",
            str(checkpoint_every), "--run-dir", str(run_dir), "--device", "cpu", "--vlm.model", model,
            "--vlm.pretrained", "none", "--sac.hidden-dims", "32", "32", "--drq.hidden-dim", "32",
            "--drq.feature-dim", "16", "--furl.head-hidden", "16",
            "--furl.pair-batch", "32", "--torch-threads", "1", "--log-every", "100"]


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, FURL_FAST_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "furl_fast.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def replay_len(run_dir: Path) -> int:
    state = torch.load(run_dir / CHECKPOINT_DIR / STATE_FILE, weights_only=False)
    return len(ReplayBuffer.load(run_dir / CHECKPOINT_DIR / state["replay"])), state["step"]


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["sac", "drq"])
@pytest.mark.parametrize("algo", ["sac", "vlm", "relay", "furl"])
def test_cli_run_writes_every_artefact(tmp_path, tiny_model, algo, agent):
    steps = SETTINGS[agent][0]
    run_dir = tmp_path / "run"
    video = algo == "furl"  # an eval video costs an episode of renders: checked once per agent
    result = run_cli(train_args(run_dir, algo, tiny_model, agent, video=video), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo and config["agent"] == agent and config["total_steps"] == steps
    metrics = (run_dir / "metrics.csv").read_text()
    for name in ["eval/success", "eval/ever_success", "charts/episode_return", "losses/critic"]:
        assert name in metrics, name
    if algo == "furl":
        assert "losses/heads_phase_a" in metrics
    if agent == "drq":
        assert "charts/stddev" in metrics and "charts/agent_steps" in metrics
    if algo in ("relay", "furl"):
        assert "losses/relay_critic" in metrics
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["step"] == steps and 0.0 <= evaluation["eval/success"] <= 1.0
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    if video:
        videos = list((run_dir / "videos").iterdir())
        assert videos and all(v.stat().st_size > 1000 for v in videos)
    else:
        assert not (run_dir / "videos").exists()
    assert replay_len(run_dir) == (sampleable(agent), steps)


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["sac", "drq"])
def test_sigterm_then_resume_matches_uninterrupted(tmp_path, tiny_model, agent):
    """A run killed with SIGTERM checkpoints; --resume finishes with the same step count and buffer
    size as an uninterrupted run of the same configuration (test_cli_run_writes_every_artefact
    checks those)."""
    steps, _, checkpoint_every, _ = SETTINGS[agent]
    run_dir = tmp_path / "killed"
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "furl_fast.train",
                             *train_args(run_dir, "furl", tiny_model, agent)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 400
    while not (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():  # the first periodic checkpoint
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    _, killed_at = replay_len(run_dir)
    assert checkpoint_every <= killed_at < steps

    result = run_cli(["--resume", str(run_dir)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert replay_len(run_dir) == (sampleable(agent), steps)
    logged = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert logged == sorted(logged)  # rows past the checkpoint were dropped, not duplicated


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "no-such-task"], "task='no-such-task' is unknown"),
        (["--rho", "-1"], "rho=-1.0 must be >= 0"),
        (["--batch-size", "512", "--buffer-size", "100"], "larger than the replay buffer"),
        (["--vlm.pretrained", "/nonexistent/weights.pt"], "checkpoint file not found"),
        (["--task", "assembly"], "prompt"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, args, message):
    result = run_cli(["--algo", "furl", "--run-dir", str(tmp_path / "run"), *args], tmp_path, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["goal_baseline", "binary"])
def test_cli_zero_shot_rewards(tmp_path, tiny_model, reward):
    """--reward picks the zero-shot reward model the critic learns from (vlm algo)."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, "vlm", tiny_model) + ["--reward", reward, "--total-steps", "700",
                                                      "--warmup-steps", "500", "--eval-every", "700"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["reward"] == reward
    assert not (run_dir / "videos").exists()  # --no-eval-video
    values = [float(line.split(",")[2]) for line in (run_dir / "metrics.csv").read_text().splitlines()
              if ",charts/vlm_reward," in line]
    assert values
    if reward == "binary":  # the logged value is the batch mean of 0/1 rewards
        assert all(0.0 <= v <= 1.0 for v in values)


# Stateful checkers that random warm-up actions complete: "moved 2 cm from the reset position", then
# "moved 4 cm". The reset observation must be scored for `start` to be right.
MOVED_PROGRAMS = {"task": "reach-v3", "subtasks": [
    {"description": f"hand {cm} cm from where it started", "program":
        "import numpy as np\nstart = None\ndef done(frame, state):\n    global start\n"
        "    if start is None:\n        start = state[0:3].copy()\n"
        f"    return bool(np.linalg.norm(state[0:3] - start) > {cm / 100})\n"} for cm in (2, 4)]}


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["sac", "drq"])
def test_cli_code_reward_stores_each_episodes_progress(tmp_path, agent):
    """--reward code: the buffer's (1,) embedding of every observation is the in-order progress of its
    episode so far, as the verifier's offline rule computes it from the episode's states."""
    from furl_fast.rewards.code import ProgramSet, evaluate_programs, progress_from_done

    programs = ProgramSet.from_dict(MOVED_PROGRAMS)
    programs.save(tmp_path / "programs.json")
    run_dir = tmp_path / "run"
    # State SAC: 1500 steps, so that each of the 2 envs starts a second episode (its reset matters).
    steps = 1500 if agent == "sac" else SETTINGS[agent][0]
    args = train_args(run_dir, "vlm", "not-loaded", agent, steps=steps) + [
        "--reward", "code", "--code-programs", str(tmp_path / "programs.json"), "--num-envs", "2",
        "--warmup-steps", str(steps - 100)]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    values = [float(line.split(",")[2]) for line in (run_dir / "metrics.csv").read_text().splitlines()
              if ",charts/vlm_reward," in line]
    assert values and all(0.0 <= v <= 1.0 for v in values)

    state = torch.load(run_dir / CHECKPOINT_DIR / STATE_FILE, weights_only=False)
    buffer = ReplayBuffer.load(run_dir / CHECKPOINT_DIR / state["replay"])
    progress, states = {}, {}  # (episode, step) -> stored progress, observation
    for _ in range(20):  # sampling with replacement sees (nearly) every transition
        batch = buffer.sample(len(buffer), augment=False)
        for i in range(len(batch.indices)):
            key = (int(batch.episodes[i]), int(batch.steps[i]))
            progress[key] = float(batch.embedding[i, 0])
            states[key] = batch.obs[i].numpy()
    assert {0.0, 0.5, 1.0} <= set(progress.values()) <= {0.0, 0.5, 1.0}
    if agent == "drq":
        return  # pixel observations: the states behind them are not in the buffer
    checked = 0
    for episode in {e for e, _ in progress}:
        length = 0  # the prefix of the episode that sampling saw
        while (episode, length) in states:
            length += 1
        ep_states = np.stack([states[(episode, t)] for t in range(length)])
        rollout = SimpleNamespace(frames=np.zeros((length, 1, 1, 3), np.uint8), states=ep_states)
        done, _ = evaluate_programs(programs.programs, [rollout])
        offline = progress_from_done(done[0]) / len(programs)
        np.testing.assert_allclose([progress[(episode, t)] for t in range(length)], offline)
        checked += length
    assert checked > steps // 2


def test_code_reward_without_a_program_set_is_refused_with_advice(tmp_path):
    result = run_cli(["--algo", "vlm", "--reward", "code", "--task", "assembly",
                      "--run-dir", str(tmp_path / "r")], tmp_path, timeout=300)
    assert result.returncode == 2 and "no reference program set" in result.stderr, result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli(["--algo", "vlm", "--reward", "code", "--code-programs", str(bad),
                      "--run-dir", str(tmp_path / "r")], tmp_path, timeout=300)
    assert result.returncode == 2 and "cannot read a program set" in result.stderr, result.stderr


def test_updates_due_counts_agent_steps_and_update_every_steps():
    # DrQ-v2: action repeat 2, one update every 2 agent steps, i.e. one per 4 simulator steps.
    due = [updates_due(s - 2, s, repeat=2, every=2, per_step=1) for s in range(2, 42, 2)]
    assert due == [0, 1] * 10 and sum(due) == 10
    # 4 envs (8 simulator steps a vector step) and 3 updates per agent step: 2 agent steps due.
    assert {updates_due(s - 8, s, 2, 2, 3) for s in range(8, 80, 8)} == {6}
    # State SAC: every env step of every env, times updates_per_step.
    assert updates_due(12, 16, repeat=1, every=1, per_step=2) == 8


def test_nstep_vlm_reward_is_the_discounted_sum_of_per_step_rewards():
    """--sac.n-step / --drq.n-step > 1 with a VLM reward: the critic's VLM term is
    sum_j gamma^j R(o_{t+1+j}) over the same window as the n-step environment reward, cut where the
    episode ends; checked against a sum written out by hand for every transition."""
    n, gamma, dim = 3, 0.9, 2
    buf = ReplayBuffer(64, (1,), 1, embedding_dim=dim, n_step=n, gamma=gamma, seed=0)
    g = torch.Generator().manual_seed(0)
    lengths = (5, 2)  # the second episode is shorter than the window
    embs = [torch.randn(length + 1, dim, generator=g) for length in lengths]
    for ep, length in zip(embs, lengths):
        buf.start_episode(np.zeros(1, np.float32), embedding=ep[0])
        for t in range(length):
            buf.add(np.zeros(1, np.float32), np.zeros(1, np.float32), 0.0, False, t == length - 1,
                    embedding=ep[t + 1])

    def reward_fn(e: torch.Tensor) -> torch.Tensor:  # any per-embedding reward (non-linear here)
        return torch.tanh(e[:, 0] * 2 + e[:, 1] ** 2)

    assert len(buf) == sum(lengths)
    seen = set()
    for _ in range(20):  # sampling with replacement sees every transition
        batch = buf.sample(len(buf), augment=False)
        got, per_step = nstep_vlm_reward(batch, reward_fn)
        for i in range(len(buf)):
            e, t = int(batch.episodes[i]), int(batch.steps[i])
            ep, length = embs[e], lengths[e]
            want = sum(gamma ** j * float(reward_fn(ep[t + 1 + j : t + 2 + j]))
                       for j in range(min(n, length - t)))
            assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert float(per_step[i, 0]) == pytest.approx(float(reward_fn(ep[t + 1 : t + 2])))
            seen.add((e, t))
    assert len(seen) == sum(lengths)  # windows of every length (3, 2 and 1 steps) were checked
