"""The training CLI end to end, in subprocesses, on Meta-World with a tiny random-weight encoder."""

from __future__ import annotations

import fcntl
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
from furl_fast.rewards.code import ProgramSet
from furl_fast.runs import CHECKPOINT_DIR, STATE_FILE, load_state, save_state
from furl_fast.trainer import nstep_vlm_reward, updates_due

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
    state = load_state(run_dir / CHECKPOINT_DIR / STATE_FILE)
    return len(ReplayBuffer.load(run_dir / CHECKPOINT_DIR / state["replay"])), state["step"]


@pytest.mark.slow
# Every algo with state SAC; with DrQ the plain agent and FuRL (whose relay agent is a second DrQ
# agent, so vlm and relay add no DrQ code path of their own).
@pytest.mark.parametrize(("algo", "agent"), [("sac", "sac"), ("vlm", "sac"), ("relay", "sac"),
                                             ("furl", "sac"), ("sac", "drq"), ("furl", "drq")])
def test_cli_run_writes_every_artefact(tmp_path, tiny_model, algo, agent):
    steps = SETTINGS[agent][0]
    run_dir = tmp_path / "run"
    video = algo == "furl"  # an eval video costs an episode of renders: checked once per agent
    # The sac runs train on Meta-World's dense reward (the oracle), the others on the sparse one.
    env_reward = "dense" if algo == "sac" else "sparse"
    args = train_args(run_dir, algo, tiny_model, agent, video=video) + ["--env-reward", env_reward]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo and config["agent"] == agent and config["total_steps"] == steps
    assert config["env_reward"] == env_reward
    returns = [float(line.split(",")[2]) for line in (run_dir / "metrics.csv").read_text().splitlines()
               if ",charts/episode_return," in line]
    # Sparse returns are sums of -1/0 per agent step; dense ones sum Meta-World's positive reward.
    assert returns and (all(r > 0 for r in returns) if env_reward == "dense" else all(r <= 0 for r in returns))
    def logged(name: str) -> list[float]:
        return [float(line.split(",")[2]) for line in (run_dir / "metrics.csv").read_text().splitlines()
                if f",{name}," in line]

    # The env's own (shaped) return whatever the critic's reward, and episodes of 500 simulator steps.
    assert len(logged("charts/episode_env_return")) == len(returns)
    assert all(r > 0 for r in logged("charts/episode_env_return"))
    assert set(logged("charts/episode_length")) == {500 / REPEAT[agent]}
    metrics = (run_dir / "metrics.csv").read_text()
    for name in ["eval/success", "eval/ever_success", "charts/episode_return", "losses/critic",
                 "charts/episode_env_return", "charts/episode_length"]:
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
    # Output is a pipe here, not a terminal: a plain progress line every --log-every (100) steps,
    # after the line saying what to expect.
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert "furl_fast.train: steps 0 -> " in result.stdout and "on a 2-core CPU" in result.stdout
    assert len(progress) == steps // 100, result.stdout[-3000:]
    assert progress[-1].startswith(f"step {steps}/{steps} (100%) | ")
    assert " steps/s | " in progress[-1]
    assert " episodes | success (last " in progress[-1] and progress[-1].endswith("ETA 0s")


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


@pytest.mark.slow
def test_resume_extends_a_finished_run_with_or_without_the_replay_in_checkpoints(tmp_path):
    """--resume RUN --total-steps N trains on to N; --no-checkpoint-replay leaves the buffer out of
    checkpoints, and the next resume says it starts with an empty one."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, "sac", "not-loaded", steps=600) + ["--warmup-steps", "500"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert replay_len(run_dir) == (600, 600)

    def eval_steps() -> list[int]:
        lines = (run_dir / "metrics.csv").read_text().splitlines()
        return [int(line.split(",")[0]) for line in lines if ",eval/success," in line]

    assert eval_steps() == [0, 600]  # the untrained policy first, as FuRL's release evaluates

    result = run_cli(["--resume", str(run_dir), "--total-steps", "700", "--no-checkpoint-replay"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 700 steps" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["total_steps"] == 700 and config["checkpoint_replay"] is False
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 700
    assert eval_steps() == [0, 600, 700]  # a resume does not evaluate step 0 again
    state = load_state(run_dir / CHECKPOINT_DIR / STATE_FILE)
    assert state["step"] == 700 and state["replay"] is None
    assert not list((run_dir / CHECKPOINT_DIR).glob("replay-*"))  # the old one is gone too

    result = run_cli(["--resume", str(run_dir), "--total-steps", "800", "--checkpoint-replay"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds no replay buffer" in result.stdout and "empty buffer" in result.stdout
    assert replay_len(run_dir) == (100, 800)  # only what the last resume collected


def fake_run(run_dir: Path, damage: str) -> None:
    """A run directory as a checkpoint leaves it, with state.pt or its replay file cut short."""
    from fake_runs import REPLAY, fake_run_dir  # python_tests/ is on sys.path

    ckpt = fake_run_dir(run_dir)
    save_state(ckpt / STATE_FILE, {"step": 1, "replay": REPLAY})
    damaged = ckpt / (STATE_FILE if damage == "state" else REPLAY)
    damaged.write_bytes(damaged.read_bytes()[:-20])


# Each: arguments (RUN: the run directory, TMP: the test's directory), what to set up, what the
# one-line message must say. All fail before any training step.
BAD_INPUT = {
    "unknown task": (["--task", "drawr-open"], None, "--task drawr-open is unknown (did you mean "
                     "'drawer-open'?); the 50 Meta-World tasks (each also as NAME-v3): assembly, "),
    "run dir is a file": (["--run-dir", "TMP/file"], "file", "TMP/file is a file, not a directory"),
    "run dir under a file": (["--run-dir", "TMP/file/run"], "file",
                             "TMP/file is a file, not a directory"),
    "cuda without a GPU": (["--device", "cuda"], "no gpu", "--device cuda but torch sees no usable CUDA"),
    "no prompt": (["--task", "assembly"], None, '--task assembly has no built-in prompt'),
    "missing checkpoint": (["--vlm.pretrained", "TMP/weights.pt"], None, "checkpoint file not found"),
    "damaged checkpoint": (["--vlm.pretrained", "TMP/random.pt"], "random.pt",
                           "cannot read 'TMP/random.pt' as a checkpoint (UnpicklingError)"),
    "weights not cached": (["--vlm.pretrained", "openai"], "offline",
                           "--vlm.pretrained openai: the weights of RN50 are not in the local cache"),
    "truncated state.pt": (["--resume", "RUN"], "state", "state.pt is damaged or incomplete"),
    "truncated replay": (["--resume", "RUN"], "replay", "is truncated or has trailing data"),
    "resume changes a setting": (["--resume", "RUN", "--seed", "3"], "ok",
                                 "--seed cannot change on a resume"),
    "run dir in use": ([], "locked", ("--run-dir RUN is in use: another furl_fast.train is writing "
                                      "it (it holds RUN/.lock)")),
    "resume of a running run": (["--resume", "RUN"], "locked run", "--resume RUN is in use"),
    "tb is a file": (["--resume", "RUN"], "tb file", "RUN/tb must be a directory"),
    "empty prompt": (["--vlm.prompt", "  "], None, "--vlm.prompt is empty"),
    "nothing to learn": (["--suite", "gymnasium", "--task", "CartPole-v1", "--algo", "sac"], None,
                         ("--suite gymnasium --algo sac without --gym.success-key: the sparse "
                          "reward is 0 at every step")),
    "too many envs": (["--num-envs", "100000"], None, ("--num-envs 100000 is too many for this "
                                                      "machine: more than 4 env workers per CPU core")),
}


def test_paper_preset_runs_liv_and_offline_stops_at_start_up(tmp_path):
    """--preset paper is the paper's configuration, LIV included: the start-up line names it, and
    without its weights (no cache, no network) the run stops with one line and exit 2."""
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "furl_fast.train", "--preset", "paper", "--task",
                             "drawer-open", "--run-dir", str(run_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "VLM liv (default weights)" in result.stdout and "render quality paper" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("furl_fast.train:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("furl_fast.train: --vlm.model liv: LIV's weights (model.pt of the "
                               "Hugging Face hub repo jasonyma/LIV) are not in the local cache and "
                               "cannot be downloaded"), lines[0]
    assert "--vlm.pretrained /path/to/model.pt" in lines[0]
    assert not run_dir.exists()


@pytest.mark.slow
def test_open_clip_weights_offline_say_which_file_to_download_and_the_flag(tmp_path):
    """--vlm.model RN50 with an empty weights cache and no network: exit 2 and our one line alone
    (not open_clip's own ERROR line before it), naming the file to download and the flags that take
    it (OpenAI's weights need the QuickGELU model name when given as a file)."""
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "furl_fast.train", "--algo", "vlm", "--task", "reach",
                             "--vlm.model", "RN50", "--device", "cpu", "--run-dir", str(tmp_path / "run")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith("furl_fast.train: --vlm.pretrained openai: the weights of RN50 ")
    assert "Download https://huggingface.co/timm/resnet50_clip.openai/resolve/main/" \
        "open_clip_pytorch_model.bin on a machine with network access" in result.stderr
    assert "--vlm.model RN50-quickgelu --vlm.pretrained /path/to/open_clip_pytorch_model.bin" \
        in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 1.5, 4.0])
def test_ctrl_c_while_starting_exits_130_with_one_line(tmp_path, tiny_model, delay):
    """Ctrl-C at any moment of start-up (the VLM load, two env worker processes starting, the
    expert's goal-image rollout rendering) ends the run within seconds: exit 130, one line on
    stderr, no traceback, nothing written. A signal that arrives once training runs checkpoints
    instead (also exit 130): then the run directory holds a complete checkpoint."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"))
    args = train_args(run_dir, "furl", tiny_model) + ["--num-envs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "furl_fast.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("furl_fast.train: starting furl reach")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    if "stopped by signal" in out:  # start-up was over: a checkpoint, resumable
        assert (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file()
    else:
        lines = [line for line in err.splitlines() if line.startswith("furl_fast.train:")]
        assert lines == ["furl_fast.train: interrupted while starting; nothing was written."], err
        assert not run_dir.exists()


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, case):
    """What a user gets wrong ends at start-up: exit 2, one line on stderr naming
    the problem, no traceback, no run directory (a resumed one unchanged)."""
    args, setup, message = BAD_INPUT[case]
    run_dir, env = tmp_path / "run", dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"))
    if setup == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if setup == "file":
        (tmp_path / "file").write_text("not a directory")
    if setup == "random.pt":
        (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(100_000))
    if setup == "offline":  # an empty weights cache and no network: what an offline user has
        env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    if setup in ("state", "replay", "ok", "locked run", "tb file"):
        fake_run(run_dir, setup)
    if setup == "tb file":
        (run_dir / "tb").write_text("not a directory")
    if setup in ("locked", "locked run"):  # what a running furl_fast.train holds
        run_dir.mkdir(exist_ok=True)
        lock = open(run_dir / ".lock", "w")  # noqa: SIM115  (held until the test ends)
        fcntl.flock(lock, fcntl.LOCK_EX)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [a.replace("TMP", str(tmp_path)).replace("RUN", str(run_dir))
            for a in ["--algo", "furl", "--run-dir", "RUN", *args]]
    if args[:1] == ["--resume"]:
        argv = argv[4:]  # a resume takes the run's own settings
    proc = subprocess.Popen([sys.executable, "-m", "furl_fast.train", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("furl_fast.train:")]
    assert len(lines) == 1, err[-3000:]
    assert message.replace("TMP", str(tmp_path)).replace("RUN", str(run_dir)) in lines[0], lines[0]
    assert "weights_only" not in err
    if setup in ("state", "replay", "ok", "locked", "locked run", "tb file"):
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    else:
        assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["goal_baseline", "binary"])
def test_cli_zero_shot_rewards(tmp_path, tiny_model, reward):
    """--reward picks the zero-shot reward model the critic learns from (vlm algo)."""
    run_dir = tmp_path / "run"
    options = {"binary": ["--reward.threshold", "0.9"], "goal_baseline": ["--reward.alpha", "1.0"]}
    args = train_args(run_dir, "vlm", tiny_model) + ["--reward", reward, *options.get(reward, []),
                                                      "--total-steps", "700", "--warmup-steps", "500",
                                                      "--eval-every", "700"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())["reward"]
    assert saved["name"] == reward
    assert saved.get("threshold", 0.9) == 0.9 and saved.get("alpha", 1.0) == 1.0
    assert not (run_dir / "videos").exists()  # --no-eval-video
    values = [float(line.split(",")[2]) for line in (run_dir / "metrics.csv").read_text().splitlines()
              if ",charts/vlm_reward," in line]
    assert values
    if reward == "binary":  # the logged value is the batch mean of 0/1 rewards
        assert all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["CartPole-v1", "Humanoid-v5"])
def test_cli_any_gymnasium_env_with_a_clip_reward(tmp_path, tiny_model, task):
    """--suite gymnasium trains on a Gymnasium id with a CLIP reward of its rendered frames (the
    tasks VLM-RM used): CartPole's Discrete actions through ContinuousActions, Humanoid's float64
    MuJoCo observations; without a success key the env reward is 0, so the VLM reward alone trains."""
    run_dir = tmp_path / "run"
    args = ["--suite", "gymnasium", "--task", task, "--algo", "vlm", "--reward", "cosine",
            "--vlm.prompt", "a pole balanced upright" if task.startswith("CartPole") else
            "a humanoid robot standing", "--vlm.model", tiny_model, "--vlm.pretrained", "none",
            "--total-steps", "300", "--warmup-steps", "200", "--batch-size", "32", "--buffer-size",
            "5000", "--eval-every", "300", "--no-eval-video", "--run-dir", str(run_dir), "--device",
            "cpu", "--sac.hidden-dims", "32", "32", "--torch-threads", "1", "--log-every", "100"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["suite"], config["task"], config["reward"]["name"]) == ("gymnasium", task, "cosine")
    rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    vlm = [float(v) for _, name, v in rows if name == "charts/vlm_reward"]
    assert vlm and all(-1.0 <= v <= 1.0 for v in vlm)
    assert {float(v) for _, name, v in rows if name == "charts/episode_return"} == {0.0}
    assert json.loads((run_dir / "eval.json").read_text())["eval/success"] == 0.0


def test_cli_gymnasium_furl_without_a_goal_image_says_which_flag(tmp_path, tiny_model):
    result = run_cli(["--suite", "gymnasium", "--task", "CartPole-v1", "--algo", "furl",
                      "--vlm.prompt", "a pole balanced upright", "--vlm.model", tiny_model,
                      "--vlm.pretrained", "none", "--run-dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--gym.goal-image FILE" in result.stderr and "--furl.no-phase-a" in result.stderr
    assert not (tmp_path / "run").exists()


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
        "--reward", "code", "--reward.programs", str(tmp_path / "programs.json"), "--num-envs", "2",
        "--warmup-steps", str(steps - 100), "--reward.allow-unverified", "--reward.verify-expert", "1",
        "--reward.verify-random", "2"]  # random actions move the hand too: a set made to fail
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    values = [float(line.split(",")[2]) for line in (run_dir / "metrics.csv").read_text().splitlines()
              if ",charts/vlm_reward," in line]
    assert values and all(0.0 <= v <= 1.0 for v in values)

    state = load_state(run_dir / CHECKPOINT_DIR / STATE_FILE)
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


def test_code_reward_sets_that_fail_verification_or_all_rejected_stop_with_one_line(tmp_path):
    programs = tmp_path / "moved.json"
    ProgramSet.from_dict(MOVED_PROGRAMS).save(programs)
    fast = ["--reward.verify-expert", "1", "--reward.verify-random", "2", "--run-dir", str(tmp_path / "r")]
    result = run_cli(["--algo", "vlm", "--reward", "code", "--reward.programs", str(programs),
                      "--task", "reach", *fast], tmp_path, timeout=300)
    error = result.stderr.strip().splitlines()[-1]  # one line, after the log lines
    assert result.returncode == 2 and error.startswith("furl_fast.train:"), result.stderr
    assert "failed verification" in error and "100%/100%" in error and "--reward.allow-unverified" in error
    assert not (tmp_path / "r").exists()
    hostile = tmp_path / "hostile.json"
    ProgramSet("reach-v3", ["a"], ["import os\ndef done(frame, state):\n    return True\n"]).save(hostile)
    result = run_cli(["--algo", "vlm", "--reward", "code", "--reward.programs", str(hostile),
                      "--task", "reach", "--reward.allow-unverified", *fast], tmp_path, timeout=300)
    assert result.returncode == 2 and "every program" in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_code_reward_without_a_program_set_is_refused_with_advice(tmp_path):
    result = run_cli(["--algo", "vlm", "--reward", "code", "--task", "assembly",
                      "--run-dir", str(tmp_path / "r")], tmp_path, timeout=300)
    assert result.returncode == 2 and "no hand-written reference program set" in result.stderr, \
        result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli(["--algo", "vlm", "--reward", "code", "--reward.programs", str(bad),
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


def test_a_config_problem_is_found_before_torch_or_the_vlm_load(tmp_path):
    """A mistake on the command line is refused by the flag's name without importing torch or
    open_clip (which take seconds): parse and check as main() does, in a fresh interpreter."""
    code = ("import sys\n"
            "from furl_fast.train import check_config, parse_args\n"
            "try:\n"
            "    check_config(parse_args(['--seed', '-1', '--run-dir', 'run']).config)\n"
            "except ValueError as exc:\n"
            "    print(exc)\n"
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    message, imported = result.stdout.splitlines()
    assert message.startswith("invalid configuration: --seed -1 must be >= 0."), message
    assert imported == "[]"


@pytest.mark.slow
def test_a_running_run_dir_is_locked_and_a_killed_runs_lock_is_taken_over(tmp_path):
    """A second run into a running run's directory, or a resume of it, is refused with one line;
    once the first is killed (-9: no clean-up at all) a resume takes over, removing the temporary
    files a killed run can leave."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"))
    args = train_args(run_dir, "sac", "RN50", steps=100_000) + ["--eval-episodes", "1"]
    first = subprocess.Popen([sys.executable, "-m", "furl_fast.train", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():  # training, checkpointed
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.5)
        for argv in (args, ["--resume", str(run_dir)]):
            second = run_cli(argv, tmp_path, timeout=120)
            assert second.returncode == 2, second.stderr[-3000:]
            lines = [line for line in second.stderr.splitlines() if line.startswith("furl_fast.train:")]
            assert len(lines) == 1 and f"{run_dir} is in use: another furl_fast.train is writing " \
                "it" in lines[0], second.stderr[-3000:]
    finally:
        first.kill()
        first.communicate(timeout=60)
    ckpt = run_dir / CHECKPOINT_DIR
    step = load_state(ckpt / STATE_FILE)["step"]
    leftovers = [ckpt / ".replay-0000000900.bin.tmp4242", ckpt / (STATE_FILE + ".tmp")]
    for path in leftovers:
        path.write_bytes(b"half written")
    result = run_cli(["--resume", str(run_dir), "--total-steps", str(step)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(path.exists() for path in leftovers)


def test_a_full_disk_during_training_ends_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """No space left while the first checkpoint's replay file is written: the run stops with exit 1
    and one line naming the file and the cause, and leaves no temporary file behind. (Simulated:
    fsync fails with ENOSPC for files of the run directory.)"""
    import errno

    from furl_fast.train import parse_args, train

    run_dir = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(run_dir)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setenv("FURL_FAST_CACHE", str(tmp_path / "cache"))
    args = train_args(run_dir, "sac", "RN50", steps=400) + ["--checkpoint-every", "100",
                                                           "--warmup-steps", "100",
                                                           "--eval-episodes", "1"]
    assert train(parse_args(args).config) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("furl_fast.train:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"furl_fast.train: cannot write {run_dir / CHECKPOINT_DIR}/replay-0000000100"
                               ".bin: No space left on device (at step 100); the run stopped."), lines[0]
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def test_durations_read_well_for_short_and_long_runs():
    from furl_fast._cli import format_seconds

    assert [format_seconds(s) for s in (0, 45.9, 750, 3 * 3600 + 5 * 60 + 59, 2 * 86400 + 4 * 3600 + 1)] \
        == ["0s", "45s", "12m30s", "3h05m", "2d04h"]


def test_num_envs_beyond_the_machines_memory_are_refused_unless_allowed(monkeypatch):
    import furl_fast.train as train_module
    from furl_fast.config import Config

    monkeypatch.setattr(train_module, "_available_memory", lambda: 1 << 30)  # 1 GiB free
    cfg = Config(algo="sac", agent="drq", task="reach", num_envs=2)  # ~1.4 GiB of pixel workers
    with pytest.raises(ValueError, match=r"--num-envs 2 is too many for this machine: its env workers take "
                                         r"about 1\.4 GiB "
                                         r"\(~700 MiB each\), more than the 1\.0 GiB of memory "
                                         r"available; lower --num-envs, or pass --allow-many-envs"):
        train_module.check_config(cfg)
    train_module.check_config(cfg, allow_many_envs=True)
    train_module.check_config(Config(algo="sac", task="reach", num_envs=3))  # ~0.9 GiB of states
