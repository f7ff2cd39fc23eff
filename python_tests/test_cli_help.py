"""--help of the command lines, as a new user reads it: the usage line, every option in the table,
choices and defaults as they are typed, sentences wrapped only where a line is full."""

from __future__ import annotations

from collections import Counter

import pytest

from furl_fast import evaluate_reward, sweep, train

WIDTH = 100


def help_text(main, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def needless_breaks(text: str) -> list[str]:
    """Description lines of the options tables that end although the next line's first word would
    have fitted: a line break copied from the source instead of wrapping. (Boxes drawn with "│" on a
    terminal, plain text when captured.)"""
    table = text[text.index(" options"):].splitlines()
    rows = [line.strip()[1:-1] if line.strip().startswith("│") else line for line in table]
    indents = Counter(len(r) - len(r.lstrip()) for r in rows if r.strip())
    column = max(indents, key=lambda i: (i > 4, indents[i]))  # that of continuation lines
    width = max(len(r) for r in rows)
    bad = []
    for row, following in zip(rows, rows[1:]):
        desc, next_desc = row[column:].rstrip(), following[column:].strip()
        if not desc or not next_desc or following[:column].strip():  # no text, or a new option
            continue
        if row[:column].strip() and not row[:column].endswith("  "):  # a flag runs into the column
            continue
        if column + len(desc) + 1 + len(next_desc.split()[0]) < width - 2:
            bad.append(f"{desc!r} / {next_desc!r}")
    return bad


def test_train_help(monkeypatch, capsys):
    text = help_text(train.parse_config, monkeypatch, capsys)
    assert text.startswith("usage: python -m furl_fast.train ")
    assert "--preset {laptop,paper}" in text and "(default: laptop)" in text
    flat = " ".join(text.split())
    assert "--reward NAME [--reward.OPTION VALUE ...], NAME one of furl, cosine, goal_baseline, " \
        "binary, code" in flat and "reward:none" not in text and "{None,furl" not in text
    assert "(default: drawer-open)" in text
    assert "spec" not in text and "/work/" not in text
    assert needless_breaks(text) == []


def test_train_help_shows_the_chosen_preset(monkeypatch, capsys):
    text = help_text(lambda argv: train.parse_config(["--preset", "paper", *argv]), monkeypatch,
                     capsys)
    text = " ".join(text.split())
    assert "(default: paper)" in text and "(default: 1000000)" in text


def test_preset_and_flags_parse():
    cfg = train.parse_config(["--preset", "paper", "--total-steps", "7", "--sac.tau", "0.5"])
    assert (cfg.total_steps, cfg.resolved_warmup_steps, cfg.sac.tau, cfg.task) == \
        (7, 10_000, 0.5, "drawer-open")
    assert train.parse_config(["--reward", "binary", "--algo", "vlm"]).reward.name == "binary"
    assert train.parse_config([]).reward.name == "auto"


def test_reward_options_parse_anywhere_on_the_line():
    from furl_fast.config import BinaryRewardConfig, GoalBaselineRewardConfig

    cfg = train.parse_config(["--reward.threshold", "0.3", "--algo", "vlm", "--reward", "binary",
                              "--reward.negatives", "a cup", "a door", "--seed", "4"])
    assert cfg.reward == BinaryRewardConfig(threshold=0.3, negatives=("a cup", "a door"))
    assert (cfg.algo, cfg.seed) == ("vlm", 4)
    for spelling in ("goal_baseline", "goal-baseline"):
        cfg = train.parse_config(["--algo", "relay", f"--reward={spelling}", "--reward.alpha", "1"])
        assert cfg.reward == GoalBaselineRewardConfig(alpha=1.0)
        assert train.parse_config(["--algo", "relay", "--reward", spelling]).reward == \
            GoalBaselineRewardConfig()
    with pytest.raises(ValueError, match="--reward nope is unknown; use one of auto, furl, cosine"):
        train.parse_config(["--reward", "nope"])
    with pytest.raises(ValueError, match="--reward.threshold needs --reward NAME"):
        train.parse_config(["--reward.threshold", "0.3"])


def test_reward_help_lists_its_options(monkeypatch, capsys):
    text = help_text(lambda argv: train.parse_config(["--reward", "binary", *argv]), monkeypatch,
                     capsys)
    assert "--reward.threshold FLOAT" in text and "--reward.no-binary" in text


def test_other_commands_name_themselves(monkeypatch, capsys):
    assert help_text(sweep.main, monkeypatch, capsys).startswith("usage: python -m furl_fast.sweep ")
    monkeypatch.setattr("sys.argv", ["furl-evaluate-reward", "--help"])
    text = help_text(lambda argv: evaluate_reward.main(), monkeypatch, capsys)  # reads sys.argv
    assert text.startswith("usage: python -m furl_fast.evaluate_reward ")
    assert needless_breaks(text) == []
