"""python -m furl_fast.generate_programs end to end, in subprocesses, against a loopback server that
answers like an OpenAI-compatible endpoint (fake_vlm.FakeVLM); the written set then trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_vlm import FakeVLM  # python_tests/ is on sys.path

from furl_fast.rewards.code import ProgramSet, reference_program_set

KEY = "sk-test-secret-4242"
# Short rollouts keep it quick: reach's scripted expert gets there within 100 steps.
FAST = ["--task", "reach", "--model", "fake-vlm", "--inputs", "state", "--expert-episodes", "2",
        "--random-episodes", "4", "--max-steps", "100", "--timeout", "20"]


def reply(ps: ProgramSet, prose: bool = True) -> str:
    body = json.dumps({"subtasks": ps.to_dict()["subtasks"]})
    return f"Here is the plan.\n```json\n{body}\n```\nLet me know." if prose else body


def generate(tmp_path: Path, url: str, *extra: str, key: str | None = KEY, **env_vars: str):
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"), **env_vars)
    env.pop("OPENAI_BASE_URL", None)
    env.pop("OPENAI_API_KEY", None)
    if key is not None:
        env["OPENAI_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "furl_fast.generate_programs", "--base-url", url,
                           *FAST, "--out", str(tmp_path / "reach.json"), *extra], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def no_key_anywhere(tmp_path: Path, server: FakeVLM) -> None:
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert all(KEY not in json.dumps(r) for r in server.requests)


ALWAYS = ProgramSet("reach-v3", ["anything"], ["def done(frame, state):\n    return True\n"])


@pytest.mark.slow
def test_rejected_then_corrected_set_is_written_audited_and_trains(tmp_path):
    with FakeVLM([reply(ALWAYS), reply(reference_program_set("reach"))]) as server:
        result = generate(tmp_path, server.url, "--rounds", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "round 1: REJECTED" in result.stdout and "round 2: ACCEPTED" in result.stdout
    ps = ProgramSet.load(tmp_path / "reach.json")
    assert ps.programs == reference_program_set("reach").programs and ps.inputs == "state"
    report = json.loads((tmp_path / "reach.report.json").read_text())
    assert report["accepted"] and report["rounds"] == 2
    final = report["final"]
    assert final["num_expert"] == 2 and final["num_random"] == 4
    assert final["rollouts"]["seed"] == 0 and final["rollouts"]["max_steps"] == 100
    assert [p["expert_rate"] for p in final["programs"]] == [1.0, 1.0]
    transcript = json.loads((tmp_path / "reach.transcript.json").read_text())["exchanges"]
    assert len(transcript) == 2 and "Here is the plan" in json.dumps(transcript[0]["response"])
    feedback = server.requests[1]["messages"][-1]["content"]
    assert "REJECTED" in feedback and "random rollouts" in feedback
    no_key_anywhere(tmp_path, server)

    # The written set trains through the real CLI; the run verifies it first (full-length episodes).
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "furl_fast.train", "--algo", "vlm", "--reward", "code",
         "--reward.programs", str(tmp_path / "reach.json"), "--reward.verify-expert", "2",
         "--reward.verify-random", "4", "--task", "reach", "--total-steps", "300",
         "--warmup-steps", "200", "--batch-size", "16", "--eval-every", "300", "--no-eval-video",
         "--checkpoint-every", "300", "--sac.hidden-dims", "16", "16", "--device", "cpu",
         "--torch-threads", "1", "--run-dir", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["reward"]["allow_unverified"] is False


@pytest.mark.slow
def test_malformed_json_then_a_429_then_a_set(tmp_path):
    with FakeVLM([("Sure! ```json\n{\"subtasks\": [{\"program\": \n```"), 429,
                  reply(reference_program_set("reach"), prose=False)]) as server:
        result = generate(tmp_path, server.url, "--rounds", "2", "--max-retries", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(server.requests) == 3  # round 1, round 2, its retry after the 429
    assert "cannot parse" in server.requests[1]["messages"][-1]["content"]
    assert server.requests[2] == server.requests[1]


@pytest.mark.slow
def test_timeout_is_one_line_and_the_transcript_is_kept(tmp_path):
    with FakeVLM([("sleep", 3, "late"), ("sleep", 3, "late")]) as server:
        result = generate(tmp_path, server.url, "--timeout", "0.5", "--max-retries", "1")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no answer" in result.stderr, result.stderr
    transcript = json.loads((tmp_path / "reach.transcript.json").read_text())["exchanges"]
    assert "no answer" in transcript[0]["error"]
    assert not (tmp_path / "reach.json").exists()


@pytest.mark.slow
def test_hostile_code_is_rejected_reported_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    source = (f"import os\nos.system('touch {marker}')\nopen('{marker}', 'w')\n"
              "def done(frame, state):\n    return True\n")
    hostile = ProgramSet("reach-v3", ["escape"], [source])
    with FakeVLM([reply(hostile)]) as server:
        result = generate(tmp_path, server.url, "--rounds", "1")
    assert result.returncode == 1 and "no program set passed" in result.stderr
    assert not marker.exists() and not (tmp_path / "reach.json").exists()
    report = json.loads((tmp_path / "reach.report.json").read_text())
    errors = report["final"]["programs"][0]["errors"]
    assert errors and "import of 'os' is not allowed" in errors[0]
    no_key_anywhere(tmp_path, server)


# Reads the generator's environment (the worker's parent's, or its grandparent's behind a supervisor)
# and puts what it finds into its error, which the next round's feedback prompt reports.
LEAKING = """import numpy as np
B = np.ma.core.builtins
def done(frame, state):
    os = B.getattr(B, '__imp' + 'ort__')('os')
    found = b''
    for pid in (os.getppid(), os.getpgrp()):
        data = B.open('/proc/%d/environ' % pid, 'rb').read()
        if b'FURL_TEST_VALUE' in data:
            found = data[data.find(b'FURL_TEST_VALUE'):][:60]
    raise ValueError(found)
"""


@pytest.mark.slow
def test_no_secret_reaches_the_feedback_prompt(tmp_path):
    secret = "s3cr3t-in-the-generators-environment"
    leaking = ProgramSet("reach-v3", ["leak"], [LEAKING])
    with FakeVLM([reply(leaking), reply(leaking)]) as server:
        result = generate(tmp_path, server.url, "--rounds", "2", FURL_TEST_VALUE=secret)
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(server.requests) == 2  # the second carries the first round's failures
    assert "leak" in json.dumps(server.requests[1])
    assert all(secret not in json.dumps(r) for r in server.requests)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    no_key_anywhere(tmp_path, server)


@pytest.mark.parametrize("case", ["no-url", "no-key", "task", "out"])
def test_bad_input_is_one_line_exit_2_and_calls_nothing(tmp_path, case):
    with FakeVLM([]) as server:
        url = "" if case == "no-url" else server.url
        extra = ["--task", "no-such-task"] if case == "task" else \
            ["--out", str(tmp_path / "missing" / "x.json")] if case == "out" else []
        result = generate(tmp_path, url, *extra, key=None if case == "no-key" else KEY)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert server.requests == []
