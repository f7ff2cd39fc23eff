"""A task's ordered sub-tasks with one checker program each, and the in-order progress rule."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["INPUTS", "MAX_FILE_BYTES", "ProgramSet", "progress_from_done", "read_json_file"]

INPUTS = ("frame", "state")
"""What a set's programs read: "frame", `done(frame)` (the camera image alone, as in VLM-CaR), or
"state", `done(frame, state)` (the image and the simulator's state vector, which holds privileged
information such as exact object positions and hidden goals that a real robot may not have)."""

MAX_FILE_BYTES = 2**20
"""Largest program-set file read (1 MiB); a set of a few small programs is a few kB."""

_MAX_JSON_DEPTH = 8  # a program set nests 3 deep ({"subtasks": [{...}]}); more is not a program set

# Frame-only programs define done(frame); the sandbox calls done(frame, state). This adapter, appended
# to each program, calls the program's own done with the frame alone, so the state never reaches it.
_FRAME_ONLY_ADAPTER = """

# Added by furl_fast: this set's programs read the frame only.
frame_only_done = done


def done(frame, state):
    return frame_only_done(frame)
"""


MAX_SUBTASKS = 10
"""Most sub-tasks a set may have: each runs in a worker process of its own (~30 MB)."""


@dataclass(frozen=True)
class ProgramSet:
    """Ordered sub-tasks of one task; programs[k] is the source of sub-task k's checker. inputs
    "frame": each defines `done(frame: (H, W, 3) uint8) -> bool`; inputs "state": each defines
    `done(frame: (H, W, 3) uint8, state: (D,) float) -> bool` (see INPUTS)."""

    task: str
    subtasks: tuple[str, ...]
    programs: tuple[str, ...]
    inputs: str = "state"

    def __post_init__(self) -> None:
        object.__setattr__(self, "subtasks", tuple(self.subtasks))
        object.__setattr__(self, "programs", tuple(self.programs))
        if self.inputs not in INPUTS:
            raise ValueError(f'"inputs" must be one of {", ".join(INPUTS)}, got {self.inputs!r}')
        if not self.programs:
            raise ValueError("a program set needs at least one sub-task")
        if len(self.programs) > MAX_SUBTASKS:
            raise ValueError(
                f"a program set may have at most {MAX_SUBTASKS} sub-tasks (each runs in a worker "
                f"process of its own), this one has {len(self.programs)}"
            )
        if len(self.subtasks) != len(self.programs):
            raise ValueError(
                f"{len(self.subtasks)} sub-task descriptions but {len(self.programs)} programs"
            )
        for i, (d, p) in enumerate(zip(self.subtasks, self.programs)):
            if not isinstance(d, str) or not isinstance(p, str):
                raise TypeError(f"sub-task {i}: description and program must be str")

    def __len__(self) -> int:
        return len(self.programs)

    @property
    def worker_programs(self) -> tuple[str, ...]:
        """The sources as the sandbox runs them, `done(frame, state)`: frame-only programs with an
        adapter appended that passes them the frame alone."""
        if self.inputs == "frame":
            return tuple(p + _FRAME_ONLY_ADAPTER for p in self.programs)
        return self.programs

    def content_hash(self) -> str:
        """sha256 of the set's canonical JSON (task, inputs, sub-tasks, programs)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "inputs": self.inputs,
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
        inputs = data.get("inputs", "state")
        if not isinstance(inputs, str) or inputs not in INPUTS:
            raise ValueError(f'"inputs" must be one of {", ".join(INPUTS)}, got {inputs!r}')
        return cls(str(task if task is not None else data.get("task", "")), subtasks, programs,
                   inputs)

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
        """Read a set written by save(); ValueError (or OSError) saying why it cannot be read."""
        return cls.from_dict(read_json_file(path))


def read_json_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> object:
    """A small JSON file: size checked before it is read, nesting checked before it is parsed (so no
    input reaches the parser's recursion limit). ValueError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, more than the {max_bytes} a program set may have")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if json_depth(text) > _MAX_JSON_DEPTH:
        raise ValueError(f"{path} nests deeper than {_MAX_JSON_DEPTH} levels; it is not a program set")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def json_depth(text: str) -> int:
    """Deepest nesting of [ and { in JSON text, outside strings (a cheap scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


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
    path None the task's hand-written reference set (its suite's, or None when it has none). Raises
    ValueError naming the flag to change."""
    if path is None:
        if reference is None:
            raise ValueError(f"--reward code: {task} has no hand-written reference program set; pass "
                             "--reward.programs FILE with a set generated by a VLM (python -m "
                             "furl_fast.generate_programs --task TASK --out FILE).")
        return reference
    try:
        return ProgramSet.load(path)
    except (OSError, TypeError, ValueError) as exc:
        raise ValueError(f"--reward.programs {path}: cannot read a program set there ({exc}).") from None
