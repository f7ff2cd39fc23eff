"""Files furl_fast reads back from a run directory (checkpoints/state.pt, config.json) as an attacker
or a failing disk leaves them: nothing in them runs, damage is refused with one line naming the file,
and a malformed config.json is never read as defaults."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_runs import REPLAY, fake_run_dir  # python_tests/ is on sys.path

from furl_fast import sweep
from furl_fast.config import Config, config_to_dict
from furl_fast.runs import CHECKPOINT_DIR, STATE_FILE, rng_state
from furl_fast.train import main as train_main


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FURL_FAST_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(stderr: str, prefix: str = "furl_fast.train:") -> str:
    """The command's one message line; no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


class _RunsCode:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def fake_run(run_dir: Path, state: dict) -> None:
    """fake_runs.fake_run_dir with state.pt a plain torch.save of state, as an attacker would write
    it."""
    torch.save(state, fake_run_dir(run_dir) / STATE_FILE)


def malicious_run(run_dir: Path, marker: Path) -> None:
    fake_run(run_dir, {"step": 1, "replay": REPLAY, "rng": _RunsCode(marker)})


# ---- pickle payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "args"), [("furl_fast.train", ["--resume"]),
                                              ("furl_fast.runs", ["convert"])],
                         ids=["resume", "converter"])
def test_pickle_payload_in_state_pt_runs_nothing(tmp_path, module, args):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    malicious_run(run_dir, marker)
    before = files(run_dir)
    result = run_module(module, [*args, str(run_dir)], tmp_path)
    assert not marker.exists()
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result.stderr, f"{module}:")
    assert str(run_dir / CHECKPOINT_DIR / STATE_FILE) in line and "nothing was changed" in line, line
    assert files(run_dir) == before


def test_pickle_payload_runs_nothing_in_the_sweeps_step_probe(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    malicious_run(run_dir, marker)
    with pytest.raises(ValueError, match=str(run_dir / CHECKPOINT_DIR / STATE_FILE)):
        sweep.checkpoint_step(run_dir)
    assert not marker.exists()

    # The sweep's worker leaves the run as it is (no fresh start over it) and logs why.
    before = files(run_dir)
    result = sweep.execute_run(str(run_dir), ["--algo", "sac"], attempt=1, attempts=1)
    assert not marker.exists()
    assert result["code"] == 2 and not result["finished"], result
    log = (run_dir / sweep.RUN_LOG).read_text()
    assert f"cannot resume {run_dir}" in log and str(run_dir / CHECKPOINT_DIR / STATE_FILE) in log
    assert {k: v for k, v in files(run_dir).items() if k not in (sweep.RUN_LOG, sweep.LOCK_FILE)} == before


def test_pickle_payload_with_a_valid_checksum_is_refused_unread(tmp_path):
    """An attacker can write the header and checksum too: the payload is still read with
    weights_only=True, which constructs no object."""
    from furl_fast.runs import _STATE_HEADER, STATE_MAGIC, STATE_VERSION

    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    malicious_run(run_dir, marker)
    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    payload = path.read_bytes()
    path.write_bytes(_STATE_HEADER.pack(STATE_MAGIC, STATE_VERSION, len(payload),
                                        hashlib.sha256(payload).digest()) + payload)
    before = files(run_dir)
    result = run_module("furl_fast.train", ["--resume", str(run_dir)], tmp_path)
    assert not marker.exists()
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result.stderr)
    assert f"{path} holds more than tensors and plain values" in line, line
    assert "weights_only" not in result.stderr
    with pytest.raises(ValueError, match="holds more than tensors"):
        sweep.checkpoint_step(run_dir)
    assert not marker.exists() and files(run_dir) == before


# ---- a real checkpoint: damage, the earlier format, the round trip ---------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 600-step state SAC run (no VLM) with its checkpoint; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    args = ["--no-eval-video", "--algo", "sac", "--task", "reach", "--seed", "0", "--total-steps",
            "600", "--warmup-steps", "500", "--batch-size", "32", "--buffer-size", "5000",
            "--eval-every", "600", "--checkpoint-every", "600", "--run-dir", str(run_dir), "--device",
            "cpu", "--sac.hidden-dims", "32", "32", "--torch-threads", "1", "--log-every", "100"]
    result = run_module("furl_fast.train", args, root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copied(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_a_flipped_bit_in_state_pt_is_refused_naming_the_file(finished_run, tmp_path):
    run_dir = copied(finished_run, tmp_path)
    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # the middle of the file: network weights or Adam moments
    path.write_bytes(bytes(data))
    before = files(run_dir)
    result = run_module("furl_fast.train", ["--resume", str(run_dir), "--total-steps", "700"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result.stderr)
    assert f"{path} is damaged" in line and "nothing was changed" in line, line
    assert files(run_dir) == before


def test_every_single_bit_flip_is_refused(finished_run, tmp_path):
    """Header or payload, any byte: load_state refuses it with a ValueError naming the file."""
    from furl_fast.runs import load_state

    path = tmp_path / STATE_FILE
    original = (finished_run / CHECKPOINT_DIR / STATE_FILE).read_bytes()
    rng = np.random.default_rng(0)
    offsets = [*range(64), *rng.choice(len(original), 300, replace=False), len(original) - 1]
    for offset in offsets:
        data = bytearray(original)
        data[offset] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=str(path)):
            load_state(path)
    path.write_bytes(original[:-1])
    with pytest.raises(ValueError, match="damaged or incomplete"):
        load_state(path)


def as_earlier_version(run_dir: Path) -> None:
    """Rewrites the run's state.pt as earlier furl_fast versions wrote it: a plain torch.save of the
    state (numpy arrays and RNG tuples pickled as objects)."""
    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    if path.read_bytes()[:4] != b"PK\x03\x04":
        from furl_fast.runs import load_state

        torch.save(load_state(path), path)


def test_checkpoint_of_an_earlier_version_is_refused_then_converted_and_resumed(finished_run, tmp_path):
    run_dir = copied(finished_run, tmp_path)
    as_earlier_version(run_dir)
    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    before = files(run_dir)
    result = run_module("furl_fast.train", ["--resume", str(run_dir), "--total-steps", "700"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result.stderr)
    assert f"{path} is a checkpoint of an earlier furl_fast version" in line, line
    assert f"python -m furl_fast.runs convert {run_dir}" in line, line
    assert files(run_dir) == before

    result = run_module("furl_fast.runs", ["convert", str(run_dir)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"converted {path} (step 600)" in result.stdout
    from furl_fast.runs import load_state

    assert_same(load_state(path), torch.load(io.BytesIO(before[f"{CHECKPOINT_DIR}/{STATE_FILE}"]),
                                             weights_only=False))
    result = run_module("furl_fast.runs", ["convert", str(run_dir)], tmp_path)
    assert result.returncode == 2 and "in the current format already" in result.stderr

    result = run_module("furl_fast.train", ["--resume", str(run_dir), "--total-steps", "700"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 700 steps" in result.stdout and load_state(path)["step"] == 700


def assert_same(a, b) -> None:
    """Equal values of the same types, tensors and arrays bit for bit (dtype included)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def test_state_round_trip_keeps_every_value_and_type(tmp_path):
    from furl_fast.runs import load_state, save_state

    state = {"step": 7, "replay": None, "rng": rng_state(),
             "pcg": np.random.default_rng(3).bit_generator.state,  # 128-bit ints
             "arrays": [np.arange(5, dtype=np.int64), np.ones(3, bool), np.zeros((2, 0), np.float32)],
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                           "param_groups": [{"betas": (0.9, 0.999), "foreach": None}]},
             "phase": "B", "recent": [1.0, 0.0], "head": torch.nn.Linear(2, 3).state_dict()}
    save_state(tmp_path / STATE_FILE, state)
    loaded = load_state(tmp_path / STATE_FILE)
    assert_same(loaded, state)
    assert loaded["head"]._metadata == state["head"]._metadata  # a module's state_dict versions
    assert not (tmp_path / (STATE_FILE + ".tmp")).exists()
    with pytest.raises(TypeError, match="got a builtins.set"):
        save_state(tmp_path / STATE_FILE, {"step": 1, "replay": None, "x": {1}})
    assert_same(load_state(tmp_path / STATE_FILE), state)  # the previous file is intact


# ---- config.json ----------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(config: dict) -> dict:
        *parents, last = path.split(".")
        section = config
        for name in parents:
            section = section[name]
        section[last] = value
        return config
    return edit


def _drop(path: str):
    def edit(config: dict) -> dict:
        *parents, last = path.split(".")
        section = config
        for name in parents:
            section = section[name]
        del section[last]
        return config
    return edit


# Each: the change to a saved config.json (an edit of its dict, or the file's text), and what the
# one line on stderr says after "--resume RUN: config.json: ".
BAD_CONFIGS = {
    "not an object": ("[1, 2]", "the configuration must be an object, got a list."),
    "unknown field": (_set("sac.foo", 1), 'field "sac.foo" is unknown.'),
    "missing field": (_drop("seed"), 'field "seed" is missing.'),
    "missing nested field": (_drop("sac.tau"), 'field "sac.tau" is missing.'),
    "string for a float": (_set("sac.tau", "abc"), 'field "sac.tau" must be a float, got "abc".'),
    "bool for an int": (_set("seed", True), 'field "seed" must be an integer, got true.'),
    "float for an int": (_set("total_steps", 1000.5),
                         'field "total_steps" must be an integer, got 1000.5.'),
    "int for a bool": (_set("eval_video", 1), 'field "eval_video" must be a boolean, got 1.'),
    "string for a bool": (_set("checkpoint_replay", "false"),
                          'field "checkpoint_replay" must be a boolean, got "false".'),
    "string for an optional int": (_set("buffer_size", "5000"),
                                   'field "buffer_size" must be an integer or null, got "5000".'),
    "string for a tuple": (_set("sac.hidden_dims", "256"),
                           'field "sac.hidden_dims" must be a list of integers, got "256".'),
    "wrong item in a tuple": (_set("sac.hidden_dims", [32, "x"]),
                              'field "sac.hidden_dims[1]" must be an integer, got "x".'),
    "section not an object": (_set("furl", 3), 'field "furl" must be an object, got 3.'),
    "unknown literal": (_set("algo", "ppo"),
                        'field "algo" must be one of "sac", "vlm", "relay", "furl", got "ppo".'),
    "null literal": (_set("vlm.precision", None), 'field "vlm.precision" must be one of "auto", '),
    "null where not allowed": (_set("task", None), 'field "task" must be a string, got null.'),
    "unknown reward": (_set("reward", {"name": "gpt"}), 'field "reward.name" must be one of "auto", '),
    "reward option of a wrong type": (
        _set("reward", {"name": "goal_baseline", "alpha": "x", "goal_prompts": None,
                        "baseline_prompts": ["a"]}), 'field "reward.alpha" must be a float, got "x".'),
    "unknown reward option": (_set("reward", {"name": "cosine", "alpha": 0.5}),
                              'field "reward.alpha" is unknown.'),
    "NaN": ('{"seed": NaN}', "NaN is not a number JSON allows."),
    "deeply nested": ('{"sac": ' + "[" * 100_000 + "]" * 100_000 + "}",
                      "nested too deeply to be a configuration."),
    "huge file": (" " * (2 << 20) + "{}", f"{(2 << 20) + 2} bytes, more than the 1048576 a configuration can take."),
    "not JSON": ('{"algo": ', "not valid JSON (Expecting value, line 1 column 10)."),
    "not UTF-8": (b'{"algo": "\xff"}', "not UTF-8 text"),
}


def bad_config_run(run_dir: Path, case: str) -> None:
    fake_run(run_dir, {"step": 1, "replay": REPLAY})
    edit, _ = BAD_CONFIGS[case]
    path = run_dir / "config.json"
    if callable(edit):
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    else:
        path.write_bytes(edit if isinstance(edit, bytes) else edit.encode())


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_config_json_is_refused_naming_the_field(tmp_path, case, capsys):
    run_dir = tmp_path / "run"
    bad_config_run(run_dir, case)
    before = files(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--resume", str(run_dir)])
    assert exit_info.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"furl_fast.train: --resume {run_dir}: config.json: "), line
    assert BAD_CONFIGS[case][1] in line, line
    assert files(run_dir) == before


def test_malformed_config_json_through_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    bad_config_run(run_dir, "string for a float")
    before = files(run_dir)
    result = run_module("furl_fast.train", ["--resume", str(run_dir)], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line(result.stderr) == (f'furl_fast.train: --resume {run_dir}: config.json: field '
                                       f'"sac.tau" must be a float, got "abc".')
    assert files(run_dir) == before


def test_saved_config_round_trips_every_reward():
    from furl_fast.config import REWARD_CONFIG_CLASSES, config_from_dict

    for name in REWARD_CONFIG_CLASSES:
        algo = "furl" if name in ("auto", "furl") else "vlm"
        cfg = Config(algo=algo, reward=name, rho=None, buffer_size=None)
        assert config_from_dict(Config, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
