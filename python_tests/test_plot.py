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


def config_run(root, name, seed, successes, **config):
    run = make_run(root, name, seed, successes)
    (run / "config.json").write_text(json.dumps({"algo": "furl", "agent": "sac", "task": "reach",
                                                 "goal": "fixed", "seed": seed, "run_dir": str(run),
                                                 "total_steps": 100, "sac": {"tau": 0.01},
                                                 **config}))
    return run


def test_groups_by_the_whole_config_minus_the_seed(tmp_path):
    seeds = [config_run(tmp_path, f"s{i}", i, [(0, 0.0), (100, 1.0)]) for i in range(2)]
    v3 = config_run(tmp_path, "v3", 2, [(0, 0.0)], task="reach-v3")  # the same task
    longer = config_run(tmp_path, "long", 0, [(0, 0.0)], total_steps=500)
    tau = config_run(tmp_path, "tau", 0, [(0, 0.0)], sac={"tau": 0.5})
    groups = plot.group_runs([*seeds, v3, longer, tau])
    assert groups == {"furl sac.tau=0.01 total_steps=100": [*seeds, v3],
                      "furl sac.tau=0.01 total_steps=500": [longer],
                      "furl sac.tau=0.5 total_steps=100": [tau]}


def test_figure_marks_single_points_and_shows_the_whole_success_range(tmp_path):
    one_eval = config_run(tmp_path, "one", 0, [(100, 0.0)])
    other = config_run(tmp_path, "two", 0, [(0, 0.0), (100, 0.0)], algo="sac")
    fig = plot.figure([one_eval, other])
    success, ret = fig.axes
    assert success.get_ylim() == (-0.03, 1.03) and ret.get_ylim() != (-0.03, 1.03)
    lines = {line.get_label(): line for line in success.get_lines()}
    assert sorted(lines) == ["furl (n=1)", "sac (n=1)"]
    single = lines["furl (n=1)"]
    assert list(single.get_xdata()) == [100] and single.get_marker() == "o"
    assert fig._suptitle.get_text() == "reach (fixed goal)"


def test_cli_refuses_unknown_metric(tmp_path, capsys):
    run = make_run(tmp_path, "r", 0, [(0, 0.0)])
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(run), "--metrics", "eval/sucess", "--out", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no run logged eval/sucess" in err and "charts/episode_return, eval/success" in err
    assert not (tmp_path / "c.png").exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m furl_fast.plot")
    assert "--out OUT" in out and "image file to write" in out
    assert "--metrics NAME [NAME ...]" in out and "as named in metrics.csv" in out


def test_code_reward_curves_are_named_by_their_programs(tmp_path):
    # The built-in programs were written by hand, not by a VLM: never labelled as a VLM reward.
    ref = config_run(tmp_path, "ref", 0, [(0, 0.0)], algo="vlm", reward={"name": "code", "programs": None})
    gen = config_run(tmp_path, "gen", 0, [(0, 0.0)], algo="vlm",
                     reward={"name": "code", "programs": "drawer.json"})
    labels = sorted(plot.group_runs([ref, gen]))
    assert labels == ["sac+code", "sac+code-ref"], labels
    assert list(plot.group_runs([ref])) == ["sac+code-ref sac reach fixed"]  # one curve: all said


def test_labels_name_what_matters_and_other_settings_only_to_tell_curves_apart(tmp_path):
    """Runs of different methods differ in many settings; their labels name the method as the
    sweep's table does (algo, reward, env reward) and what else differs between the curves, not every
    setting, so the legend stays inside the figure and matches the table."""
    furl = config_run(tmp_path, "furl", 0, [(0, 0.0)], reward={"name": "auto"}, env_reward="sparse",
                      eval_every=50)
    vlm = config_run(tmp_path, "vlm", 0, [(0, 0.0)], algo="vlm", reward={"name": "cosine"},
                     env_reward="sparse", total_steps=500)
    oracle = config_run(tmp_path, "oracle", 0, [(0, 0.0)], algo="sac", reward={"name": "auto"},
                        env_reward="dense")
    assert sorted(plot.group_runs([furl, vlm, oracle])) == ["furl", "sac+dense", "vlm+cosine"]
    drq = config_run(tmp_path, "drq", 0, [(0, 0.0)], reward={"name": "auto"}, env_reward="sparse",
                     eval_every=50, agent="drq")
    assert sorted(plot.group_runs([furl, drq])) == ["furl drq", "furl sac"]
