"""The one-shot GPU validation (furl_fast.gpu_check): its CPU dry run, and the bookkeeping of the
GPU parts with their commands replaced (no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from furl_fast import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_without_a_gpu_skips_the_gpu_parts(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, "-m", "furl_fast.gpu_check", "--out", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    parts = {p["part"]: p for p in results["parts"]}
    assert sorted(parts) == [1, 2, 3, 4]
    assert parts[1]["details"]["selftest"] and "build_info" in parts[1]["details"]
    for n in (2, 3, 4):
        assert parts[n]["status"] == "skipped"
        assert parts[n]["reason"].startswith("no usable CUDA GPU"), parts[n]
    md = (tmp_path / "results.md").read_text()
    assert "| 2 | pytest -m cuda | skipped |" in md and "no usable CUDA GPU" in md


def test_gpu_parts_record_each_outcome_as_they_go(tmp_path, monkeypatch):
    """Parts 2-4 with the GPU check and the commands faked: statuses, reasons and the files
    rewritten after every part (a run stopped early keeps what it did)."""
    seen = []

    def command(self, name, cmd, limit_s, env=None):
        seen.append(name)
        done = [p["part"] for p in json.loads((tmp_path / "results.json").read_text())["parts"]]
        if name == "memcheck":
            assert done == [2]  # part 2 is on disk before part 3 starts
        return {"cuda_tests": (0, "57 passed in 80.2s"), "memcheck": (0, ""),
                "racecheck": (1, "Device not supported"), "bench_train": (None, "")}.get(
                    name, (0, ""))

    monkeypatch.setattr(gpu_check, "gpu_reason", lambda: None)
    monkeypatch.setattr(gpu_check, "missing_wheels", lambda: [])
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(gpu_check.Run, "command", command)
    assert gpu_check.main(["--out", str(tmp_path), "--repo", str(REPO), "--parts", "2,3,4"]) == 1
    parts = {p["part"]: p for p in json.loads((tmp_path / "results.json").read_text())["parts"]}
    assert parts[2]["status"] == "passed" and parts[2]["reason"] == "57 passed in 80.2s"
    assert parts[3]["status"] == "passed" and "racecheck: skipped" in parts[3]["reason"]
    assert parts[4]["status"] == "failed" and "train: timed out" in parts[4]["reason"]
    assert seen == ["cuda_tests", "memcheck", "racecheck", "bench_preprocess", "bench_reward_ops",
                    "bench_sac", "bench_drq", "bench_train"]


def test_list_wheels(capsys):
    assert gpu_check.main(["--list-wheels"]) == 0
    out = capsys.readouterr().out
    assert "open_clip_torch" in out and "pytest-benchmark" in out and "missing here:" in out
