"""Run-directory metrics: one long-format CSV (step, name, value) plus TensorBoard events.

Long format because metrics arrive at different steps (losses every log step, evaluation every
100k steps); readers pivot what they need. Names follow charts/*, losses/*, perf/*, eval/*.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.json"


class MetricsWriter:
    """Appends metrics to RUN_DIR/metrics.csv (flushed per call) and to TensorBoard in RUN_DIR/tb.

    On resume the CSV is truncated to the resumed step first, so a killed run's steps after its last
    checkpoint (which will be re-run) are not logged twice.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if resume_step is not None and path.exists():
            rows = [r for r in read_rows(path) if int(r[0]) <= resume_step]
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([("step", "name", "value"), *rows])
            tmp.replace(path)
        new = not path.exists()
        self._file = open(path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(("step", "name", "value"))
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            value = float(value)
            self._csv.writerow((step, name, repr(value)))
            if self._tb is not None:
                self._tb.add_scalar(name, value, step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_rows(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [tuple(r) for r in reader if len(r) == 3]


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} sorted by step; a later row for the same step wins."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for step, name, value in read_rows(Path(run_dir) / METRICS_FILE):
        series[name][int(step)] = float(value)
    return {name: sorted(points.items()) for name, points in series.items()}


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
