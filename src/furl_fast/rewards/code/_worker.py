"""Worker process that runs one untrusted checker program (see sandbox.py for the parent side).

This file is executed as a script (`python -I _worker.py`) so that the worker imports nothing but the
standard library, numpy and the whitelisted modules: not furl_fast, not torch. The parent also imports
it as a module for the wire format and the static check, so both sides share one definition.

Wire format, both directions: a 12-byte header (uint32 JSON length, uint64 payload length, little
endian), a UTF-8 JSON object, then the payload (raw bytes of the arrays that the JSON describes).
The worker only ever answers with JSON (no payload, never pickle): the parent treats everything the
worker says as untrusted and validates it.
"""

from __future__ import annotations

import ast
import functools
import json
import struct

HEADER = struct.Struct("<IQ")
# A run reply's per-item results as one character each: True, False, failed, not run (after a
# failure). A flat string keeps the reply small and its JSON one level deep.
CODE_CHARS = {1: "1", 0: "0", -1: "e", -2: "-"}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


MAX_SOURCE_CHARS = 100_000

# Modules a program may import. cv2 is added at run time when it is installed.
ALLOWED_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "math")
OPTIONAL_MODULES = ("cv2",)

# Names a program may not mention at all: their only uses are escaping the sandbox. The restricted
# builtins do not contain them either; the static check just gives an early, clear reason.
FORBIDDEN_NAMES = _words(
    "eval exec compile open getattr setattr delattr globals locals vars input breakpoint help "
    "exit quit memoryview type super object classmethod staticmethod"
)
# Attribute names that reach files, processes, raw memory or the real builtins (numpy re-exports
# the builtins module) through numpy / OpenCV.
FORBIDDEN_ATTRIBUTES = _words(
    "ctypes ctypeslib f2py testing distutils lib load loads save savez savez_compressed savetxt "
    "tofile memmap fromfile fromregex loadtxt genfromtxt DataSource dump dumps imwrite VideoWriter "
    "VideoCapture FileStorage gi_frame gi_code f_globals f_locals f_back cr_frame tb_frame "
    "builtins getattr setattr delattr globals locals vars eval exec compile open"
)


@functools.lru_cache(maxsize=1)
def installed_modules() -> tuple[str, ...]:
    """The whitelist on this machine: ALLOWED_MODULES plus the installed OPTIONAL_MODULES (found
    without importing them)."""
    import importlib.util

    return ALLOWED_MODULES + tuple(
        name for name in OPTIONAL_MODULES if importlib.util.find_spec(name) is not None
    )


def check_source(source: str, allowed_modules: tuple[str, ...] | None = None) -> str | None:
    """Static check of a checker program. Returns None if it may run, else the reason it may not.

    Rules: valid Python; a top-level `def done(frame, state)`; imports only of whitelisted modules
    (absolute, no `*`); no attribute starting with an underscore and no name starting with two
    (that is how sandbox escapes reach `__class__`, `__globals__`, `__builtins__`, private numpy
    modules); none of FORBIDDEN_NAMES / FORBIDDEN_ATTRIBUTES; no assignment to module attributes.
    allowed_modules: default installed_modules().
    """
    if allowed_modules is None:
        allowed_modules = installed_modules()
    if not isinstance(source, str):
        return f"program must be a str, got {type(source).__name__}"
    if len(source) > MAX_SOURCE_CHARS:
        return f"program is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}"
    try:
        tree = ast.parse(source, filename="<checker>")
    except SyntaxError as e:
        return f"syntax error at line {e.lineno}: {e.msg}"
    except (ValueError, RecursionError, MemoryError) as e:  # e.g. null bytes, absurd nesting
        return f"program cannot be parsed: {type(e).__name__}: {e}"

    def allowed(module: str) -> bool:
        return module in allowed_modules

    # Names bound to imported modules: assigning to their attributes would patch the module for the
    # rest of the worker's life (state that survives the per-episode reset) or patch the worker.
    module_names = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(root, ast.Name) and root.id in module_names:
                return (
                    f"line {line}: assigning to an attribute of module {root.id!r} is not allowed"
                )
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not allowed(alias.name):
                    return (
                        f"line {line}: import of {alias.name!r} is not allowed "
                        f"(allowed: {', '.join(allowed_modules)})"
                    )
        elif isinstance(node, ast.ImportFrom):
            if node.level != 0 or node.module is None or not allowed(node.module):
                return (
                    f"line {line}: import from {node.module!r} is not allowed "
                    f"(allowed: {', '.join(allowed_modules)})"
                )
            for alias in node.names:
                if alias.name == "*":
                    return f"line {line}: `from {node.module} import *` is not allowed"
                if alias.name.startswith("_") or alias.name in FORBIDDEN_ATTRIBUTES:
                    return f"line {line}: importing {alias.name!r} is not allowed"
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_") or node.attr in FORBIDDEN_ATTRIBUTES:
                return f"line {line}: attribute {node.attr!r} is not allowed"
        elif isinstance(node, ast.Name):
            if node.id.startswith("__") or node.id in FORBIDDEN_NAMES:
                return f"line {line}: name {node.id!r} is not allowed"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("__"):
                return f"line {line}: name {node.name!r} is not allowed"
        elif isinstance(node, (ast.arg, ast.keyword)) and (node.arg or "").startswith("__"):
            return f"line {line}: name {node.arg!r} is not allowed"
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "done"]
    if not defs:
        return "program defines no top-level function `done(frame, state)`"
    args = defs[-1].args
    if len(args.posonlyargs) + len(args.args) < 2 and args.vararg is None:
        return "`done` must take two positional arguments (frame, state)"
    return None


def reads_frame(source: str) -> bool:
    """Whether done()'s first parameter (the frame) is ever read. If not, the caller may send tiny
    dummy frames instead: without locals()/vars()/frame objects (all forbidden) a function cannot
    reach a parameter it never names. True when unsure (e.g. the source does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True
    defs = [n for n in ast.walk(tree) if getattr(n, "name", None) == "done"]
    rebound = any(
        isinstance(n, ast.Name)
        and n.id == "done"
        and not isinstance(n.ctx, ast.Load)
        or isinstance(n, ast.alias)
        and n.asname == "done"
        for n in ast.walk(tree)
    )
    if len(defs) != 1 or not isinstance(defs[0], ast.FunctionDef) or rebound:
        return True  # `done` might end up being another function
    args = defs[-1].args
    params = [*args.posonlyargs, *args.args]
    if not params or args.vararg is not None:
        return True
    name = params[0].arg
    return any(
        isinstance(n, ast.Name) and n.id == name for n in ast.walk(defs[-1]) if n is not params[0]
    )


def encode(header: dict, arrays: list | None = None) -> list:
    """Message parts ready to write: header bytes, JSON bytes, then each array's raw buffer."""
    arrays = arrays or []
    specs, offset = [], 0
    for a in arrays:
        specs.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += a.nbytes
    body = dict(header, arrays=specs)
    text = json.dumps(body).encode()
    return [HEADER.pack(len(text), offset), text] + [memoryview(a).cast("B") for a in arrays]


# ----------------------------------------------------------------------------------------------
# Everything below runs only inside the worker process.
# ----------------------------------------------------------------------------------------------


class ProgramTimeout(BaseException):
    """Raised inside a program that ran past its time limit. BaseException so that a program's
    `except Exception` cannot swallow it (a bare `except:` can: see on_alarm's second stage)."""


def _worker_main() -> None:
    import os
    import select
    import signal
    import sys
    import time

    # Private copies of the protocol pipes; fds 0-2 then point at /dev/null so that a program's
    # print() or stray writes can never corrupt the protocol stream.
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)

    config = json.loads(sys.argv[1])
    time_limit = float(config["time_limit_s"])
    grace = float(config["grace_s"])
    episode_budget = float(config["episode_time_s"])
    static_check = bool(config.get("static_check", True))
    isolation = config["isolation"]  # "required", "best-effort" or "none"
    sys.path.extend(p for p in config.get("paths", []) if p not in sys.path)

    import numpy as np

    allowed = list(ALLOWED_MODULES)
    for name in OPTIONAL_MODULES:
        try:
            __import__(name)
        except (ImportError, OSError):  # not installed (or its libraries are missing)
            continue
        allowed.append(name)
    for name in allowed:
        __import__(name)
    if "cv2" in allowed:
        sys.modules["cv2"].setNumThreads(0)  # no thread pool: the worker may not start threads
    import builtins
    import math

    import _isolation

    namespaces = _isolation.unshare_namespaces() if isolation != "none" else []
    # A supervisor process stays outside the program's reach: it kills the worker when the caller
    # goes away (its end of the request pipe hangs up, even after a kill -9) and then exits; the
    # worker dies with its supervisor (parent-death signal). In a new PID namespace the worker is its
    # namespace's first process, so nothing it could start outlives it either.
    child = os.fork()
    if child:
        os.close(out_fd)
        os.close(devnull)
        watch = select.poll()
        watch.register(in_fd, 0)  # POLLHUP and POLLERR are always reported
        while True:
            pid, status = os.waitpid(child, os.WNOHANG)
            if not pid and watch.poll(250):
                os.kill(child, signal.SIGKILL)
                pid, status = os.waitpid(child, 0)
            if pid:
                # The caller removes the empty working folder too; this covers a killed caller.
                try:
                    os.rmdir(os.getcwd())
                except OSError:
                    pass
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
    # Had the supervisor died before this line, the worker still ends: the caller has closed or
    # lost its end of the request pipe, so the worker reads EOF before it runs anything.
    _isolation.kill_with_parent()

    def send(obj: dict) -> None:
        data = b"".join(bytes(p) for p in encode(obj))
        view = memoryview(data)
        while view:
            n = os.write(out_fd, view)
            view = view[n:]

    reader = os.fdopen(in_fd, "rb", buffering=0)

    def read_exact(n: int) -> bytearray:
        buf = bytearray(n)
        view, pos = memoryview(buf), 0
        while pos < n:
            got = reader.readinto(view[pos:])
            if not got:
                raise EOFError
            pos += got
        return buf

    current: dict = {}  # the run in progress, so that a fatal report can include its results

    def fatal(reason: str) -> None:
        try:
            report = {"op": "fatal", "error": reason}
            if "codes" in current:
                codes = list(current["codes"])
                codes[current["index"]] = -1
                report.update(codes="".join(CODE_CHARS[c] for c in codes),
                              error_index=current["index"])
            send(report)
        finally:
            os._exit(70)

    # --- time limit: SIGALRM per call (installed before the syscall filter forbids sigaction) ----
    alarm = {"stage": 0, "what": ""}

    def on_alarm(signum, frame):
        alarm["stage"] += 1
        if alarm["stage"] == 1:
            # Stage 1: interrupt the program. Stage 2 (it swallowed the interrupt with a bare
            # `except:` and kept running): end the worker; the parent restarts it.
            signal.setitimer(signal.ITIMER_REAL, grace)
            raise ProgramTimeout(f"exceeded the time limit of {time_limit:g} s {alarm['what']}")
        fatal(
            f"exceeded the time limit of {time_limit:g} s {alarm['what']} and ignored the interrupt"
        )

    signal.signal(signal.SIGALRM, on_alarm)

    # --- OS-level limits and isolation (see _isolation.py) ---------------------------------------
    # RLIMIT_AS counts the whole address space, so the limit is the start-up size plus the budget.
    # (Linux: /proc gives the size; elsewhere RLIMIT_AS is not enforced anyway.)
    try:
        with open("/proc/self/statm") as f:
            baseline = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        baseline = None
    _isolation.close_fds_except({in_fd, out_fd, devnull, 2})
    _isolation.set_limits(
        None if baseline is None else baseline + int(config["memory_limit_mb"]) * 2**20
    )
    report = {"namespaces": namespaces, "landlock": 0, "seccomp": False}
    missing = []
    if isolation != "none":
        import sysconfig

        paths = sysconfig.get_paths()
        readable = {paths["stdlib"], paths["platstdlib"]}
        for name in allowed:
            module = sys.modules[name.split(".")[0]]
            folder = os.path.dirname(module.__file__)
            readable.add(folder)
            if os.path.isdir(folder + ".libs"):  # wheels keep their shared libraries beside
                readable.add(folder + ".libs")
        skip = set(config.get("skip", ()))
        try:
            if "landlock" in skip:
                raise _isolation.IsolationError("Landlock was left out")
            report["landlock"] = _isolation.restrict_filesystem(sorted(readable))
        except _isolation.IsolationError as e:
            missing.append(str(e))
        try:
            if "seccomp" in skip:
                raise _isolation.IsolationError("seccomp was left out")
            _isolation.install_syscall_filter()
            report["seccomp"] = True
        except _isolation.IsolationError as e:
            missing.append(str(e))
        if missing and isolation == "required":
            send({"op": "unavailable", "error": "; ".join(missing)})
            os._exit(71)

    # --- audit hook: the interpreter-level barrier (cannot be removed once added) -------------
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_prefixes = (
        "socket.",
        "subprocess.",
        "ctypes.",
        "shutil.",
        "pty.",
        "webbrowser.",
        "urllib.",
        "http.",
        "ftplib.",
        "smtplib.",
        "imaplib.",
        "poplib.",
        "nntplib.",
        "telnetlib.",
        "sqlite3.",
        "resource.",
        "signal.",
        "sys.setprofile",
        "sys.settrace",
        "sys._current_frames",
        "code.__new__",
        "function.__new__",
        "mmap.",
    )
    blocked_imports = _words(
        "socket _socket ssl _ssl select selectors asyncio subprocess _posixsubprocess "
        "multiprocessing _multiprocessing mmap fcntl pty shutil tempfile pickle _pickle marshal "
        "importlib.util numpy.f2py numpy.distutils numpy.testing urllib.request http.client "
        "ftplib smtplib sqlite3 zipimport gc inspect"
    )
    allowed_os_events = ("os.listdir", "os.scandir")  # read-only; the import machinery needs them

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            wants_write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if wants_write:
                raise PermissionError(f"sandbox: opening {path!r} for writing is not allowed")
        elif event == "import":
            name = args[0] if args else ""
            if name in blocked_imports or str(name).split(".")[0] in blocked_imports:
                raise ImportError(f"sandbox: import of {name!r} is not allowed")
        elif event.startswith("os."):
            if event not in allowed_os_events:
                raise PermissionError(f"sandbox: {event} is not allowed")
        elif event.startswith(blocked_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")

    # --- restricted builtins and import ---------------------------------------------------------
    real_import = builtins.__import__

    # The program's builtins also serve numpy's C code called from the program: C-level imports
    # (PyImport_Import, e.g. `numpy._core._methods` for ndarray.mean) look `__import__` up in the
    # calling frame's builtins. So at run time any module inside a whitelisted package is admitted
    # (internal ones included); the static check admits only the whitelist itself.
    packages = {name.split(".")[0] for name in allowed}

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        parts = name.split(".") if isinstance(name, str) else [""]
        if level != 0 or parts[0] not in packages or FORBIDDEN_ATTRIBUTES.intersection(parts):
            raise ImportError(f"import of {name!r} is not allowed (allowed: {', '.join(allowed)})")
        for item in fromlist or ():
            if not isinstance(item, str) or item in FORBIDDEN_ATTRIBUTES:
                raise ImportError(f"importing {item!r} from {name!r} is not allowed")
        return real_import(name, globals, locals, fromlist, 0)

    safe = {
        name: getattr(builtins, name)
        for name in _words(
            "abs all any bool bytes callable chr dict divmod enumerate filter float format "
            "frozenset hash int isinstance issubclass iter len list map max min next ord pow "
            "range repr reversed round set slice sorted str sum tuple zip True False None "
            "Exception ArithmeticError AssertionError AttributeError IndexError KeyError "
            "LookupError NameError RuntimeError StopIteration TypeError ValueError "
            "ZeroDivisionError OverflowError FloatingPointError NotImplementedError "
            "__build_class__"
        )
    }
    safe["__import__"] = guarded_import
    safe["print"] = lambda *a, **k: None  # programs may print while debugging; output is dropped

    def guarded_call(what: str, fn, *args):
        alarm["stage"], alarm["what"] = 0, what
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            out = fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if alarm["stage"]:  # it caught the interrupt but then returned: still too slow
            raise ProgramTimeout(f"exceeded the time limit of {time_limit:g} s {what}")
        return out

    sys.setrecursionlimit(2000)
    sys.addaudithook(audit)
    os.dup2(devnull, 2)  # stderr stayed open until here so that set-up failures are visible
    send({"op": "ready", "modules": allowed, "isolation": report, "missing": missing})

    # The worker's own numpy entry points, bound before any program runs (programs share the numpy
    # module with the worker).
    frombuffer, bool_types, clock = np.frombuffer, (bool, np.bool_), time.monotonic
    code = None
    slots: dict[int, dict] = {}
    spent: dict[int, float] = {}  # seconds a slot's episode has spent in the program so far

    def instantiate() -> dict:
        namespace = {"__builtins__": safe, "__name__": "checker"}
        guarded_call("while running the program's top level", exec, code, namespace)
        fn = namespace.get("done")
        if not callable(fn):
            raise TypeError("the program's top level did not leave a callable `done`")
        return namespace

    def describe(e: BaseException) -> str:
        text = str(e)
        return f"{type(e).__name__}: {text[:500]}" if text else type(e).__name__

    while True:
        try:
            head = read_exact(HEADER.size)
        except EOFError:
            os._exit(0)
        json_len, payload_len = HEADER.unpack(head)
        msg = json.loads(bytes(read_exact(json_len)))
        payload = read_exact(payload_len) if payload_len else bytearray()
        arrays = []
        for spec in msg.get("arrays", []):
            count = math.prod(spec["shape"])
            a = frombuffer(payload, dtype=spec["dtype"], count=count, offset=spec["offset"])
            a = a.reshape(spec["shape"])
            a.flags.writeable = False  # programs get read-only views of the frames and states
            arrays.append(a)
        op = msg["op"]
        if op == "load":
            reason = check_source(msg["source"], tuple(allowed)) if static_check else None
            if not isinstance(msg["source"], str):
                reason = "program must be a str"
            if reason is None:
                try:
                    code = compile(msg["source"], "<checker>", "exec")
                except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
                    reason = describe(e)
            slots.clear()
            send({"op": "loaded", "error": reason})
        elif op == "run":
            frames, states, slot_ids, resets = arrays
            n = len(slot_ids)
            codes = [-2] * n  # -2: not run (after an error), -1: error, 0: False, 1: True
            error, error_index = None, None
            current.update(codes=codes, index=0)
            for i in range(n):
                current["index"] = i
                slot = int(slot_ids[i])
                try:
                    start = clock()
                    if resets[i] or slot not in slots:
                        spent[slot] = 0.0
                        slots[slot] = instantiate()
                    out = guarded_call(f"on item {i}", slots[slot]["done"], frames[i], states[i])
                    spent[slot] += clock() - start
                    if spent[slot] > episode_budget:
                        # Each call within its limit, yet too slow in sum: it would slow training.
                        raise ProgramTimeout(
                            f"spent {spent[slot]:.2f} s on one episode's first items, over the "
                            f"per-episode budget of {episode_budget:g} s"
                        )
                    if not isinstance(out, bool_types):
                        raise TypeError(f"done() returned {type(out).__name__}, expected bool")
                    codes[i] = int(bool(out))
                except BaseException as e:  # noqa: BLE001 - any failure of untrusted code
                    codes[i] = -1
                    error, error_index = describe(e), i
                    slots.pop(slot, None)  # its state is unknown now; the next item starts fresh
                    break
            current.clear()
            send({"op": "result", "codes": "".join(CODE_CHARS[c] for c in codes),
                  "error": error, "error_index": error_index})
        else:
            fatal(f"unknown op {op!r}")


if __name__ == "__main__":
    _worker_main()
