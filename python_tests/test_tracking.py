"""What a run reports besides metrics.csv: TensorBoard's config text, hparams and eval video,
Weights & Biases tracking (--track, offline), and a console without third-party INFO lines. One
short CLI run (a random-weight ViT-S-32: pretrained none, whose warning must show once) checks
them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("wandb")  # the `track` extra (and `test`, so CI has it)
    root = tmp_path_factory.mktemp("tracked")
    run_dir = root / "run"
    args = ["--algo", "vlm", "--task", "reach", "--total-steps", "60", "--warmup-steps", "30",
            "--batch-size", "8", "--buffer-size", "200", "--eval-every", "60", "--log-every", "30",
            "--run-dir", str(run_dir), "--device", "cpu", "--vlm.model", "ViT-S-32",
            "--vlm.pretrained", "none", "--sac.hidden-dims", "16", "16", "--torch-threads", "1",
            "--track", "--wandb-project-name", "furl-test"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", FURL_FAST_CACHE=str(root / "c"),
               WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "wandb-cache"))
    result = subprocess.run([sys.executable, "-m", "furl_fast.train", *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_config_hparams_and_video(tracked_run):
    run_dir, _ = tracked_run
    acc = events(run_dir)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0]) == \
        json.loads((run_dir / "config.json").read_text())
    from tensorboard.plugins.hparams import plugin_data_pb2

    contents = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["algo"].string_value == "vlm" and hparams["sac.tau"].number_value == 0.01
    assert hparams["sac.hidden_dims"].string_value == "(16, 16)"
    videos = acc.Images("eval/video")
    assert [v.step for v in videos] == [0, 60]  # the untrained policy's, then the last one
    video = videos[-1]
    assert video.encoded_image_string[:6] == b"GIF89a"
    assert (video.width, video.height) == (128, 128)


def test_track_writes_an_offline_wandb_run(tracked_run):
    run_dir, result = tracked_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    # The run's config and the TensorBoard scalars it mirrors are in its (binary) record log.
    assert b"furl-test" in data and b"eval/success" in data and b"reach" in data


def test_console_is_quiet(tracked_run):
    _, result = tracked_run
    out = result.stdout + result.stderr
    assert "INFO OpenGL" not in out and "INFO root:" not in out
    assert out.count("RANDOM weights") == 1 and "initialized randomly" not in out
    assert "done: 60 steps" in result.stdout
