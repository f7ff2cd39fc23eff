"""Red-team tests of the code-reward sandbox: hostile programs that first get past every Python-level
barrier (static check, restricted builtins, audit hook), then try what an attacker wants. Each test
asserts that nothing happened outside the worker (the watched file is unchanged, the loopback
listener got nothing, no process is left, the secret did not come back) and that the program failed.

ESCAPE is how a program in the accepted format gets past the Python-level barriers: numpy re-exports
the real `builtins` (np.ma.core.builtins), whose getattr reaches frames, and the frame of the worker's
main function holds the audit hook, whose closure cells hold its block lists: emptying them turns the
hook off. So these tests exercise the OS-level layers on their own.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from furl_fast.rewards.code import CodeReward, ProgramSet, Sandbox, SandboxLimits, check_source
from furl_fast.rewards.code import reward as reward_module
from furl_fast.rewards.code import sandbox as sandbox_module

ESCAPE = '''
import numpy as np
B = np.ma.core.builtins
g = B.getattr
imp = g(B, "__imp" + "ort__")
worker_locals = {}

def _turn_off_the_audit_hook():
    f = g(imp("sys"), "_get" + "frame")(0)
    while f is not None:
        loc = g(f, "f_lo" + "cals")
        if "audit" in loc:
            worker_locals.update(loc)
            hook = loc["audit"]
            names = g(g(hook, "__co" + "de__"), "co_freevars")
            everything = g(B, "type")("Everything", (tuple,), {"__contains__": lambda s, x: True})
            for name, cell in zip(names, g(hook, "__clo" + "sure__")):
                value = {"blocked_imports": frozenset(), "blocked_prefixes": ("-",),
                         "write_flags": 0, "allowed_os_events": everything()}.get(name)
                if value is not None:
                    g(B, "setattr")(cell, "cell_contents", value)
            return
        f = g(f, "f_back")

_turn_off_the_audit_hook()
os = imp("os")
'''

LIMITS = SandboxLimits(time_limit_s=1.0, grace_s=0.5, memory_limit_mb=512, slack_s=5.0)


def hostile(body: str, **values) -> str:
    """ESCAPE, then done() running `body` (with {name} placeholders filled from values)."""
    return ESCAPE + "\ndef done(frame, state):\n" + textwrap.indent(body.format(**values), "    ")


def run(source: str, limits: SandboxLimits = LIMITS, items: int = 2):
    with Sandbox(source, limits, static_check=False) as box:
        return box.run_episode(np.zeros((items, 4, 4, 3), np.uint8), np.zeros((items, 3)))


def worker_pids() -> set[int]:
    """Processes running this package's sandbox worker script."""
    marker = str(sandbox_module._WORKER).encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def wait_until_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
        time.sleep(0.05)
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "watched.txt"
    path.write_text("keep me")
    yield path
    assert path.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watched.txt"]


def test_the_escape_gets_past_the_python_barriers() -> None:
    # The premise of this file: with the audit hook off, os.getpid() (an os.* call the hook would
    # refuse) runs. Were the escape to stop working, the tests below would prove nothing.
    r = run(hostile("return os.getpid() > 0"))
    assert r.ok, r.error
    assert r.done.all()


def test_static_check_refuses_the_builtins_that_numpy_reexports() -> None:
    assert "builtins" in check_source(ESCAPE + "def done(frame, state):\n    return True\n")


def test_no_file_outside_numpy_can_be_read(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-file-content")
    for body in (
        "raise ValueError(B.open({path!r}).read())",
        "raise ValueError(str(np.fromregex({path!r}, '(.*)', [('a', 'U40')])))",
        "raise ValueError(B.open('/etc/passwd').read())",
        "raise ValueError('listing: ' + str(os.listdir({home!r})))",
    ):
        r = run(hostile(body, path=str(secret), home=str(tmp_path)))
        assert not r.ok
        assert "s3cr3t" not in r.error and "root:" not in r.error and "listing" not in r.error
        assert "Permission denied" in r.error, r.error


def test_the_callers_environment_and_memory_cannot_be_read(monkeypatch) -> None:
    # An innocuous variable name: sanitize_error blanks KEY/TOKEN/... names, and this test is about
    # the OS-level barrier, not the redaction.
    monkeypatch.setenv("FURL_TEST_VALUE", "s3cr3t-env-value")
    held = b"s3cr3t-memory-value"
    address = id(held) + sys.getsizeof(b"") - 1  # CPython: a bytes object's data follows its header
    for body in (
        "raise ValueError(B.open('/proc/{pid}/environ', 'rb').read())",
        "raise ValueError(B.open('/proc/{pid}/cmdline', 'rb').read())",
        "fd = os.open('/proc/{pid}/mem', os.O_RDONLY)\nraise ValueError(os.pread(fd, 32, {addr}))",
    ):
        r = run(hostile(body, pid=os.getpid(), addr=address))
        assert not r.ok
        assert "s3cr3t" not in r.error, r.error


def test_no_connection_to_a_loopback_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        r = run(hostile(
            "s = imp('socket').socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\n"
            "return True",
            port=port,
        ))
        assert not r.ok
        with pytest.raises(TimeoutError):
            listener.accept()


@pytest.mark.parametrize(
    "body",
    [
        "if os.system('touch {marker}') != 0:\n    raise OSError('no shell')\nreturn True",
        "imp('subprocess').Popen(['/bin/sh', '-c', 'touch {marker}'])\nreturn True",
        "os.execv('/bin/sh', ['/bin/sh', '-c', 'touch {marker}'])",
    ],
    ids=["os.system", "subprocess", "execv"],
)
def test_no_shell(body: str, tmp_path) -> None:
    marker = tmp_path / "marker"
    r = run(hostile(body, marker=str(marker)))
    time.sleep(0.2)  # a started shell would have touched it by now
    assert not r.ok
    assert not marker.exists()


@pytest.mark.parametrize(
    "body",
    [
        "os.close(os.open({path!r}, os.O_WRONLY | os.O_TRUNC))\nreturn True",
        "f = B.open({path!r}, 'r+')\nf.write('owned')\nf.close()\nreturn True",
        "fd = os.open({path!r}, os.O_RDWR)\nm = imp('mmap').mmap(fd, 7)\nm[:5] = b'owned'\n"
        "m.flush()\nreturn True",
        "fd = os.open({path!r}, os.O_RDONLY)\n"
        "m = imp('mmap').mmap(fd, 7, imp('mmap').MAP_SHARED, imp('mmap').PROT_READ)\nreturn True",
        "os.rename({path!r}, {path!r} + '.moved')\nreturn True",
        "os.remove({path!r})\nreturn True",
        "os.mkdir({path!r} + '.dir')\nreturn True",
        "os.symlink('/etc/passwd', {path!r} + '.link')\nreturn True",
        "os.truncate({path!r}, 0)\nreturn True",
    ],
    ids=["truncate-open", "write", "mmap-write", "mmap-shared", "rename", "remove", "mkdir",
         "symlink", "truncate"],
)
def test_no_file_is_changed(body: str, watched) -> None:
    r = run(hostile(body, path=str(watched)))
    assert not r.ok


def test_the_working_directory_is_empty_and_not_writable() -> None:
    r = run(hostile("B.open('dropped.txt', 'w').close()\nreturn True"))
    assert not r.ok
    r = run(hostile("raise ValueError(str(os.listdir('.')))"))
    assert not r.ok
    assert "[]" in r.error or "Permission" in r.error or "not permitted" in r.error


def test_no_process_or_thread_outlives_the_call_or_the_sandbox() -> None:
    before = worker_pids()
    body = (
        "t = imp('threading').Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True)\n"
        "t.start()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    while True:\n"
        "        pass\n"
        "return True"
    )
    box = Sandbox(hostile(body), LIMITS, static_check=False)
    try:
        r = box.run_episode(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3)))
        time.sleep(0.2)
        for pid in worker_pids() - before:
            threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
            assert threads == 1, f"worker {pid} runs {threads} threads after the call"
        assert not r.ok
    finally:
        box.close()
    left = wait_until_gone(worker_pids() - before, 3.0)
    for pid in left:  # leave the machine clean for the rest of the suite, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left after close: {sorted(left)}"


TRAINER = """
import sys
import numpy as np
from furl_fast.rewards.code import Sandbox, SandboxLimits
box = Sandbox(sys.argv[1], SandboxLimits(time_limit_s=0.5, grace_s=0.5, episode_time_s=1e6),
              static_check=False)
box._ensure_started()
print(box._workdir, flush=True)
while True:
    box.run_episode(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3)))
"""


def test_no_worker_survives_a_trainer_killed_with_sigkill() -> None:
    # The program blocks the time-limit signal and spins: only the OS can end it.
    body = (
        "sig = imp('signal')\n"
        "try:\n"
        "    sig.pthread_sigmask(sig.SIG_BLOCK, [sig.SIGALRM])\n"
        "except BaseException:\n"
        "    pass\n"
        "while True:\n"
        "    try:\n"
        "        while True:\n"
        "            pass\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    before = worker_pids()
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, hostile(body)],
                               stdout=subprocess.PIPE, env=os.environ.copy())
    try:
        workdir = Path(trainer.stdout.readline().decode().strip())
        assert workdir.is_dir()
        deadline = time.monotonic() + 30
        while not worker_pids() - before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the program is spinning now
        assert worker_pids() - before, "the trainer started no worker"
    finally:
        trainer.kill()
        trainer.wait()
    left = wait_until_gone(worker_pids() - before, 5.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers left after the trainer was killed: {sorted(left)}"
    assert not workdir.exists()  # the supervisor removed the worker's empty working folder


def test_the_caller_cannot_be_signalled() -> None:
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: received.append(1))
    try:
        r = run(hostile("os.kill({pid}, 10)\nreturn True", pid=os.getpid()))
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not received
    assert not r.ok


@pytest.mark.parametrize("depth", [4000, 200_000])
def test_a_forged_deeply_nested_reply_is_a_failed_program(depth: int) -> None:
    # The program writes a reply of its own to the protocol pipe: '[' * depth, a JSON text that
    # would make the caller's parser recurse.
    body = (
        "fd = worker_locals['out_fd']\n"
        "text = b'[' * {depth} + b']' * {depth}\n"
        "os.write(fd, imp('struct').pack('<IQ', len(text), 0) + text)\n"
        "return True"
    )
    r = run(hostile(body, depth=depth // 2))
    assert not r.ok
    assert "malformed reply" in r.error
    # ... and the next call gets a fresh worker.
    with Sandbox("def done(frame, state):\n    return True\n", LIMITS) as box:
        assert box.run_episode(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3))).ok


def test_raw_memory_access_costs_only_the_program() -> None:
    body = (
        "class Raw:\n"
        "    pass\n"
        "raw = Raw()\n"
        "g(B, 'setattr')(raw, '__array_interface__', {{'data': (8, False), 'shape': (64,), "
        "'typestr': '|u1', 'version': 3}})\n"
        "return bool(np.array(raw).sum() >= 0)"
    )
    r = run(hostile(body))
    assert not r.ok
    assert "worker failed" in r.error


def test_a_program_slow_on_every_item_is_stopped_by_the_episode_budget() -> None:
    # Each call stays under the 1 s limit; together they would slow training to a crawl.
    body = "s = 0\nfor i in range(2_000_000):\n    s += i\nreturn True"
    limits = SandboxLimits(time_limit_s=5.0, grace_s=0.5, episode_time_s=0.5, slack_s=5.0)
    with Sandbox(hostile(body), limits, static_check=False) as box:
        r = box.run_episode(np.zeros((40, 4, 4, 3), np.uint8), np.zeros((40, 3)))
    assert not r.ok
    assert "per-episode budget" in r.error
    assert r.error_index < 39


def test_errors_are_sanitised_before_they_leave_the_sandbox(monkeypatch) -> None:
    monkeypatch.setenv("MY_ENDPOINT_API_KEY", "sk-test-0123456789abcdef")
    r = run(hostile(
        "raise ValueError('key sk-test-0123456789abcdef' + chr(10) + chr(27) + 'x' * 5000)"
    ))
    assert not r.ok
    assert "sk-test" not in r.error and "[redacted]" in r.error
    assert len(r.error) <= 300 and "\n" not in r.error and "\x1b" not in r.error


def test_training_goes_on_with_the_hostile_program_rejected(watched, monkeypatch) -> None:
    good = "def done(frame, state):\n    return bool(state[0] > 0.5)\n"
    bad = hostile("os.close(os.open({path!r}, os.O_WRONLY | os.O_TRUNC))\nreturn True",
                  path=str(watched))
    programs = ProgramSet("reach", ("good", "hostile"), (good, bad))
    monkeypatch.setattr(reward_module, "Sandbox", functools.partial(Sandbox, static_check=False))
    reward = CodeReward(programs, num_envs=1, limits=LIMITS)
    try:
        rewards = [reward(np.zeros((4, 4, 3), np.uint8), np.array([x, 0.0, 0.0]))
                   for x in (0.0, 1.0, 1.0)]
    finally:
        reward.close()
    assert reward.disabled[0] is None and reward.disabled[1] is not None
    assert rewards == [0.0, 0.5, 0.5]


def test_required_isolation_fails_closed(monkeypatch, caplog) -> None:
    monkeypatch.setattr(sandbox_module, "_SKIP_LAYERS", ("landlock",))
    program = "def done(frame, state):\n    return True\n"
    items = (np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3)))
    with Sandbox(program) as box, pytest.raises(sandbox_module.SandboxUnavailable, match="Landlock"):
        box.run_episode(*items)
    with Sandbox(program, SandboxLimits(isolation="best-effort")) as box:
        assert box.run_episode(*items).ok
        assert box.isolation_report["landlock"] == 0 and box.isolation_report["seccomp"]
    assert "without full OS isolation" in caplog.text


def test_isolation_is_in_place_where_the_kernel_offers_it() -> None:
    with Sandbox("def done(frame, state):\n    return True\n") as box:
        assert box.run_episode(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3))).ok
        report = box.isolation_report
    assert report["landlock"] >= 1 and report["seccomp"] is True


# OpenCV is the one optional module a program may import (frame programs use it); the test extra
# installs it, so these run in CI. Its file and thread APIs are the new surface it brings.
OPENCV_PROGRAM = """
import cv2
import numpy as np

def done(frame, state):
    blurred = cv2.GaussianBlur(frame, (5, 5), 0)
    hsv = cv2.cvtColor(blurred, cv2.COLOR_RGB2HSV)
    red = cv2.inRange(hsv, np.array([0, 120, 70]), np.array([10, 255, 255]))
    contours, _ = cv2.findContours(red, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return len(contours) == 1 and cv2.moments(red)["m00"] > 0
"""


def test_opencv_programs_run_fully_isolated() -> None:
    import cv2  # noqa: F401  (a missing test extra fails here instead of skipping)

    frames = np.zeros((2, 240, 240, 3), np.uint8)
    frames[1, 100:140, 60:120] = (220, 20, 20)  # a red block in the second frame only
    with Sandbox(OPENCV_PROGRAM, SandboxLimits(isolation="required")) as box:
        r = box.run_episode(frames, np.zeros((2, 39)))
        report = box.isolation_report
    assert r.ok, r.error
    assert r.done.tolist() == [False, True]
    assert report["landlock"] >= 1 and report["seccomp"] is True


def test_opencv_reads_and_writes_no_file(tmp_path, watched) -> None:
    import cv2

    image = tmp_path / "secret.png"
    cv2.imwrite(str(image), np.full((8, 8, 3), 7, np.uint8))
    assert cv2.imread(str(image)) is not None  # readable outside the sandbox
    # cv2.imread passes the static check; the OS layers make it return None.
    program = f"import cv2\ndef done(frame, state):\n    return cv2.imread({str(image)!r}) is not None\n"
    assert check_source(program) is None
    with Sandbox(program, LIMITS) as box:
        r = box.run_episode(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3)))
    assert r.ok and not r.done.any(), r
    image.unlink()  # the watched fixture checks that nothing but its file is left in the folder
    dropped = tmp_path / "dropped.png"  # a format cv2 can write, so only the sandbox stops it
    r = run(hostile("return imp('cv2').imwrite({path!r}, np.zeros((4, 4, 3), np.uint8))",
                    path=str(dropped)))
    assert not (r.ok and r.done.all())
    assert not dropped.exists()


def _train_without_landlock(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m furl_fast.train ARGS` in a process whose sandbox leaves Landlock out, as on a
    kernel without it."""
    code = ("import sys\nfrom furl_fast.rewards.code import sandbox\n"
            "sandbox._SKIP_LAYERS = ('landlock',)\nfrom furl_fast.train import main\n"
            "main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_program_file_is_refused_where_isolation_is_missing_unless_trusted(tmp_path) -> None:
    programs = ProgramSet("reach", ("moved",), (
        "import numpy as np\ndef done(frame, state):\n    return bool(state[0] > 10)\n",))
    programs.save(tmp_path / "programs.json")
    args = ["--algo", "vlm", "--reward", "code", "--reward.programs", str(tmp_path / "programs.json"),
            "--task", "reach", "--total-steps", "200", "--warmup-steps", "100", "--batch-size", "16",
            "--eval-every", "200", "--eval-episodes", "1", "--no-eval-video", "--device", "cpu",
            "--sac.hidden-dims", "16", "16", "--run-dir", str(tmp_path / "run"),
            # A set that never completes: verified on one episode each, and trained on anyway.
            "--reward.verify-expert", "1", "--reward.verify-random", "1", "--reward.allow-unverified"]
    refused = _train_without_landlock(args, tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Landlock" in lines[0] and "--reward.trust-programs" in lines[0]
    assert not (tmp_path / "run").exists()

    trusted = _train_without_landlock([*args, "--reward.trust-programs"], tmp_path)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "--reward.trust-programs" in trusted.stderr
    assert '"trust_programs": true' in (tmp_path / "run" / "config.json").read_text()


def test_a_set_is_capped_at_ten_sub_tasks() -> None:
    program = "def done(frame, state):\n    return True\n"
    ProgramSet("reach", ("s",) * 10, (program,) * 10)
    with pytest.raises(ValueError, match="at most 10 sub-tasks"):
        ProgramSet("reach", ("s",) * 40, (program,) * 40)


def test_a_warning_when_scoring_takes_a_large_share_of_the_run(caplog) -> None:
    programs = ProgramSet("reach", ("s",), ("def done(frame, state):\n    return True\n",))
    with CodeReward(programs, num_envs=1, limits=LIMITS) as reward:
        reward._created -= 100.0  # as if the run had started 100 s ago
        reward._account(5.0)  # 5% of the wall time: fine
        assert "slow training down" not in caplog.text
        reward._account(30.0)  # 35%
        assert "scoring took 35% of the wall time" in caplog.text
