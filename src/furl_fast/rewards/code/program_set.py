"""A task's ordered sub-tasks with one checker program each, and the in-order progress rule."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ProgramSet", "progress_from_done"]


@dataclass(frozen=True)
class ProgramSet:
    """Ordered sub-tasks of one task; programs[k] is the source of sub-task k's checker, which
    defines `done(frame: (H, W, 3) uint8, state: (D,) float) -> bool`."""

    task: str
    subtasks: tuple[str, ...]
    programs: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "subtasks", tuple(self.subtasks))
        object.__setattr__(self, "programs", tuple(self.programs))
        if not self.programs:
            raise ValueError("a program set needs at least one sub-task")
        if len(self.subtasks) != len(self.programs):
            raise ValueError(
                f"{len(self.subtasks)} sub-task descriptions but {len(self.programs)} programs"
            )
        for i, (d, p) in enumerate(zip(self.subtasks, self.programs)):
            if not isinstance(d, str) or not isinstance(p, str):
                raise TypeError(f"sub-task {i}: description and program must be str")

    def __len__(self) -> int:
        return len(self.programs)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "subtasks": [
                {"description": d, "program": p} for d, p in zip(self.subtasks, self.programs)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict, task: str | None = None) -> ProgramSet:
        """Inverse of to_dict; also the format the generation client asks the VLM for."""
        if not isinstance(data, dict) or not isinstance(data.get("subtasks"), list):
            raise TypeError('expected an object with a "subtasks" list')
        subtasks, programs = [], []
        for i, item in enumerate(data["subtasks"]):
            if not isinstance(item, dict) or not isinstance(item.get("program"), str):
                raise TypeError(f'sub-task {i} must be an object with a "program" string')
            subtasks.append(str(item.get("description", f"sub-task {i}")))
            programs.append(item["program"])
        return cls(str(task if task is not None else data.get("task", "")), subtasks, programs)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON atomically (temp file in the same folder + os.replace)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProgramSet:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def progress_from_done(done: np.ndarray) -> np.ndarray:
    """Sub-tasks completed so far, in order, after each step of one episode.

    done: (T, K) bool, done[t, k] = sub-task k's program returned True on step t.
    Returns (T,) int64: sub-task k counts as completed at the first step t >= (completion step of
    sub-task k - 1) with done[t, k]; several sub-tasks may complete on the same step. Completed
    sub-tasks stay completed. Same rule as CodeReward's online update.
    """
    done = np.asarray(done, dtype=bool)
    if done.ndim != 2:
        raise ValueError(f"done must be (T, K) bool, got shape {done.shape}")
    steps, k_total = done.shape
    progress = np.zeros(steps, dtype=np.int64)
    start = 0
    for k in range(k_total):
        hits = np.flatnonzero(done[start:, k])
        if hits.size == 0:
            break
        start += int(hits[0])
        progress[start:] += 1
    return progress


def load_program_set(task: str, path: str | None, reference: ProgramSet | None) -> ProgramSet:
    """A training run's programs: the set in the JSON file `path` (ProgramSet.save's format), or for
    path None the task's reference set (its suite's, or None when it has none). Raises ValueError
    naming the flag to change."""
    if path is None:
        if reference is None:
            raise ValueError(f"--reward code: {task} has no reference program set; pass "
                             "--reward.programs FILE with a verified set "
                             "(furl_fast.rewards.code.generate_program_set).")
        return reference
    try:
        return ProgramSet.load(path)
    except (OSError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"--reward.programs {path}: cannot read a program set there ({exc}).") from exc
