"""Goal-detection metrics against known answers, and `python -m furl_fast.evaluate_reward` end to end
on a tiny random-weight encoder (its numbers mean nothing; only the plumbing is checked)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from furl_fast.rewards.metrics import best_f1_threshold, pearson, precision_recall_f1, roc_auc

LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)


def test_precision_recall_f1_counts():
    preds = np.array([1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)  # tp 3, fp 2, fn 1
    p, r, f = precision_recall_f1(LABELS, preds)
    assert (p, r) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert f == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert precision_recall_f1(LABELS, np.zeros(8, bool)) == (0.0, 0.0, 0.0)  # nothing predicted
    assert precision_recall_f1(LABELS, LABELS) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        precision_recall_f1(LABELS, preds[:3])


def test_perfect_and_inverted_scores():
    scores = np.where(LABELS, 0.9, 0.1) + np.arange(8) * 1e-3
    assert roc_auc(LABELS, scores) == 1.0
    assert roc_auc(LABELS, -scores) == 0.0
    assert pearson(LABELS, LABELS.astype(float) * 7 - 2) == pytest.approx(1.0)
    assert pearson(LABELS, -LABELS.astype(float)) == pytest.approx(-1.0)
    t, p, r, f = best_f1_threshold(LABELS, scores)
    assert (p, r, f) == (1.0, 1.0, 1.0) and t == pytest.approx(scores[LABELS].min())


def test_ties_count_half():
    # Every score equal: AUC 1/2 exactly; correlation undefined.
    assert roc_auc(LABELS, np.zeros(8)) == 0.5
    assert np.isnan(pearson(LABELS, np.zeros(8)))
    # Positives {2, 2, 3} against negatives {1, 2}: 6 pairs, 4 won (2>1, 2>1, 3>1, 3>2) and 2 tied
    # (2 vs 2, twice): AUC = (4 + 2 * 0.5) / 6 = 5/6.
    y = np.array([1, 1, 1, 0, 0], bool)
    s = np.array([2.0, 2.0, 3.0, 1.0, 2.0])
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs)) == pytest.approx(5 / 6)
    # best-F1 with ties: predicting >= 2 takes the tied negative too (p 3/4, r 1), beats >= 3.
    t, p, r, f = best_f1_threshold(y, s)
    assert t == 2.0 and (p, r) == (pytest.approx(3 / 4), 1.0)
    assert f == pytest.approx(2 * 0.75 / 1.75)


def test_random_scores_match_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = rng.integers(0, 20, 500).astype(float)  # many ties
    wins = (s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean()
    assert roc_auc(y, s) == pytest.approx(wins)
    assert abs(roc_auc(y, s) - 0.5) < 0.1  # independent scores: near chance
    assert pearson(y, s) == pytest.approx(np.corrcoef(y.astype(float), s)[0, 1])
    # best_f1_threshold equals a brute-force search over all distinct thresholds.
    f1s = {t: precision_recall_f1(y, s >= t)[2] for t in np.unique(s)}
    t, _, _, f = best_f1_threshold(y, s)
    assert f == pytest.approx(max(f1s.values())) and f1s[t] == pytest.approx(f)


def test_one_class_is_nan():
    assert np.isnan(roc_auc(np.zeros(4, bool), np.arange(4.0)))
    assert np.isnan(pearson(np.ones(4, bool), np.arange(4.0)))
    assert best_f1_threshold(np.zeros(4, bool), np.arange(4.0))[3] == 0.0
    with pytest.raises(ValueError, match="finite"):
        roc_auc(LABELS, np.full(8, np.nan))


def run_eval(tmp_path, tiny_model, *extra):
    args = [sys.executable, "-m", "furl_fast.evaluate_reward", "--tasks", "reach",
            "--vlm.model", tiny_model, "--vlm.pretrained", "none", "--rewards", "cosine", "goal_baseline",
            "binary", "--episodes", "1", "--max-steps", "60", "--device", "cpu",
            "--out", str(tmp_path / "out"), *extra]
    env = dict(os.environ, FURL_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_cli_end_to_end_and_cache(tmp_path, tiny_model):
    result = run_eval(tmp_path, tiny_model)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["reward"] for r in rows] == ["cosine", "goal_baseline", "binary"]
    for r in rows:
        # 61 expert + 61 random frames; the expert reaches the goal within 60 steps.
        assert r["task"] == "reach" and int(r["frames"]) == 122 and 0 < int(r["positives"]) < 61
        assert 0.0 <= float(r["roc_auc"]) <= 1.0 and -1.0 <= float(r["pearson"]) <= 1.0
        assert 0.0 <= float(r["f1"]) <= 1.0
    assert [r["threshold_kind"] for r in rows] == ["best-F1", "best-F1", "reward"]
    assert float(rows[2]["threshold"]) == 0.5
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "roc_auc" in result.stdout
    # A local-dir: checkpoint counts as real weights (the loader cannot tell), so it is cached.
    assert len(list((out / "embeddings").glob("*.pt"))) == 1
    frames_file, = (out / "frames").glob("*.npz")
    with np.load(frames_file) as data:
        assert data["frames"].shape[0] == 122 and data["frames"].dtype == np.uint8
        assert data["success"].sum() == int(rows[0]["positives"])

    # Second run: frames come from the cache (a changed file would be used as is), not re-rendered.
    with np.load(frames_file) as data:
        cached = dict(data)
    cached["success"] = np.zeros_like(cached["success"])
    np.savez_compressed(frames_file, **cached)
    again = run_eval(tmp_path, tiny_model, "--rewards", "binary")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "collecting frames" not in again.stdout
    assert len(list((out / "embeddings").glob("*.pt"))) == 1  # same frames key, same embeddings
    row, = csv.DictReader((out / "metrics.csv").open())
    assert int(row["positives"]) == 0 and row["roc_auc"] == "nan"


def test_cli_rejects_unscorable_reward(tmp_path, tiny_model):
    result = run_eval(tmp_path, tiny_model, "--rewards", "code")
    assert result.returncode != 0 and "cannot evaluate" in result.stderr


def eval_row(reward, f1, auc, weights="openai", model="RN50", task="reach"):
    return {"task": task, "model": model, "weights": weights, "reward": reward, "frames": 10,
            "positives": 3, "threshold": 0.5, "threshold_kind": "reward", "precision": f1,
            "recall": f1, "f1": f1, "roc_auc": auc, "pearson": 0.0}


def test_figure_labels_every_bar_and_says_when_weights_are_random():
    from furl_fast import evaluate_reward

    real = evaluate_reward.figure([eval_row("binary", 0.0, 0.7), eval_row("cosine", 0.5, np.nan)])
    f1_ax, auc_ax = real.axes[:2]
    assert [t.get_text() for t in f1_ax.texts] == ["0.00", "0.50"]  # an F1 of 0 is still shown
    assert [t.get_text() for t in auc_ax.texts] == ["0.70", "n/a"]
    assert real._suptitle is None

    baseline = evaluate_reward.figure([eval_row("binary", 0.2, 0.6, weights="RANDOM")])
    assert "RANDOM-WEIGHT" in baseline._suptitle.get_text()
    assert "(random weights)" in baseline.legends[0].texts[0].get_text()


def test_output_files_follow_the_umask(tmp_path):
    from furl_fast import evaluate_reward

    old = os.umask(0o022)
    try:
        evaluate_reward.write_csv([eval_row("binary", 0.5, 0.5)], tmp_path / "metrics.csv")
        os.umask(0o027)
        evaluate_reward.plot([eval_row("binary", 0.5, 0.5)], tmp_path / "metrics.png")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "metrics.png").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.png"]  # no temp files


def test_models_replace_the_vlm_flag_and_take_their_weights():
    """--vlm.* picks one VLM as train does; --models compares several, with one --pretrained for all
    or one per model. Mistakes stop before anything is loaded."""
    from furl_fast.config import VLMConfig
    from furl_fast.evaluate_reward import EvalConfig, evaluate

    with pytest.raises(ValueError, match="--models replaces --vlm.model; give one of them"):
        evaluate(EvalConfig(models=("RN50", "ViT-B-32"), vlm=VLMConfig(model="liv")))
    with pytest.raises(ValueError, match="give one --pretrained for all models or one per model"):
        evaluate(EvalConfig(models=("RN50", "ViT-B-32", "RN101"), pretrained=("openai", "none")))
