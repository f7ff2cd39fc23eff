"""Run directories: where a run lives on disk and how it survives interruption.

A run directory holds config.json, metrics.csv, TensorBoard events (tb/), evaluation videos
(videos/), eval.json and checkpoints/ (state.pt, which names its replay file). Every file is written
atomically (a temporary file, then os.replace), so a crash leaves the previous complete version; the
next start removes the temporary files. A run holds RUN_DIR/.lock while it writes the directory
(lock_run_dir), so no second process writes it at the same time.

Nothing read back from a run directory can run code: config.json is checked field by field, and
state.pt is checksummed and holds only tensors and plain values (see save_state).

    python -m furl_fast.runs convert RUN_DIR   # an earlier version's checkpoint (convert_checkpoint)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import stat
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from furl_fast.config import Config, changed_fields, config_from_dict

logger = logging.getLogger("furl_fast.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
LOCK_FILE = ".lock"
# What a run writes: directories, then files. A path of the wrong kind is refused before start-up.
OUTPUT_DIRS = (CHECKPOINT_DIR, "tb", "videos")
OUTPUT_FILES = ("config.json", "metrics.csv", "eval.json")
# Temporary files of an atomic write (runs.save_state, atomic_write_text, the replay file's save);
# a killed run leaves them behind, the next start removes them.
TEMPORARY_FILES = (f"{CHECKPOINT_DIR}/{STATE_FILE}.tmp", f"{CHECKPOINT_DIR}/.replay-*.bin.tmp*",
                   "config.json.tmp", "eval.json.tmp", "metrics.tmp")

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
        return config_from_dict(Config, _read_config_json(run_dir / "config.json"))
    except ValueError as exc:
        raise ValueError(f"--resume {run_dir}: config.json: {exc}") from exc


MAX_CONFIG_BYTES = 1 << 20
"""A run's config.json takes a few kilobytes; a larger file is refused unread."""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows.")


def _read_config_json(path: Path) -> Any:
    """config.json's JSON value; ValueError with one line for a missing, oversized, undecodable or
    too deeply nested file."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file.")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than the {MAX_CONFIG_BYTES} a "
                             "configuration can take.")
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc}).") from exc
    except RecursionError as exc:
        raise ValueError("nested too deeply to be a configuration.") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}).") from exc


def default_run_dir(cfg: Config, task_name: str) -> Path:
    """runs/<algo>-<task>-s<seed>-<time>; task_name: the suite's short name of the task."""
    return Path("runs") / f"{cfg.algo}-{task_name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(cfg: Config, task_name: str) -> tuple[Config, Path, dict[str, Any] | None, RunLock]:
    """Resolves, checks and locks the run directory (lock_run_dir: the caller releases the lock). A
    resume returns the checkpoint's state too (read now, so that a damaged file is reported before
    any start-up work), and its configuration: the saved one with the changes of RESUMABLE applied
    (cfg must be the saved configuration plus changes, as the command line makes it)."""
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
        lock = lock_run_dir(run_dir, "--resume")
        try:
            state = read_checkpoint(run_dir)
            if cfg.total_steps < state["step"]:
                raise ValueError(f"--resume {run_dir}: --total-steps {cfg.total_steps} is below the "
                                 f"checkpoint's step {state['step']}; a resume can only extend a run.")
        except ValueError:
            lock.release(discard=True)
            raise
        return dataclasses.replace(cfg, resume=str(run_dir), run_dir=str(run_dir)), run_dir, state, lock
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, task_name)
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"--run-dir {run_dir}: {path} is a file, not a directory; choose another "
                             "path.")
    lock = lock_run_dir(run_dir)
    if (run_dir / CHECKPOINT_DIR / STATE_FILE).exists():
        lock.release(discard=True)
        raise ValueError(f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another directory.")
    return dataclasses.replace(cfg, run_dir=str(run_dir)), run_dir, None, lock


@dataclasses.dataclass
class RunLock:
    """A run directory held by this process: an exclusive flock on RUN_DIR/.lock. The kernel drops
    it when the process ends, however it ends, so a killed run never leaves a stale lock behind."""

    run_dir: Path
    fd: int
    made: list[Path]  # what lock_run_dir created: the directories (deepest first), the lock file

    def release(self, discard: bool = False) -> None:
        """Unlocks; discard (a run that did not start) also removes what lock_run_dir created."""
        if discard:
            for path in self.made:
                with contextlib.suppress(OSError):  # a directory that is not empty stays
                    path.rmdir() if path.is_dir() else path.unlink()
        os.close(self.fd)


def lock_run_dir(run_dir: Path, flag: str = "--run-dir") -> RunLock:
    """Creates run_dir if needed and locks it for this process; ValueError (one line naming flag)
    when another process holds it or it cannot be written. Then checks that every output path is of
    the kind the run writes and writable, and removes the temporary files a killed run left."""
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    lock = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not lock.exists():
            made.insert(0, lock)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"{flag} {run_dir} is in use: another furl_fast.train is writing it "
                                 f"(it holds {lock}); wait for it to end or stop it, then resume the "
                                 "run.") from None
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            os.close(fd)  # the holder removed the file as it gave up: lock the new one
    except OSError as exc:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        raise ValueError(f"{flag} {run_dir}: cannot write there ({exc.strerror or exc}); choose "
                         "another directory.") from None
    held = RunLock(run_dir, fd, made)
    try:
        check_outputs(run_dir, flag)
        remove_temporaries(run_dir)
    except (OSError, ValueError) as exc:
        held.release(discard=True)
        raise ValueError(str(exc) if isinstance(exc, ValueError) else
                         f"{flag} {run_dir}: {exc.filename}: {exc.strerror}.") from None
    return held


def check_outputs(run_dir: Path, flag: str = "--run-dir") -> None:
    """ValueError naming the first output path that is of the wrong kind or not writable."""
    for name in (*OUTPUT_DIRS, *OUTPUT_FILES):
        path = run_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        kind = "directory" if name in OUTPUT_DIRS else "file"
        if path.is_dir() != (kind == "directory"):
            raise ValueError(f"{flag} {run_dir}: {path} must be a {kind} (the run writes its "
                             f"{'files in it' if kind == 'directory' else 'data to it'}); move it "
                             "away or choose another directory.")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {run_dir}: {path} is not writable; fix its permissions or "
                             "choose another directory.")


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Removes the temporary files (TEMPORARY_FILES) a killed run left in run_dir; returns them. Only
    for a directory this process holds (lock_run_dir): a running run's are in use."""
    removed = [p for pattern in TEMPORARY_FILES for p in run_dir.glob(pattern) if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def writing(path: Path):
    """An OSError raised while writing path names path (a failed write() names no file)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's state (state.pt, see load_state), with its replay file's header checked."""
    from furl_fast.replay import ReplayBuffer

    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    try:
        state = load_state(path)
        if state["replay"] is not None:
            ReplayBuffer.check_file(run_dir / CHECKPOINT_DIR / state["replay"])
    except (OSError, ValueError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"--resume {run_dir}: {message.rstrip('.')}; nothing was changed.") from exc
    return state


def write_checkpoint(run_dir: Path, state: dict[str, Any], buffer=None, step: int = 0) -> Path:
    """Atomic: the replay buffer (when given) goes to a new file first, then state.pt (which names
    it) replaces the previous one, then older replay files are removed. A crash at any point leaves a
    consistent (state.pt, replay file) pair. state must not hold the key "replay"."""
    ckpt = run_dir / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    replay_name = f"replay-{step:010d}.bin" if buffer is not None else None
    if replay_name is not None:
        with writing(ckpt / replay_name):
            buffer.save(ckpt / replay_name)
    save_state(ckpt / STATE_FILE, {**state, "replay": replay_name})
    for old in ckpt.glob("replay-*.bin"):
        if old.name != replay_name:
            old.unlink()
    return ckpt / STATE_FILE


# state.pt: a header, then torch.save's bytes (the payload). The header is the magic, the format
# version (uint32), the payload's size (uint64, little-endian) and its SHA-256, so that a file cut
# short or with a single flipped bit is refused before torch.load reads it. torch.load runs with
# weights_only=True: the payload may hold only tensors and plain values, never an object to
# construct, so a file crafted to run code is refused unread.
STATE_MAGIC = b"furl_fast state\n"
STATE_VERSION = 1
_STATE_HEADER = struct.Struct("<16sIQ32s")
_NDARRAY = "__numpy.ndarray__"  # {_NDARRAY: tensor} in the payload stands for a numpy array
_REPLAY_NAME = re.compile(r"replay-[0-9]+\.bin")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Writes state atomically in state.pt's format. state: tensors, numpy arrays (numeric or bool),
    numbers, strings, None, and lists, tuples and dicts of them (as load_state gives them back)."""
    import torch

    buf = io.BytesIO()
    torch.save(_to_payload(state), buf)
    payload = buf.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(tmp), open(tmp, "wb") as f:
            f.write(_STATE_HEADER.pack(STATE_MAGIC, STATE_VERSION, len(payload),
                                       hashlib.sha256(payload).digest()))
            f.write(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path) -> dict[str, Any]:
    """save_state's state back, on the CPU. ValueError (one line naming path) for a file that is not
    a complete, unaltered furl_fast checkpoint of this format; nothing in it is run."""
    import torch

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":  # a plain torch.save archive: what earlier versions wrote
        raise ValueError(
            f"{path} is a checkpoint of an earlier furl_fast version (no checksum, pickled numpy "
            f"objects); convert it with `python -m furl_fast.runs convert "
            f"{path.parent.parent}` (it runs nothing from the file), then resume again.")
    if len(data) < _STATE_HEADER.size:
        raise ValueError(f"{path} is damaged or incomplete ({len(data)} bytes, less than a "
                         "checkpoint's header).")
    magic, version, size, digest = _STATE_HEADER.unpack_from(data)
    if magic != STATE_MAGIC:
        raise ValueError(f"{path} is not a furl_fast checkpoint (it does not start with one's "
                         "header).")
    if version != STATE_VERSION:
        raise ValueError(f"{path} has the unknown checkpoint format version {version} (this "
                         f"furl_fast reads version {STATE_VERSION}).")
    payload = memoryview(data)[_STATE_HEADER.size:]
    if len(payload) != size:
        raise ValueError(f"{path} is damaged or incomplete (its header gives {size} bytes of state, "
                         f"the file holds {len(payload)}).")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{path} is damaged (its contents do not match their SHA-256 checksum).")
    try:
        state = _from_payload(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001  (the unpickler refusing an object, or a broken archive)
        raise ValueError(f"{path} holds more than tensors and plain values, which no furl_fast "
                         f"checkpoint does ({type(exc).__name__}); refused unread.") from exc
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
            and "replay" in state
            and (state["replay"] is None or (isinstance(state["replay"], str)
                                             and _REPLAY_NAME.fullmatch(state["replay"])))):
        raise ValueError(f"{path} is not a furl_fast checkpoint (no step, or no replay file name).")
    return state


def _to_payload(x: Any) -> Any:
    import torch

    if type(x) in (dict, OrderedDict):
        return _same_dict(x, {k: _to_payload(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        items = [_to_payload(v) for v in x]
        return tuple(items) if isinstance(x, tuple) else items
    if isinstance(x, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(x))}
    if x is None or isinstance(x, (torch.Tensor, int, float, str)):
        return x
    raise TypeError(f"save_state: a checkpoint holds tensors, numpy arrays, numbers, strings, None "
                    f"and lists, tuples and dicts of them; got a {type(x).__module__}."
                    f"{type(x).__qualname__}.")


def _same_dict(like: dict, items: dict) -> dict:
    """items as a dict of like's type; a module's state_dict (an OrderedDict) keeps its _metadata."""
    if type(like) is dict:
        return items
    out = OrderedDict(items)
    out.__dict__.update(like.__dict__)
    return out


def _from_payload(x: Any) -> Any:
    if isinstance(x, dict):
        if list(x) == [_NDARRAY]:
            return x[_NDARRAY].numpy()
        return _same_dict(x, {k: _from_payload(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        items = [_from_payload(v) for v in x]
        return tuple(items) if isinstance(x, tuple) else items
    return x


def convert_checkpoint(run_dir: Path) -> int:
    """Rewrites RUN_DIR's checkpoint of an earlier furl_fast version (a plain torch.save file, whose
    RNG states hold pickled numpy arrays) in save_state's format; returns its step. Reading it still
    runs no code: torch.load's weights_only unpickler, allowed numpy's array constructor and its
    numeric dtypes. The old file has no checksum: damage in it is carried over unnoticed."""
    import torch

    path = run_dir / CHECKPOINT_DIR / STATE_FILE
    with open(path, "rb") as f:
        if f.read(len(STATE_MAGIC)) == STATE_MAGIC:
            raise ValueError(f"{path} is in the current format already; resume the run as it is.")
    dtypes = {type(np.dtype(c)) for c in np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"}
    # numpy's array constructor; pickled by numpy 2 as numpy._core.multiarray's, by numpy 1 as
    # numpy.core.multiarray's.
    reconstruct = np.empty(0).__reduce__()[0]
    numpy_arrays = [np.ndarray, np.dtype, bytes, reconstruct,
                    (reconstruct, "numpy.core.multiarray._reconstruct"), *dtypes]
    try:
        with torch.serialization.safe_globals(numpy_arrays):
            state = torch.load(path, map_location="cpu", weights_only=True)
        step = state["step"]
    except Exception as exc:  # noqa: BLE001  (not a torch file, a checkpoint, or one without objects)
        raise ValueError(f"{path} cannot be read as a checkpoint of an earlier furl_fast version: it "
                         "is damaged or holds objects no checkpoint holds; nothing was changed.") from exc
    save_state(path, state)
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m furl_fast.runs",
        description="Converts the checkpoint of a run written by an earlier furl_fast version to the "
                    "current format (checksummed, read without unpickling any object). Nothing in the "
                    "old file is run; it has no checksum, so convert only a file you know is intact.")
    parser.add_argument("action", choices=["convert"])
    parser.add_argument("run_dir", type=Path, help="the run directory (it holds checkpoints/state.pt)")
    args = parser.parse_args(argv)
    try:
        step = convert_checkpoint(args.run_dir)
    except (OSError, ValueError, TypeError) as exc:
        print(f"furl_fast.runs: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"converted {args.run_dir / CHECKPOINT_DIR / STATE_FILE} (step {step}); continue the run "
          f"with --resume {args.run_dir}.")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(tmp):
            tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


if __name__ == "__main__":
    main()
