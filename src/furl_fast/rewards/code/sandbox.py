"""Run untrusted checker programs `done(frame, state) -> bool` in a separate worker process.

Barriers, from the outside in (the worker side is in _worker.py and _isolation.py):
- a separate process: whatever a program does, the caller only ever sees a RunResult. The parent
  reads nothing but size-bounded, flat JSON from the worker (no pickle), and every read and write has
  a deadline; a worker that hangs, crashes or talks nonsense is killed and restarted on the next
  call. Error text that comes back is reduced to printable ASCII of bounded length, with the values
  of secret-looking environment variables (API keys, tokens, passwords) blanked out;
- a supervisor process between the caller and the worker kills the worker when the caller goes away,
  even after `kill -9`; closing a Sandbox kills both;
- OS-level isolation of the worker (Linux; see _isolation.py): new user, network and PID namespaces
  where the kernel allows them, Landlock (a read-only view of numpy and the standard library only,
  so no /proc of other processes, no secrets, no writes), a seccomp-bpf allow-list of system calls
  (no sockets, processes, threads, signals to others, file writes, renames or shared mappings),
  no_new_privs, and resource limits (memory, file size 0, no core dumps, open files);
- a per-call SIGALRM time limit (a program that swallows the interrupt gets the worker ended) and a
  per-episode time budget: a program that stays just under the per-call limit on every item is
  stopped once one episode's items cost more than `SandboxLimits.episode_time_s` in sum;
- a Python audit hook in the worker, restricted builtins and a module whitelist (numpy, math, cv2
  if installed) enforced by a static AST check before the program is sent AND by a restricted
  `__import__`. These are the first line, not a proof: programs that get past them still meet the
  OS-level layers.

`SandboxLimits.isolation` decides what happens where the OS-level layers cannot be set up (another
OS, a kernel without Landlock, no libseccomp): "required" (the default, for programs from a VLM or a
file of unknown origin) refuses with SandboxUnavailable, naming what is missing; "best-effort"
(programs the user trusts) runs them behind the Python-level barriers alone, with a warning; "none"
skips the OS-level layers altogether (a benchmark baseline).

Protocol: one worker per program. A call evaluates a whole batch of items (frames are sent once per
batch, not once per item). Each item names an episode *slot* and a *reset* flag: a program keeps its
module-level state per slot, and the module is re-executed in a fresh namespace when the flag is set
(or the slot is new). So a program may remember, e.g., the object's initial position in a global.

POSIX only (pipes, rlimits, SIGALRM, poll); the memory limit is enforced on Linux.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from furl_fast.rewards.code._worker import CODE_CHARS, HEADER, check_source, reads_frame
from furl_fast.rewards.code.program_set import json_depth

__all__ = [
    "ISOLATION_MODES",
    "RunResult",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailable",
    "check_isolation",
    "check_source",
    "sanitize_error",
]

log = logging.getLogger(__name__)

_WORKER = Path(__file__).with_name("_worker.py")
_F_SETPIPE_SZ = 1031  # Linux fcntl: bigger pipe buffers mean fewer wake-ups per batch
ISOLATION_MODES = ("required", "best-effort", "none")
# A reply is a flat JSON object: one character per item plus an error text of bounded length.
_REPLY_OVERHEAD_BYTES = 8192
_MAX_ERROR_CHARS = 300
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)
_CODE_VALUES = {c: v for v, c in CODE_CHARS.items()}
# Layers to leave out of the worker's set-up, as if the kernel lacked them (tests of fail-closed).
_SKIP_LAYERS: tuple[str, ...] = ()
_warned_best_effort: set[str] = set()


class SandboxUnavailable(RuntimeError):
    """The OS-level isolation that untrusted programs require cannot be set up on this machine."""


def check_isolation(limits: SandboxLimits | None = None) -> dict:
    """Starts one worker as `limits` asks and returns what it set up (Sandbox.isolation_report);
    raises SandboxUnavailable where the isolation is required and cannot be set up. A start-up check,
    so that a long run fails before its long start-up rather than at its first program."""
    with Sandbox("def done(frame, state):\n    return True\n", limits) as box:
        result = box.run(np.zeros((1, 1, 1, 3), np.uint8), np.zeros((1, 1)))
        if not result.ok:
            raise SandboxUnavailable(f"the sandbox's worker does not start ({result.error})")
        return dict(box.isolation_report)


def sanitize_error(text: str) -> str:
    """Error text from a worker, safe to log or to send to a VLM: the values of secret-looking
    environment variables blanked out, printable ASCII on one line, at most 300 characters."""
    text = str(text)
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name):
            text = text.replace(value, "[redacted]")
    text = " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits and isolation of one worker."""

    time_limit_s: float = 1.0
    """Wall-clock limit for one call of done() (and for running the program's top level)."""
    grace_s: float = 1.0
    """Extra time a program that swallowed the time-limit interrupt gets before its worker is ended."""
    memory_limit_mb: int = 1024
    """Address space a worker may add to its start-up size (RLIMIT_AS): program data + one batch."""
    max_batch_mb: int = 128
    """Largest batch sent in one message; bigger calls are split (slots keep their state)."""
    episode_time_s: float = 10.0
    """Time one episode's items may spend in the program in sum (per slot, from its reset); a
    program over it fails like one over its per-call limit. 10 s is 20 ms per step of a 500-step
    episode, far above what a checker needs (microseconds on the state, about a millisecond on a
    frame) and far below what would slow training down."""
    isolation: str = "required"
    """What the worker needs of the OS-level isolation: "required" (programs from a VLM or a file
    of unknown origin; refuse with SandboxUnavailable where it cannot be set up), "best-effort"
    (programs the user trusts: without it they run behind the Python-level barriers alone, with a
    warning) or "none" (leave it out; a baseline for benchmarks)."""
    startup_timeout_s: float = 60.0
    """Time the worker may take to start (import numpy, apply the limits)."""
    slack_s: float = 10.0
    """Extra time per batch before the parent kills a silent worker (a program stuck inside C code,
    where the per-call interrupt cannot reach it); covers transfers on a busy machine."""

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(
                f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {self.isolation!r}"
            )
        if not (
            self.time_limit_s > 0 and self.grace_s > 0 and self.slack_s > 0
            and self.episode_time_s > 0
        ):
            raise ValueError("time_limit_s, grace_s, episode_time_s and slack_s must be positive")
        if self.max_batch_mb < 1 or self.memory_limit_mb < 2 * self.max_batch_mb:
            raise ValueError(
                f"memory_limit_mb ({self.memory_limit_mb}) must be at least twice max_batch_mb "
                f"({self.max_batch_mb}), which must be >= 1: a batch is held in the worker"
            )


@dataclass
class RunResult:
    """Outcome of one Sandbox.run call.

    done: (N,) bool, the program's answer per item (False where it failed or was not run).
    error: None if every item ran, else the reason of the first failure (program exception, time
        limit or budget, wrong return type, forbidden operation, rejected source, crashed worker),
        passed through sanitize_error.
    error_index: index of the failing item, or None (None also when the source was rejected).
    """

    done: np.ndarray
    error: str | None = None
    error_index: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class WorkerFailure(Exception):
    """The worker process died, hung or broke the protocol (internal; reported as RunResult)."""


class Sandbox:
    """One untrusted checker program in its own worker process (started lazily, restarted on
    failure). Not thread-safe: use one Sandbox per thread. run() raises SandboxUnavailable where
    limits.isolation is "required" and the OS-level isolation cannot be set up.

    >>> with Sandbox("def done(frame, state):\\n    return bool(state[0] > 0)") as box:
    ...     box.run_episode(frames, states).done   # frames (N,H,W,3) uint8, states (N,D) float
    """

    def __init__(
        self,
        source: str,
        limits: SandboxLimits | None = None,
        name: str = "program",
        *,
        static_check: bool = True,
    ):
        """static_check=False skips the AST check on both sides; only for testing that the run-time
        barriers hold on their own."""
        self.source = source
        self.limits = limits or SandboxLimits()
        self.name = name
        self.static_check = static_check
        self.rejection = check_source(source) if static_check else None
        """Why the static check rejected the program (None if it passed)."""
        # Programs that never read their frame get (N, 1, 1, 3) dummies: sending the real frames
        # would dominate the cost of state-only programs (~50 KB per 128x128 frame vs ~300 B).
        self.reads_frame = reads_frame(source) if static_check else True
        self._proc: subprocess.Popen | None = None
        self._workdir: str | None = None
        self.isolation_report: dict | None = None
        """What the last worker set up: {"namespaces": [...], "landlock": ABI (0: none),
        "seccomp": bool}; None before the first start."""

    # -- public API ---------------------------------------------------------------------------

    def run(
        self,
        frames: np.ndarray,
        states: np.ndarray,
        slots: np.ndarray | None = None,
        resets: np.ndarray | None = None,
    ) -> RunResult:
        """Evaluate done(frames[i], states[i]) for every item i, in order.

        frames: (N, H, W, 3) uint8. states: (N, D) float32 or float64.
        slots: (N,) int, the episode slot of each item (default all 0).
        resets: (N,) bool, start a fresh program instance for the item's slot before it (default
            all False; a slot never seen before is always fresh).
        After the first failing item the rest of the call is not run (done False).
        """
        frames, states, slots, resets = _validate(frames, states, slots, resets)
        n = len(states)
        done = np.zeros(n, dtype=bool)
        if self.rejection is not None:
            return RunResult(done, sanitize_error(f"rejected: {self.rejection}"))
        if n == 0:
            return RunResult(done)
        if not self.reads_frame:
            frames = np.zeros((n, 1, 1, 3), np.uint8)
        per_item = frames[0].nbytes + states[0].nbytes + 9
        chunk = max(1, (self.limits.max_batch_mb * 2**20) // per_item)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            try:
                self._ensure_started()
                if self.rejection is not None:  # the worker's compile() found what ast did not
                    self._kill()
                    return RunResult(done, sanitize_error(f"rejected: {self.rejection}"))
                reply = self._request(
                    {"op": "run"},
                    [frames[start:stop], states[start:stop], slots[start:stop], resets[start:stop]],
                    deadline=self._run_deadline(slots[start:stop], resets[start:stop], per_item),
                    max_reply_bytes=_REPLY_OVERHEAD_BYTES + (stop - start),
                )
                if reply.get("op") == "fatal":
                    # The worker ended itself (a program ignored its time limit); its report
                    # carries the results up to the failing item.
                    self._kill()
                    codes, error, index = _parse_result(dict(reply, op="result"), stop - start)
                else:
                    codes, error, index = _parse_result(reply, stop - start)
            except WorkerFailure as e:
                self._kill()
                return RunResult(done, sanitize_error(f"worker failed: {e}"), None)
            done[start:stop] = codes == 1
            if error is not None:
                return RunResult(done, sanitize_error(error), start + index)
        return RunResult(done)

    def run_episode(self, frames: np.ndarray, states: np.ndarray, slot: int = 0) -> RunResult:
        """One episode from its first item: frames (T, H, W, 3) uint8, states (T, D) float."""
        resets = np.zeros(len(states), dtype=bool)
        resets[:1] = True
        return self.run(frames, states, np.full(len(states), slot, dtype=np.int64), resets)

    def close(self) -> None:
        """End the worker process (a later run starts a new one)."""
        self._kill()

    def __enter__(self) -> Sandbox:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # may run at interpreter shutdown
            self._kill()

    # -- worker management ----------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._kill()
        config = {
            "time_limit_s": self.limits.time_limit_s,
            "grace_s": self.limits.grace_s,
            "episode_time_s": self.limits.episode_time_s,
            "memory_limit_mb": self.limits.memory_limit_mb,
            "static_check": self.static_check,
            "isolation": self.limits.isolation,
            "skip": list(_SKIP_LAYERS),
            # The worker runs isolated (-I: no PYTHONPATH, no user site), so hand it the folder
            # that holds the caller's numpy (same numpy, wherever it was installed; the seccomp
            # bindings live there too) and this folder (for _isolation.py).
            "paths": [str(Path(np.__file__).resolve().parent.parent), str(_WORKER.parent)],
        }
        # A minimal environment: no proxies, no PYTHONPATH, no secrets; one BLAS thread (threads
        # reserve address space, and the caller's cores belong to the caller).
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        self._workdir = tempfile.mkdtemp(prefix="furl-sandbox-")  # empty, removed on close
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self._workdir,
            close_fds=True,
            start_new_session=True,  # its own process group, killed as one on close
        )
        for f in (self._proc.stdin, self._proc.stdout):
            try:
                fcntl.fcntl(f.fileno(), _F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
            os.set_blocking(f.fileno(), False)
        deadline = time.monotonic() + self.limits.startup_timeout_s
        try:
            hello = self._read_message(deadline, _REPLY_OVERHEAD_BYTES)
            if hello.get("op") == "unavailable":
                self._kill()
                raise SandboxUnavailable(
                    "cannot isolate untrusted programs on this machine: "
                    f"{sanitize_error(hello.get('error'))}"
                )
            if hello.get("op") != "ready" or not isinstance(hello.get("isolation"), dict):
                raise WorkerFailure(f"unexpected start-up message {str(hello)[:200]}")
            self.isolation_report = hello["isolation"]
            missing = hello.get("missing")
            if missing and self.limits.isolation == "best-effort":
                text = sanitize_error("; ".join(map(str, missing)))
                if text not in _warned_best_effort:
                    _warned_best_effort.add(text)
                    log.warning("sandbox: running trusted programs without full OS isolation: %s",
                                text)
            reply = self._request(
                {"op": "load", "source": self.source}, [], deadline, _REPLY_OVERHEAD_BYTES
            )
            if reply.get("op") == "fatal":
                raise WorkerFailure(str(reply.get("error"))[:1000])
        except WorkerFailure as e:
            detail = self._stderr_tail()
            self._kill()
            raise WorkerFailure(f"{e}{': ' + detail if detail else ''}") from None
        if reply.get("op") != "loaded":
            self._kill()
            raise WorkerFailure("unexpected reply to load")
        if reply.get("error") is not None:
            self.rejection = str(reply["error"])[:1000]

    def _run_deadline(self, slots: np.ndarray, resets: np.ndarray, per_item_bytes: int) -> float:
        # Every call may use its time limit plus the grace period (after which the worker ends
        # itself), and each episode in the batch its time budget (plus one call past it); the
        # constant and the bandwidth term cover the transfer and a busy machine.
        n = len(slots)
        per_call = self.limits.time_limit_s + self.limits.grace_s
        episodes = len(np.unique(slots)) + int(resets.sum())
        compute = min(n * per_call, episodes * (self.limits.episode_time_s + per_call))
        transfer = n * per_item_bytes / 20e6
        return time.monotonic() + self.limits.slack_s + transfer + compute

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        workdir, self._workdir = self._workdir, None
        if proc is not None:
            if proc.poll() is None:
                # The supervisor and the worker share a process group of their own.
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
                log.warning("sandbox worker %d did not exit after SIGKILL", proc.pid)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    f.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _stderr_tail(self) -> str:
        proc = self._proc
        if proc is None or proc.stderr is None:
            return ""
        try:
            if proc.poll() is None:
                return ""
            return sanitize_error(proc.stderr.read()[-2000:].decode(errors="replace"))
        except (OSError, ValueError):
            return ""

    # -- wire -----------------------------------------------------------------------------------

    def _request(
        self, header: dict, arrays: list[np.ndarray], deadline: float, max_reply_bytes: int
    ) -> dict:
        from furl_fast.rewards.code._worker import encode

        arrays = [np.ascontiguousarray(a) for a in arrays]
        for part in encode(header, arrays):
            self._write_all(part, deadline)
        return self._read_message(deadline, max_reply_bytes)

    def _write_all(self, data, deadline: float) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        view = memoryview(data).cast("B")
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailure("timed out sending a batch (worker not reading)")
            if not _wait(fd, select.POLLOUT, remaining):
                continue
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError) as e:
                raise WorkerFailure(f"worker exited ({self._exit_reason() or e})") from None
            view = view[n:]

    def _read_exact(self, n: int, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        parts, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailure("timed out waiting for the worker (hung program?)")
            if not _wait(fd, select.POLLIN, remaining):
                continue
            try:
                chunk = os.read(fd, n - got)
            except BlockingIOError:
                continue
            if not chunk:
                raise WorkerFailure(f"worker exited ({self._exit_reason()})")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _read_message(self, deadline: float, max_bytes: int) -> dict:
        """One reply: at most max_bytes of JSON nested at most 3 deep, both checked before it is
        parsed, so that a forged reply can neither exhaust memory nor make the parser recurse."""
        json_len, payload_len = HEADER.unpack(self._read_exact(HEADER.size, deadline))
        if payload_len != 0 or json_len > max_bytes:
            raise WorkerFailure(f"malformed reply from the worker ({json_len} bytes)")
        try:
            text = self._read_exact(json_len, deadline).decode()
        except UnicodeDecodeError:
            raise WorkerFailure("malformed reply from the worker (not UTF-8)") from None
        if json_depth(text) > 3:
            raise WorkerFailure("malformed reply from the worker (nested too deeply)")
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            raise WorkerFailure("malformed reply from the worker") from None
        if not isinstance(msg, dict):
            raise WorkerFailure("malformed reply from the worker")
        return msg

    def _exit_reason(self) -> str:
        proc = self._proc
        if proc is None:
            return "no worker"
        try:
            code = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            return f"killed by signal {-code}"
        if code > 128:  # the supervisor reports the worker's death by signal N as 128 + N
            return f"killed by signal {code - 128}"
        return f"exit status {code}"


def _wait(fd: int, event: int, timeout_s: float) -> bool:
    """Wait until fd is ready for `event` (or hung up). poll, not select: a trainer may hold more
    than FD_SETSIZE (1024) descriptors."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(1, int(timeout_s * 1000))))


def _parse_result(reply: dict, n: int) -> tuple[np.ndarray, str | None, int | None]:
    """Validate a worker's run reply: codes (n,) in {-2, -1, 0, 1}, error text, error index."""
    codes = reply.get("codes")
    if reply.get("op") != "result" or not isinstance(codes, str) or len(codes) != n:
        raise WorkerFailure("malformed run reply from the worker")
    try:
        codes_arr = np.fromiter((_CODE_VALUES[c] for c in codes), dtype=np.int8, count=n)
    except KeyError:
        raise WorkerFailure("malformed run reply from the worker") from None
    error, index = reply.get("error"), reply.get("error_index")
    if error is None:
        if (codes_arr < 0).any():
            raise WorkerFailure("malformed run reply from the worker")
        return codes_arr, None, None
    if type(index) is not int or not 0 <= index < n:
        raise WorkerFailure("malformed run reply from the worker")
    return codes_arr, str(error)[:1000], index


def _validate(
    frames: np.ndarray, states: np.ndarray, slots: np.ndarray | None, resets: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    states = np.asarray(states)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be (N, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}"
        )
    if states.ndim != 2 or states.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"states must be (N, D) float32 or float64, got shape {states.shape} dtype {states.dtype}"
        )
    n = len(states)
    if len(frames) != n:
        raise ValueError(f"frames has {len(frames)} items but states has {n}")
    slots = np.zeros(n, np.int64) if slots is None else np.asarray(slots)
    resets = np.zeros(n, bool) if resets is None else np.asarray(resets)
    if slots.shape != (n,) or not np.issubdtype(slots.dtype, np.integer):
        raise ValueError(f"slots must be ({n},) integers, got shape {slots.shape} {slots.dtype}")
    if resets.shape != (n,) or resets.dtype != bool:
        raise ValueError(f"resets must be ({n},) bool, got shape {resets.shape} {resets.dtype}")
    return frames, states, slots.astype(np.int64), resets
