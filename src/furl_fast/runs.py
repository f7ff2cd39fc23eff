"""Run directories: where a run lives on disk and how it survives interruption.

A run directory holds config.json, metrics.csv, TensorBoard events (tb/), evaluation videos
(videos/), eval.json and checkpoints/ (state.pt, which names its replay file). Every file is written
atomically (a temporary file, then os.replace), so a crash leaves the previous complete version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from furl_fast.config import Config, changed_fields, config_from_dict

logger = logging.getLogger("furl_fast.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"

# What `--resume RUN` may change; every other flag keeps the run's saved value (changing one is
# refused: the networks, buffers and schedules in the checkpoint were built for those values).
RESUMABLE = ("total_steps", "eval_every", "eval_episodes", "eval_video", "log_every",
             "checkpoint_every", "checkpoint_replay", "device", "torch_threads", "profile",
             "overlap_encode")


def saved_config(run_dir: Path) -> Config:
    """The configuration a run directory was started with (its config.json)."""
    if not (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
        raise ValueError(f"--resume {run_dir}: no checkpoint there ({CHECKPOINT_DIR}/{STATE_FILE}); "
                         "give the run directory of an interrupted or finished run.")
    try:
        return config_from_dict(Config, json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"--resume {run_dir}: cannot read its config.json ({exc}).") from exc


def default_run_dir(cfg: Config, task_name: str) -> Path:
    """runs/<algo>-<task>-s<seed>-<time>; task_name: the suite's short name of the task."""
    return Path("runs") / f"{cfg.algo}-{task_name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(cfg: Config, task_name: str) -> tuple[Config, Path, dict[str, Any] | None]:
    """Resolves and checks the run directory. A resume returns the checkpoint's state too (read now,
    so that a damaged file is reported before any start-up work), and its configuration: the saved
    one with the changes of RESUMABLE applied (cfg must be the saved configuration plus changes, as
    the command line makes it)."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = saved_config(run_dir)
        refused = [k for k in changed_fields(cfg, saved) if k not in (*RESUMABLE, "resume", "run_dir")]
        if cfg.run_dir not in (saved.run_dir, str(run_dir)):
            refused.append("run_dir")
        if refused:
            flags = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise ValueError(f"--resume {run_dir}: {flags} cannot change on a resume (the checkpoint "
                             f"was made with the saved values); a resume may change only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)}.")
        state = read_checkpoint(run_dir)
        if cfg.total_steps < state["step"]:
            raise ValueError(f"--resume {run_dir}: --total-steps {cfg.total_steps} is below the "
                             f"checkpoint's step {state['step']}; a resume can only extend a run.")
        return dataclasses.replace(cfg, resume=str(run_dir), run_dir=str(run_dir)), run_dir, state
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, task_name)
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"--run-dir {run_dir}: {path} is a file, not a directory; choose another "
                             "path.")
    if (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():
        raise ValueError(f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another directory.")
    return dataclasses.replace(cfg, run_dir=str(run_dir)), run_dir, None


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's state (state.pt), with its replay file's header checked."""
    from furl_fast.replay import ReplayBuffer

    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    try:  # our own file (it holds RNG states, which need full unpickling)
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["replay"] is not None:
            ReplayBuffer.check_file(run_dir / CHECKPOINT_DIR / state["replay"])
    except Exception as exc:  # noqa: BLE001  (truncated zip, bad pickle, missing key: all damage)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--resume {run_dir}: its checkpoint is damaged or incomplete ({message}); "
                         "nothing was changed.") from exc
    return state


def write_checkpoint(run_dir: Path, state: dict[str, Any], buffer=None, step: int = 0) -> Path:
    """Atomic: the replay buffer (when given) goes to a new file first, then state.pt (which names
    it) replaces the previous one, then older replay files are removed. A crash at any point leaves a
    consistent (state.pt, replay file) pair. state must not hold the key "replay"."""
    ckpt = run_dir / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    replay_name = f"replay-{step:010d}.bin" if buffer is not None else None
    if replay_name is not None:
        buffer.save(ckpt / replay_name)
    tmp = ckpt / (STATE_FILE + ".tmp")
    torch.save({**state, "replay": replay_name}, tmp)
    os.replace(tmp, ckpt / STATE_FILE)
    for old in ckpt.glob("replay-*.bin"):
        if old.name != replay_name:
            old.unlink()
    return ckpt / STATE_FILE


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_video(stem: Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """mp4 through imageio-ffmpeg, or a GIF when no ffmpeg can be found."""
    import imageio

    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = stem.with_suffix(".mp4")
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
    except Exception as exc:  # no ffmpeg backend: a GIF needs none
        logger.warning("mp4 writing failed (%s); writing a GIF instead", exc)
        path = stem.with_suffix(".gif")
        imageio.mimwrite(path, frames, duration=1000 / fps)
    return path
