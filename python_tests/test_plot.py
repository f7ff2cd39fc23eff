from __future__ import annotations

import json
import subprocess
import sys

import pytest

from furl_fast import metrics, plot


def make_run(root, name, seed, successes, algo="furl"):
    run = root / name
    writer = metrics.MetricsWriter(run, tensorboard=False)
    for step, value in successes:
        writer.log(step, {"eval/success": value, "charts/episode_return": -500 + 500 * value})
    writer.close()
    (run / "config.json").write_text(json.dumps({"algo": algo, "task": "reach", "seed": seed}))
    return run


def test_aggregate_mean_and_std_over_seeds(tmp_path):
    a = make_run(tmp_path, "a", 0, [(0, 0.0), (100, 1.0), (200, 1.0)])
    b = make_run(tmp_path, "b", 1, [(0, 0.0), (100, 0.0)])
    runs = [metrics.read_metrics(a), metrics.read_metrics(b)]
    steps, means, stds = plot.aggregate(runs, "eval/success")
    assert steps == [0, 100]  # up to the shortest run
    assert means == [0.0, 0.5] and stds == [0.0, 0.5]


def test_resume_truncates_later_rows(tmp_path):
    run = make_run(tmp_path, "r", 0, [(0, 0.0), (100, 1.0), (200, 1.0)])
    metrics.MetricsWriter(run, resume_step=100, tensorboard=False).close()
    assert [s for s, _ in metrics.read_metrics(run)["eval/success"]] == [0, 100]


def test_cli_writes_png(tmp_path):
    runs = [make_run(tmp_path, f"s{i}", i, [(0, 0.0), (50, i / 2)]) for i in range(2)]
    runs.append(make_run(tmp_path, "sac", 0, [(0, 0.0), (50, 0.0)], algo="sac"))
    out = tmp_path / "curves.png"
    subprocess.run([sys.executable, "-m", "furl_fast.plot", *map(str, runs), "--out", str(out)],
                   check=True, timeout=120, cwd=tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_cli_rejects_dir_without_metrics(tmp_path):
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])
