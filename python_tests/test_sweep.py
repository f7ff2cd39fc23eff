"""Sweeps on Ray: a tiny grid end to end (interrupted, restarted, a worker killed), a permanently
failing run, the results table on synthetic runs, and the message without Ray."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from furl_fast import sweep
from furl_fast.metrics import mean_std

TASKS, ALGOS, SEEDS = ("reach", "drawer-close"), ("sac", "vlm"), (0, 1)
STEPS = 200  # checkpoints every 50 steps leave a window in which a run is half done
RUNS = [f"{t}/fixed/{a}-sac/seed{s}" for s in SEEDS for t in TASKS for a in ALGOS]
ATTEMPT = "=== furl_fast.sweep attempt"


def train_flags(model: str, pretrained: str = "none") -> list[str]:
    return ["--total-steps", str(STEPS), "--warmup-steps", "100", "--batch-size", "16",
            "--buffer-size", "1000", "--eval-every", str(STEPS), "--checkpoint-every", "50",
            "--log-every", "50", "--vlm.model", model, "--vlm.pretrained", pretrained,
            "--sac.hidden-dims", "32", "32", "--no-eval-video"]


def start_sweep(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """The sweep CLI in its own session, so the test can end whatever Ray leaves behind it."""
    env = dict(os.environ, FURL_FAST_CACHE=str(cwd / "cache"))
    return subprocess.Popen([sys.executable, "-m", "furl_fast.sweep", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def end_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def trainers(results: Path) -> dict[int, tuple[int, Path]]:
    """{pid: (parent pid, run dir)} of the live furl_fast.train processes working under results."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            args = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "furl_fast.train" not in args:
            continue
        flag = "--resume" if "--resume" in args else "--run-dir"
        if flag in args and results in Path(args[args.index(flag) + 1]).parents:
            found[int(proc.name)] = (parent, Path(args[args.index(flag) + 1]))
    return found


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert proc.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return value


def state(results: Path) -> tuple[set[str], dict[str, int]]:
    """(finished runs, {unfinished run: checkpoint step})."""
    finished, checkpointed = set(), {}
    for run in RUNS:
        if sweep.is_finished(results / run):
            finished.add(run)
        elif (step := sweep.checkpoint_step(results / run)) is not None:
            checkpointed[run] = step
    return finished, checkpointed


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_model):
    """2 tasks x 2 algos x 2 seeds on a local Ray instance: the first sweep gets SIGTERM once a run has
    finished and another is half done; the restarted sweep loses one Ray worker mid-run."""
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("sweep")
    results = root / "results"
    args = ["--tasks", *TASKS, "--algos", *ALGOS, "--seeds", *map(str, SEEDS), "--agent", "sac",
            "--results-dir", str(results), "--num-cpus", "2", "--retries", "1", "--summary-every", "2",
            "--", *train_flags(tiny_model)]

    first_log = root / "first.log"
    first = start_sweep(args, root, first_log)
    try:
        wait_for(lambda: all(state(results)), first, first_log)
        first.send_signal(signal.SIGTERM)
        first_code = first.wait(timeout=120)
    finally:
        end_session(first)
    deadline = time.time() + 30  # Ray kills a dead worker's children; give it a moment
    while trainers(results) and time.time() < deadline:
        time.sleep(0.5)
    orphans = trainers(results)
    finished, checkpointed = state(results)
    snapshot = {run: {name: (results / run / name).read_bytes() for name in
                      ("train.log", "eval.json", "config.json", "metrics.csv")} for run in finished}
    # A run the first sweep started but stopped before its first checkpoint already has an attempt.
    attempts_before = {run: (results / run / "train.log").read_text().count(ATTEMPT)
                       if (results / run / "train.log").exists() else 0 for run in RUNS}

    second_log = root / "second.log"
    second = start_sweep(args, root, second_log)
    try:
        # Kill the Ray worker of a run that checkpointed during this sweep.
        def victim():
            for parent, run_dir in trainers(results).values():
                run = str(run_dir.relative_to(results))
                if run not in checkpointed and (sweep.checkpoint_step(run_dir) or 0) > 0:
                    return parent, run
            return None

        worker, killed_run = wait_for(victim, second, second_log)
        worker_cmd = (Path("/proc") / str(worker) / "cmdline").read_bytes()
        os.kill(worker, signal.SIGKILL)
        second_code = second.wait(timeout=900)
    finally:
        end_session(second)
    return SimpleNamespace(results=results, first_code=first_code, first_log=first_log.read_text(),
                           orphans=orphans, checkpointed=checkpointed, snapshot=snapshot,
                           attempts_before=attempts_before,
                           second_code=second_code, second_log=second_log.read_text(),
                           worker_cmd=worker_cmd, killed_run=killed_run)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_sweep_completes_and_writes_the_table(tiny_sweep):
    results = tiny_sweep.results
    assert tiny_sweep.second_code == 0, tiny_sweep.second_log[-3000:]
    assert all(sweep.is_finished(results / run) for run in RUNS)
    rows = read_csv(results / "results.csv")
    assert [(r["task"], r["algo"]) for r in rows] == [(t, a) for t in sorted(TASKS) for a in ALGOS]
    table = (results / "results.md").read_text()
    for row in rows:
        evals = [json.loads((results / row["task"] / "fixed" / f"{row['algo']}-sac" / f"seed{s}" /
                             "eval.json").read_text()) for s in SEEDS]
        assert all(e["step"] == STEPS for e in evals)
        mean, std = mean_std([e["eval/success"] for e in evals])
        assert float(row["success_mean"]) == pytest.approx(mean)
        assert float(row["success_std"]) == pytest.approx(std)
        assert (row["goal"], row["agent"], row["n_seeds"], row["seeds"]) == ("fixed", "sac", "2", "0 1")
        assert f"{mean:.2f} ± {std:.2f} (2)" in table
    assert "| task | goal | sac | vlm |" in table
    for task in TASKS:
        assert (results / "plots" / f"{task}-fixed.png").stat().st_size > 10_000
    assert "sweep: 8/8 done" in tiny_sweep.second_log
    # Two CPUs, one per run: never more than two running, the rest queued by Ray.
    running = [int(line.split(" running")[0].rsplit(" ", 1)[1]) for log in
               (tiny_sweep.first_log, tiny_sweep.second_log) for line in log.splitlines()
               if "furl_fast.sweep: sweep:" in line]
    assert max(running) == 2


@pytest.mark.slow
def test_interrupted_sweep_restarts_without_rerunning_finished_runs(tiny_sweep):
    results, snapshot = tiny_sweep.results, tiny_sweep.snapshot
    assert tiny_sweep.first_code == 130, tiny_sweep.first_log[-3000:]
    assert "interrupted" in tiny_sweep.first_log
    assert not tiny_sweep.orphans, "trainers kept running after the sweep was stopped"
    assert snapshot and tiny_sweep.checkpointed
    assert f"{len(snapshot)} finished before (skipped), {8 - len(snapshot)} to run" in \
        tiny_sweep.second_log
    for run, files in snapshot.items():  # not trained again: every file byte for byte as before
        assert {name: (results / run / name).read_bytes() for name in files} == files, run
        assert files["train.log"].decode().count(ATTEMPT) == 1
    for run, step in tiny_sweep.checkpointed.items():
        log = (results / run / "train.log").read_text()
        last_attempt = log.split(ATTEMPT)[-1]
        assert f"--resume {results / run}" in last_attempt.splitlines()[0]
        assert f"resumed {results / run} at step {step}" in last_attempt
        steps = [int(line.split(",")[0]) for line in
                 (results / run / "metrics.csv").read_text().splitlines()[1:]]
        assert steps == sorted(steps) and steps[-1] == STEPS


@pytest.mark.slow
def test_killed_worker_is_reported_and_retried(tiny_sweep):
    results, run = tiny_sweep.results, tiny_sweep.killed_run
    assert tiny_sweep.worker_cmd.startswith(b"ray::")  # the trainer's parent was a Ray worker
    log_path = results / run / "train.log"
    assert f"FAILED {run} (attempt 1 of 2): WorkerCrashedError" in tiny_sweep.second_log
    assert f"retrying; log: {log_path}" in tiny_sweep.second_log
    attempts = log_path.read_text().split(ATTEMPT)[1 + tiny_sweep.attempts_before[run]:]
    assert len(attempts) == 2 and "--resume" in attempts[1].splitlines()[0]  # this sweep's two
    assert sweep.is_finished(results / run)


@pytest.mark.slow
def test_failing_run_is_retried_and_reported(tiny_sweep, tmp_path):
    """relay with weights that do not exist fails at start-up every time; the finished runs of the
    same results directory are skipped and still make the table."""
    results = tmp_path / "results"
    shutil.copytree(tiny_sweep.results, results)
    log = tmp_path / "sweep.log"
    proc = start_sweep(["--tasks", "reach", "--algos", "sac", "vlm", "relay", "--seeds", "0",
                        "--results-dir", str(results), "--num-cpus", "2", "--retries", "2", "--",
                        *train_flags("RN50", pretrained="/nonexistent/weights.pt")], tmp_path, log)
    try:
        code = proc.wait(timeout=600)
    finally:
        end_session(proc)
    out = log.read_text()
    failed = results / "reach/fixed/relay-sac/seed0"
    assert code == 1, out[-3000:]
    assert "2 finished before (skipped), 1 to run" in out
    for attempt in (1, 2, 3):
        assert f"FAILED reach/fixed/relay-sac/seed0 (attempt {attempt} of 3): trainer exit code 2" in out
    assert f"reach/fixed/relay-sac/seed0: log {failed / 'train.log'}" in out
    train_log = (failed / "train.log").read_text()
    assert train_log.count(ATTEMPT) == 3 and "checkpoint file not found" in train_log
    rows = read_csv(results / "results.csv")
    assert {(r["task"], r["algo"]) for r in rows} == {(t, a) for t in TASKS for a in ALGOS}
    assert f"relay-sac/seed0: {failed / 'train.log'}" in (results / "results.md").read_text()


def run_while_locked(run_dir: Path, train_args: list[str], while_locked) -> dict:
    """execute_run on a run whose lock another process (here: this test) holds: it must wait, and
    see the directory as the lock holder left it."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    with open(run_dir / sweep.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: result.update(
            sweep.execute_run(str(run_dir), train_args, 1, 1)))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not (run_dir / sweep.RUN_LOG).exists()
        while_locked()
    thread.join(timeout=300)
    assert not thread.is_alive()
    return result


def test_run_finished_by_the_lock_holder_is_not_started_again(tmp_path):
    run_dir = tmp_path / "run"

    def finish():
        (run_dir / "config.json").write_text(json.dumps({"total_steps": 100}))
        (run_dir / "eval.json").write_text(json.dumps({"step": 100, "eval/success": 1.0}))

    result = run_while_locked(run_dir, ["--no-such-flag"], finish)
    assert result == {"code": 0, "finished": True, "resumed_from": None, "seconds": None}
    assert not (run_dir / sweep.RUN_LOG).exists()  # the trainer was not invoked


def test_run_without_checkpoint_starts_from_a_clean_directory(tmp_path):
    """What a run killed before its first checkpoint leaves behind is removed, not appended to."""
    run_dir = tmp_path / "run"

    def leave_partial_run():
        (run_dir / "config.json").write_text(json.dumps({"total_steps": 100}))
        (run_dir / "metrics.csv").write_text("step,name,value\n10,charts/episode_return,-5.0\n")
        (run_dir / "tb").mkdir()

    result = run_while_locked(run_dir, ["--task", "no-such-task"], leave_partial_run)
    assert result["code"] == 2 and not result["finished"] and result["resumed_from"] is None
    assert sorted(p.name for p in run_dir.iterdir()) == [sweep.LOCK_FILE, sweep.RUN_LOG]
    log = (run_dir / sweep.RUN_LOG).read_text()
    assert log.count(ATTEMPT) == 1 and "--task no-such-task is unknown" in log


def write_run(run_dir: Path, algo: str, seed: int, success: float, step: int, total: int = 100,
              **config_fields) -> None:
    run_dir.mkdir(parents=True)
    config = {"task": "push-v3", "goal": "random", "algo": algo, "agent": "drq", "seed": seed,
              "total_steps": total, **config_fields}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "eval.json").write_text(json.dumps({"step": step, "eval/success": success,
                                                   "eval/ever_success": 1.0}))
    (run_dir / "metrics.csv").write_text(f"step,name,value\n{step},eval/success,{success}\n")


def test_table_from_synthetic_runs(tmp_path):
    results = tmp_path / "results"
    for seed, success in enumerate([1.0, 0.0, 1.0]):
        write_run(results / f"furl/s{seed}", "furl", seed, success, step=100)
    write_run(results / "sac/s0", "sac", 0, 0.3, step=100)
    write_run(results / "sac/s1", "sac", 1, 0.9, step=50)  # stopped before its last evaluation
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--results-dir", str(results), "--report-only"])
    assert exit_info.value.code == 0
    rows = read_csv(results / "results.csv")
    assert [(r["task"], r["goal"], r["algo"], r["agent"], r["n_seeds"], r["seeds"]) for r in rows] == \
        [("push", "random", "sac", "drq", "1", "0"), ("push", "random", "furl", "drq", "3", "0 1 2")]
    assert float(rows[0]["success_mean"]) == 0.3 and float(rows[0]["success_std"]) == 0.0
    assert float(rows[1]["success_mean"]) == pytest.approx(2 / 3)
    assert float(rows[1]["success_std"]) == pytest.approx((2 / 9) ** 0.5)  # population std of 1, 0, 1
    table = (results / "results.md").read_text()
    assert "| task | goal | sac | furl |" in table
    assert "| push | random | 0.30 ± 0.00 (1) | 0.67 ± 0.47 (3) |" in table
    assert f"- sac/s1: {results / 'sac/s1/train.log'}" in table
    assert (results / "plots" / "push-random.png").exists()


def test_dense_env_reward_and_chosen_rewards_get_their_own_runs_and_columns(tmp_path):
    cfg = sweep.SweepConfig(tasks=("reach",), algos=("sac", "vlm"), env_rewards=("sparse", "dense"),
                            seeds=(0,))
    runs = sweep.grid(cfg)
    assert sorted(r.name for r in runs) == ["reach/fixed/sac-sac-dense/seed0", "reach/fixed/sac-sac/seed0",
                                            "reach/fixed/vlm-sac-dense/seed0", "reach/fixed/vlm-sac/seed0"]
    dense = next(r for r in runs if r.name == "reach/fixed/sac-sac-dense/seed0")
    assert dense.train_args()[dense.train_args().index("--env-reward") + 1] == "dense"

    results = tmp_path / "results"
    write_run(results / "oracle", "sac", 0, 1.0, step=100, env_reward="dense")
    write_run(results / "sparse", "sac", 0, 0.0, step=100, env_reward="sparse")
    # The built-in hand-written reference programs are no VLM reward: sac+code-ref; a program-set
    # file (written by a VLM through furl_fast.generate_programs) is sac+code.
    write_run(results / "code", "vlm", 0, 0.5, step=100, reward={"name": "code", "programs": None})
    write_run(results / "code-vlm", "vlm", 0, 0.25, step=100,
              reward={"name": "code", "programs": "drawer.json"})
    md, _, _ = sweep.write_report(results)
    rows = read_csv(results / "results.csv")
    assert sorted((r["method"], float(r["success_mean"])) for r in rows) == \
        [("sac", 0.0), ("sac+code", 0.25), ("sac+code-ref", 0.5), ("sac+dense", 1.0)]
    assert "vlm+code" not in md.read_text()
    assert "sac+code-ref" in md.read_text()


def test_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--tasks", "reach", "--results-dir", str(tmp_path / "results")])
    assert exit_info.value.code == 2
    assert 'pip install "furl_fast[sweep]"' in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_grid_flags_after_separator_are_refused(tmp_path, capsys):
    pytest.importorskip("ray")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--tasks", "reach", "--results-dir", str(tmp_path), "--", "--seed", "3"])
    assert exit_info.value.code == 2
    assert "--seed after `--` would apply to every run" in capsys.readouterr().err


def test_a_bare_sweep_starts_nothing(tmp_path, capsys):
    """Without --tasks, --algos and --seeds there is no grid: nothing starts, and the message says
    what to name."""
    pytest.importorskip("ray")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--results-dir", str(tmp_path / "results")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "name the grid: --tasks, --algos, --seeds missing" in err
    assert not (tmp_path / "results").exists()
    with pytest.raises(SystemExit):
        sweep.main(["--tasks", "reach", "--algos", "sac", "--results-dir", str(tmp_path / "r")])
    assert "name the grid: --seeds missing" in capsys.readouterr().err


def test_local_ray_is_bound_to_loopback(tmp_path):
    """The local instance's node (and so every worker and object store address) is 127.0.0.1, not
    an address found by routing towards the outside (in a subprocess: Ray reads the setting when it
    is imported)."""
    pytest.importorskip("ray")
    code = ("from furl_fast import sweep\n"
            "ray = sweep.start_ray(sweep.SweepConfig(num_cpus=1))\n"
            "try:\n"
            "    print('NODES', [n['NodeManagerAddress'] for n in ray.nodes()])\n"
            "    print('WORKER', ray.get(ray.remote(ray.util.get_node_ip_address).remote()))\n"
            "finally:\n"
            "    ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NODES ['127.0.0.1']" in result.stdout and "WORKER 127.0.0.1" in result.stdout
