"""`python -m furl_fast.plot RUN_DIR... --out curves.png`: learning curves from run directories.

Runs whose resolved configurations (config.json) differ only in their seed are one curve: the mean
over seeds with a band of one standard deviation, on the steps all of them reached (values are
carried forward between logged steps). Runs that differ in anything else (say --total-steps) are
separate curves, labelled by what differs. "reach" and "reach-v3" name the same task.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from furl_fast.metrics import flatten, mean_std, read_config, read_metrics, task_name

DEFAULT_METRICS = ("eval/success", "charts/episode_return")
# What a label names besides the method when it differs between curves (or there is one curve).
LABEL_KEYS = ("agent", "task", "goal")
# Settings that name or place a run rather than change what it computes.
PER_RUN_KEYS = ("seed", "run_dir", "resume")


def flat_config(run_dir: Path) -> dict[str, Any]:
    """config.json flattened to dotted keys ("sac.tau"), task names without "-v3", lists as tuples."""
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(read_config(run_dir)).items()}
    if isinstance(flat.get("task"), str):
        flat["task"] = task_name(flat["task"], flat.get("suite", "metaworld"))
    return flat


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """{curve label: run dirs}: one group per configuration minus the seed. A label is the method as
    the sweep's table names it (sac+dense, furl, sac+code-ref, ...), then the agent, task and goal
    where they differ between groups, then the other settings that tell apart groups left with the
    same label."""
    from furl_fast.sweep import method

    configs = {d: flat_config(d) for d in run_dirs}
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for d, cfg in configs.items():
        key = tuple(sorted((k, v) for k, v in cfg.items() if k not in PER_RUN_KEYS)) if cfg else \
            (("run", str(d)),)  # no config.json: a curve of its own
        groups[key].append(d)
    keys = list(groups)
    shown = [k for k in LABEL_KEYS if len(keys) == 1 or len({dict(key).get(k) for key in keys}) > 1]
    labels = {}
    for key in keys:
        cfg = dict(key)
        if "run" in cfg:
            labels[key] = Path(cfg["run"]).name
            continue
        name = method({"algo": cfg.get("algo", "?"), "env_reward": cfg.get("env_reward", "sparse"),
                       "reward": {"name": cfg.get("reward.name"),
                                  "programs": cfg.get("reward.programs")}})
        labels[key] = " ".join([name, *(str(cfg[k]) for k in shown if k in cfg)])
    for label in {label for label in labels.values() if list(labels.values()).count(label) > 1}:
        same = [key for key in keys if labels[key] == label]
        differ = [k for k in sorted({k for key in same for k, _ in key})
                  if len({dict(key).get(k) for key in same}) > 1]
        for key in same:
            labels[key] += "".join(f" {k}={dict(key)[k]}" for k in differ if k in dict(key))
    return {labels[key]: groups[key] for key in keys}


def value_at(points: list[tuple[int, float]], step: int) -> float:
    """The last value logged at or before step (points sorted by step, the first at or before it)."""
    value = points[0][1]
    for s, v in points:
        if s > step:
            break
        value = v
    return value


def aggregate(runs: list[dict[str, list[tuple[int, float]]]], metric: str):
    """(steps, means, stds) across runs, on the union of their steps up to the shortest run."""
    series = [r[metric] for r in runs if r.get(metric)]
    if not series:
        return [], [], []
    last = min(s[-1][0] for s in series)
    steps = sorted({step for s in series for step, _ in s if step <= last and step >= s[0][0]})
    means, stds = [], []
    for step in steps:
        m, sd = mean_std([value_at(s, step) for s in series])
        means.append(m)
        stds.append(sd)
    return steps, means, stds


def title(run_dirs: list[Path]) -> str:
    """What the curves share: the task(s) and goal setting(s)."""
    configs = [flat_config(d) for d in run_dirs]
    tasks = sorted({str(c["task"]) for c in configs if "task" in c})
    goals = sorted({str(c["goal"]) for c in configs if "goal" in c})
    parts = [", ".join(tasks)] if tasks else []
    if goals:
        parts.append(f"({' / '.join(goals)} goal)")
    return " ".join(parts) or "learning curves"


def figure(run_dirs: list[Path], metrics: tuple[str, ...] = DEFAULT_METRICS):
    """The matplotlib figure: one panel per metric, one curve per group of runs (group_runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {d: read_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, dirs in sorted(group_runs(run_dirs).items()):
            steps, means, stds = aggregate([data[d] for d in dirs], metric)
            if not steps:
                continue
            # Markers: a run with a single evaluation is a point, which a bare line would not show.
            (line,) = ax.plot(steps, means, marker="o", markersize=3, label=f"{label} (n={len(dirs)})")
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
        if "success" in metric:  # a rate: the whole range, so 0.0 does not look like a swing
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title(run_dirs))
    fig.tight_layout()
    return fig


def plot(run_dirs: list[Path], out: Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    """Draws figure(run_dirs, metrics) into out (any format matplotlib knows by its suffix)."""
    import matplotlib.pyplot as plt

    fig = figure(run_dirs, metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # the legends and titles inside the image
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m furl_fast.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (each holding metrics.csv and config.json)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"),
                        help="image file to write; the format follows its suffix (default: curves.png)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="NAME",
                        help="metrics to plot, one panel each, as named in metrics.csv "
                             f"(default: {' '.join(DEFAULT_METRICS)})")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.csv").is_file()]
    if missing:
        parser.error(f"no metrics.csv in: {', '.join(missing)}")
    known = sorted({name for d in args.run_dirs for name in read_metrics(d)})
    unknown = [m for m in args.metrics if m not in known]
    if unknown:
        parser.error(f"no run logged {', '.join(unknown)}; these runs logged: {', '.join(known)}")
    print(plot(args.run_dirs, args.out, tuple(args.metrics)))


if __name__ == "__main__":
    main()
