"""OS-level isolation of a sandbox worker (Linux), applied after numpy is imported and before any
program code runs. Imported by _worker.py inside the worker process only.

The layers, each enforced by the kernel, so none depends on the Python-level barriers holding:
- namespaces (when the kernel lets an unprivileged process create them): a new user, network, PID,
  IPC and UTS namespace. The worker then has no network interface but loopback of its own, and sees
  no process but itself;
- Landlock (Linux 5.13+): the file system becomes read-only, and readable only below the folders
  numpy and the standard library live in (no /proc, /etc, /home, no working directory). Landlock
  also keeps the worker from ptrace-style access to processes outside its domain (reading another
  process's /proc/<pid>/environ or memory), and, from ABI 4 / 6 on, from TCP and from signalling
  processes outside it;
- seccomp-bpf (libseccomp through the `pyseccomp` bindings): an allow-list of the system calls a numpy
  program needs; everything else fails with EPERM. Left out on purpose: sockets, execve, fork and
  clone (no processes, no threads), kill and ptrace, opening files for writing, unlink/rename/mkdir,
  shared mappings (writing a file through mmap), changing signal handlers or masks (so the per-call
  time limit stays armed), raising resource limits, io_uring, bpf, namespaces;
- no_new_privs, and resource limits (address space, file size 0, no core dumps, few open files).

Why these building blocks: Landlock and seccomp are what the kernel offers an unprivileged process to
drop rights for good, with no helper binary to install and no setuid; libseccomp is the maintained
compiler of seccomp filters (it handles every architecture's syscall numbers and the x32/i386 ABIs);
Landlock's three system calls are called directly, since its ABI is small and stable and the Python
bindings on PyPI are pre-releases without the network and scope rules.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys

_LINUX = sys.platform.startswith("linux")

# <linux/sched.h>
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
# <linux/prctl.h>
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# <linux/landlock.h>; the syscall numbers are the same on every architecture.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute ... make_sym: every right of ABI 1
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# System calls a worker needs once it runs programs: memory, its pipes, reading already-granted
# files (numpy may import a submodule lazily), the time-limit timer and signal return, exiting.
# Per-argument rules for mmap, openat and prlimit64 are added below.
ALLOWED_SYSCALLS = (
    "read readv pread64 write writev pwrite64 close close_range lseek fstat newfstatat statx stat "
    "lstat fstatfs statfs getdents64 readlink readlinkat access faccessat faccessat2 getcwd fcntl "
    "dup dup2 dup3 ioctl poll ppoll select pselect6 epoll_wait epoll_pwait "
    "munmap mremap mprotect madvise brk mlock munlock membarrier "
    "futex futex_waitv set_robust_list get_robust_list rseq sched_yield sched_getaffinity "
    "getpid gettid getppid getuid geteuid getgid getegid getgroups getresuid getresgid getpgrp "
    "getpgid getsid uname sysinfo getrandom getrusage times getpriority "
    "clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time "
    "setitimer getitimer alarm rt_sigreturn restart_syscall sigaltstack "
    "exit exit_group"
).split()
_MAP_SHARED = 0x01
# O_TMPFILE is left out on purpose: it contains O_DIRECTORY's bit, and it needs O_WRONLY or O_RDWR.
_OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# Imported now, while the file system is still readable: the bindings look for libseccomp.so.2.
try:
    import pyseccomp as seccomp

    _seccomp_error = ""
except (ImportError, OSError) as exc:  # OSError: the bindings found no libseccomp.so.2
    seccomp, _seccomp_error = None, f"{type(exc).__name__}: {exc}"


class IsolationError(Exception):
    """A layer that was asked for could not be set up; the message says which and why."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise IsolationError(f"{what} failed: {os.strerror(code)} (errno {code})")
    return result


def unshare_namespaces() -> list[str]:
    """New user, network, PID, IPC and UTS namespaces for this process (the PID namespace applies to
    its next child). Returns the namespaces created: [] where the kernel refuses unprivileged ones."""
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if not _LINUX or _libc.unshare(flags) != 0:
        return []
    return ["user", "network", "pid", "ipc", "uts"]


def kill_with_parent() -> None:
    """SIGKILL this process when its parent dies (set in the worker, whose parent is its own
    single-threaded supervisor, so the signal cannot fire early when some other thread exits).
    Elsewhere than on Linux the supervisor's pipe watch alone ends the worker."""
    if not _LINUX:
        return
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_limits(address_space: int | None) -> None:
    """Resource limits, soft = hard. address_space: bytes, or None to leave it."""
    if address_space is not None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    # No file may grow: with SIGXFSZ ignored a write to a regular file fails with EFBIG instead of
    # killing the process. Pipes and /dev/null are unaffected.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def close_fds_except(keep: set[int]) -> None:
    """Close every file descriptor but `keep` (call before set_limits lowers RLIMIT_NOFILE)."""
    start = 0
    for fd in sorted(keep):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))


def no_new_privileges() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def landlock_abi() -> int:
    """Landlock ABI version of the running kernel; 0 where Landlock is missing or disabled."""
    if not _LINUX:  # the syscall numbers mean something else elsewhere
        return 0
    abi = _libc.syscall(
        _LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(int(abi), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict_filesystem(readable: list[str]) -> int:
    """Landlock: no write of any kind anywhere, reads only below `readable` (files or folders), no
    TCP (ABI >= 4), no signals or abstract unix sockets outside the domain (ABI >= 6). Returns the
    ABI version used. Raises IsolationError where Landlock is unavailable."""
    abi = landlock_abi()
    if abi < 1:
        raise IsolationError(
            "Landlock is not available (it needs Linux 5.13+ with landlock in the kernel's LSM list)"
        )
    handled = _FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    handled |= _FS_IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(fs=handled)
    size = 8  # the struct grew with the ABI: pass only the fields this kernel knows
    if abi >= 4:
        attr.net, size = _NET_BIND_TCP | _NET_CONNECT_TCP, 16
    if abi >= 6:
        attr.scoped, size = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL, 24
    ruleset = _check(
        _libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )
    try:
        for path in readable:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                is_dir = os.path.isdir(path)
                rule = _PathBeneathAttr(
                    allowed=_FS_READ_FILE | (_FS_READ_DIR if is_dir else 0), parent_fd=fd
                )
                _check(
                    _libc.syscall(
                        _LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0
                    ),
                    f"landlock_add_rule({path})",
                )
            finally:
                os.close(fd)
        no_new_privileges()
        _check(_libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def install_syscall_filter() -> None:
    """seccomp-bpf allow-list (ALLOWED_SYSCALLS plus argument rules); anything else fails with
    EPERM. Raises IsolationError where libseccomp or its bindings are missing."""
    if seccomp is None:
        raise IsolationError(f"seccomp needs libseccomp and the pyseccomp package ({_seccomp_error})")
    try:
        flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
        for name in ALLOWED_SYSCALLS:
            try:
                flt.add_rule(seccomp.ALLOW, name)
            except (ValueError, RuntimeError, OSError):  # not a syscall on this architecture
                pass
        # Private mappings only: a shared writable mapping of a file writes the file.
        flt.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(3, seccomp.MASKED_EQ, _MAP_SHARED, 0))
        # Opening for reading only (Landlock decides which paths).
        flt.add_rule(
            seccomp.ALLOW, "openat", seccomp.Arg(2, seccomp.MASKED_EQ, _OPEN_WRITE_FLAGS, 0)
        )
        try:
            flt.add_rule(
                seccomp.ALLOW, "open", seccomp.Arg(1, seccomp.MASKED_EQ, _OPEN_WRITE_FLAGS, 0)
            )
        except (ValueError, RuntimeError, OSError):  # architectures without open(2)
            pass
        # Reading a resource limit (new limit NULL), never setting one.
        flt.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(2, seccomp.EQ, 0))
        flt.load()
    except (ValueError, RuntimeError, OSError) as exc:
        raise IsolationError(f"installing the seccomp filter failed ({exc})") from None
