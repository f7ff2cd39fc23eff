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
    config: the resolved configuration, written once at the start of a run to TensorBoard as text
    (the JSON) and as hparams (flattened, for the HParams dashboard), as SB3 and CleanRL runs do.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None,
                 tensorboard: bool = True, config: dict[str, Any] | None = None) -> None:
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
            if config is not None and resume_step is None:
                self._log_config(config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from furl_fast.runs import writing

        values = {name: float(value) for name, value in metrics.items()}
        with writing(self.run_dir / METRICS_FILE):
            self._csv.writerows((step, name, repr(value)) for name, value in values.items())
            self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)

    def _log_config(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._tb.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)
        # SummaryWriter.add_hparams would write them to a new run directory of their own; these
        # three summaries in the run's own events file are what it writes there.
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flatten(config).items()}
        for summary in hparams(flat, {"eval/success": 0.0}):
            self._tb.file_writer.add_summary(summary)

    def log_video(self, tag: str, frames: list, step: int, fps: int = 30) -> None:
        """An animated GIF of frames ((H, W, 3) uint8 each) in TensorBoard's Images tab, the encoding
        SummaryWriter.add_video uses, without its moviepy dependency. Callers keep it small (the full
        video is in the run directory)."""
        if self._tb is None:
            return
        import io

        import imageio
        from tensorboard.compat.proto.summary_pb2 import Summary

        buf = io.BytesIO()
        imageio.mimwrite(buf, frames, format="GIF", duration=1000 / fps, loop=0)
        height, width = frames[0].shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3,
                              encoded_image_string=buf.getvalue())
        self._tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self._tb.flush()

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


def task_name(task: str, suite: str = "metaworld") -> str:
    """A task's name in run directories and result tables: its suite's short name ("reach" for
    "reach" and "reach-v3")."""
    from furl_fast.envs import get_suite

    return get_suite(suite).short_name(task)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys ("sac.tau")."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def require_wandb():
    """The wandb module, or ValueError (a flag that cannot work here) saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ValueError('--track needs Weights & Biases: pip install "furl_fast[track]" (or pip '
                           "install wandb).") from None
    return wandb


def start_wandb(run_dir: Path, config: dict[str, Any], *, project: str, entity: str | None):
    """Weights & Biases tracking (CleanRL's --track): a run named after the run directory, holding the
    config, that mirrors every TensorBoard scalar (sync_tensorboard), so it must start before the
    MetricsWriter. Its files go to RUN_DIR/wandb. WANDB_MODE=offline keeps it off the network (sync
    later with `wandb sync`). Returns the wandb run; call .finish() at the end."""
    import hashlib

    wandb = require_wandb()

    # One wandb run per run directory: --resume continues it (a sweep's run dirs are all "seed<k>",
    # so the id comes from the whole path).
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, entity=entity, name=run_dir.name, config=config,
                      dir=str(run_dir), sync_tensorboard=True, resume="allow", id=run_id)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
