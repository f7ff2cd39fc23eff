"""`python -m furl_fast.plot RUN_DIR... --out curves.png`: learning curves from run directories.

Runs that differ only in their seed are one curve: the mean over seeds with a band of one standard
deviation, on the steps all of them reached (values are carried forward between logged steps).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from furl_fast.metrics import mean_std, read_config, read_metrics

DEFAULT_METRICS = ("eval/success", "charts/episode_return")


def curve_label(run_dir: Path) -> str:
    cfg = read_config(run_dir)
    if not cfg:
        return run_dir.name
    return " ".join(str(cfg[k]) for k in ("algo", "agent", "task", "goal") if k in cfg)


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


def plot(run_dirs: list[Path], out: Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = defaultdict(list)
    for run_dir in run_dirs:
        groups[curve_label(run_dir)].append(read_metrics(run_dir))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, runs in sorted(groups.items()):
            steps, means, stds = aggregate(runs, metric)
            if not steps:
                continue
            (line,) = ax.plot(steps, means, label=f"{label} (n={len(runs)})")
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.csv").exists()]
    if missing:
        parser.error(f"no metrics.csv in: {', '.join(missing)}")
    print(plot(args.run_dirs, args.out, tuple(args.metrics)))


if __name__ == "__main__":
    main()
