"""`python -m furl_fast.sweep`: a grid of training runs (tasks x goals x algos x agents x env rewards x
seeds) on Ray.

    python -m furl_fast.sweep --tasks reach drawer-open --algos sac furl --seeds 0 1 2 3 4
    python -m furl_fast.sweep --tasks reach --algos furl --seeds 0 --address auto \
        --gpus-per-run 0.25 -- --preset paper
    python -m furl_fast.sweep --results-dir results --report-only

--tasks, --algos and --seeds have no defaults: a sweep is their product of runs of hours each (the
paper's MT10 x 4 algos x 5 seeds is 200 runs), so any default grid would be a guess that starts
days of work from a bare `furl-sweep`. Naming them is one line, and the sweep says how many runs
it starts. --goals (fixed) and --agents (sac) default to one value each.

Flags after `--` go to every `python -m furl_fast.train` run unchanged (any Config field). Without
--address a local Ray instance is started (a laptop works); --address auto or ray://HOST:10001 joins
a cluster, where --results-dir must be a directory every node sees (a shared filesystem) and every
node needs furl_fast installed.

Each run is one Ray task with its CPU / GPU share (fractional GPUs let small runs share a card). The
task runs the trainer as a subprocess in RESULTS/<task>/<goal>/<algo>-<agent>[-dense]/seed<k>/, logging to
train.log there, so a crash of the trainer fails that run only. A run is finished when its eval.json
holds the final step; starting the same sweep again skips finished runs and continues the others
with `--resume` from their last checkpoint. Failed runs (trainer exit, killed worker) are retried
--retries times and listed with their logs; the sweep exits 1 when some remain failed.

At the end RESULTS/results.md and results.csv hold the success rate at the last evaluation (mean
and std over seeds) per task, goal, algo and agent, and RESULTS/plots/ the learning curves.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from furl_fast._cli import format_seconds, setup_logging, tyro_cli
from furl_fast.config import AGENTS, ALGOS
from furl_fast.metrics import CONFIG_FILE, mean_std, task_name

logger = logging.getLogger("furl_fast.sweep")

RUN_LOG = "train.log"
LOCK_FILE = ".sweep.lock"
EVAL_FILE = "eval.json"
TABLE_MD, TABLE_CSV, PLOTS_DIR = "results.md", "results.csv", "plots"
INSTALL_HINT = ('furl_fast.sweep needs Ray: pip install "furl_fast[sweep]" (or, in a checkout, '
                'pip install ".[sweep]").')
# The sweep sets these per run itself; the same flag after `--` would silently collapse the grid.
GRID_FLAGS = ("--task", "--goal", "--algo", "--agent", "--env-reward", "--seed", "--run-dir", "--resume")


@dataclass(frozen=True)
class SweepConfig:
    """A study: one training run per (task, goal, algo, agent, seed)."""

    tasks: tuple[str, ...] = ()
    """Meta-World v3 tasks (required; the FuRL paper's MT10: reach push pick-place door-open
    drawer-open drawer-close button-press-topdown peg-insert-side window-open window-close)."""
    goals: tuple[Literal["fixed", "random"], ...] = ("fixed",)
    """Goal settings (the paper reports both fixed and random)."""
    algos: tuple[Literal["sac", "vlm", "relay", "furl"], ...] = ()
    """Algorithms (required; furl_fast.train --algo)."""
    agents: Annotated[tuple[Literal["sac", "drq"], ...], tyro.conf.arg(aliases=("--agent",))] = ("sac",)
    """Agents: sac (states) and/or drq (pixels)."""
    env_rewards: tuple[Literal["sparse", "dense"], ...] = ("sparse",)
    """The environment's reward in the critic (furl_fast.train --env-reward): sparse (the paper's
    setting) and/or dense, Meta-World's shaped reward (the oracle row; its runs live in
    <algo>-<agent>-dense/)."""
    seeds: tuple[int, ...] = ()
    """Seeds (required; the paper uses 5); the table reports mean and std over them."""
    results_dir: str = "results"
    """Shared results directory: one run directory per run, the table and the plots."""
    address: str | None = None
    """Ray cluster to join (auto, or ray://HOST:10001); None starts a local Ray instance."""
    num_cpus: int | None = None
    """CPUs of the local Ray instance; None lets Ray count them (ignored with --address)."""
    num_gpus: int | None = None
    """GPUs of the local Ray instance; None lets Ray count them (ignored with --address)."""
    cpus_per_run: float = 1.0
    """CPUs Ray reserves per run; unless the flags after `--` say otherwise each trainer also gets
    --torch-threads of this many (rounded down, at least 1) so runs do not oversubscribe cores."""
    gpus_per_run: float = 0.0
    """GPU share Ray reserves per run (0.25: four runs per card). With 0 each trainer gets --device cpu
    unless the flags after `--` say otherwise, so no run uses a GPU Ray did not give it."""
    retries: int = 1
    """Times a failed run is started again (from its last checkpoint when it has one)."""
    summary_every: float = 30.0
    """Seconds between progress lines (done / running / pending / failed, ETA)."""
    report_only: bool = False
    """Only rebuild results.md, results.csv and plots/ from the run directories (no Ray needed)."""
    train_args: tyro.conf.Suppress[tuple[str, ...]] = ()
    """Flags for every `python -m furl_fast.train`, given after `--` on the command line."""


@dataclass(frozen=True)
class Run:
    task: str
    goal: str
    algo: str
    agent: str
    seed: int
    env_reward: str = "sparse"

    @property
    def name(self) -> str:
        dense = "-dense" if self.env_reward == "dense" else ""
        return f"{self.task}/{self.goal}/{self.algo}-{self.agent}{dense}/seed{self.seed}"

    def train_args(self) -> list[str]:
        return ["--task", self.task, "--goal", self.goal, "--algo", self.algo, "--agent", self.agent,
                "--env-reward", self.env_reward, "--seed", str(self.seed)]


def grid(cfg: SweepConfig) -> list[Run]:
    """Seed-major order: a sweep stopped half-way has results for every task and algo, not all seeds
    of the first ones."""
    runs = [Run(task_name(task), goal, algo, agent, seed, env_reward) for seed in cfg.seeds
            for task in cfg.tasks for goal in cfg.goals for agent in cfg.agents for algo in cfg.algos
            for env_reward in cfg.env_rewards]
    return list(dict.fromkeys(runs))  # "reach" and "reach-v3" are one run


def run_train_args(cfg: SweepConfig) -> list[str]:
    """The flags every run gets: the per-run resource defaults, then the user's flags (which win)."""
    given = {a.split("=")[0] for a in cfg.train_args}
    args = []
    if "--torch-threads" not in given:
        args += ["--torch-threads", str(max(1, int(cfg.cpus_per_run)))]
    if "--device" not in given and cfg.gpus_per_run == 0:
        args += ["--device", "cpu"]
    return args + list(cfg.train_args)


def check(cfg: SweepConfig) -> None:
    """Everything that can be checked before Ray starts; raises ValueError saying what to change."""
    from furl_fast.train import check_config, parse_args

    problems = []
    clashes = sorted({a.split("=")[0] for a in cfg.train_args} & set(GRID_FLAGS))
    if clashes:
        problems.append(f"{', '.join(clashes)} after `--` would apply to every run; the sweep sets them "
                        "per run (use --tasks, --goals, --algos, --agents, --env-rewards, --seeds, "
                        "--results-dir).")
    unnamed = [f"--{name}" for name in ("tasks", "algos", "seeds") if not getattr(cfg, name)]
    if unnamed:
        problems.append(f"name the grid: {', '.join(unnamed)} missing (they have no defaults: every "
                        "combination is a training run of hours), e.g. --tasks reach drawer-open "
                        "--algos sac furl --seeds 0 1 2.")
    for name in ("goals", "agents", "env_rewards"):
        if not getattr(cfg, name):
            problems.append(f"--{name} is empty.")
    if cfg.retries < 0:
        problems.append(f"retries={cfg.retries} must be >= 0.")
    if cfg.cpus_per_run <= 0 or cfg.gpus_per_run < 0:
        problems.append("cpus_per_run must be > 0 and gpus_per_run >= 0.")
    if problems:
        raise ValueError("invalid sweep:\n  - " + "\n  - ".join(problems))
    # Parse the train flags once (tyro exits with its own message on an unknown flag), then check
    # every (task, goal, algo, agent) before any run starts, as the trainer itself would.
    args = parse_args(run_train_args(cfg))
    for run in {dataclasses.replace(r, seed=0) for r in grid(cfg)}:
        check_config(dataclasses.replace(args.config, task=run.task, goal=run.goal, algo=run.algo,
                                         agent=run.agent, env_reward=run.env_reward),
                     args.allow_many_envs)


# ---- one run (executes in a Ray worker) -----------------------------------------------------------


def is_finished(run_dir: Path) -> bool:
    """The trainer writes eval.json at every evaluation and evaluates once more at its last step, so a
    run is finished when eval.json's step has reached the configured total_steps."""
    try:
        step = json.loads((run_dir / EVAL_FILE).read_text())["step"]
        return step >= json.loads((run_dir / CONFIG_FILE).read_text())["total_steps"]
    except (OSError, ValueError, KeyError):
        return False


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint; None without one. ValueError (naming the file) for a
    checkpoint that a resume would refuse: damaged, of an earlier version, or not furl_fast's."""
    from furl_fast.runs import CHECKPOINT_DIR, STATE_FILE, load_state

    state = run_dir / CHECKPOINT_DIR / STATE_FILE
    if not state.exists():
        return None
    return load_state(state)["step"]


def clear_run_dir(run_dir: Path) -> None:
    """A run killed before its first checkpoint leaves config.json, metrics.csv and TensorBoard events
    that a fresh start would append to; only the log (all attempts) and the lock stay."""
    for entry in run_dir.iterdir():
        if entry.name in (RUN_LOG, LOCK_FILE):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def execute_run(run_dir: str, train_args: list[str], attempt: int, attempts: int,
                token: str = "") -> dict[str, Any]:
    """Trains one run to the end in a subprocess (resuming from its checkpoint when there is one) and
    returns {"code", "finished", "resumed_from", "seconds"} (seconds None: it was finished already).
    The trainer's failures are returned, not raised, so the driver can tell them from a lost worker.
    token: written into the lock file once the lock is taken, so the driver can tell it is running."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "a+") as lock:
        # The trainer inherits this lock. A trainer that outlives its worker (Ray sends it SIGTERM,
        # and it checkpoints before it exits; on Linux only) or a second sweep on the same directory
        # holds it, and this run waits for it instead of writing into the same directory at once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(f"{token} {socket.gethostname()} {os.getpid()}\n")
        lock.flush()
        if is_finished(path):  # by a trainer that held the lock
            return {"code": 0, "finished": True, "resumed_from": None, "seconds": None}
        try:
            resumed_from = checkpoint_step(path)
        except (OSError, ValueError) as exc:  # left as it is: the log says why, the user decides
            with open(path / RUN_LOG, "a") as log:
                log.write(f"furl_fast.sweep: cannot resume {path}: {exc}\n")
            return {"code": 2, "finished": False, "resumed_from": None, "seconds": 0.0}
        if resumed_from is None:
            clear_run_dir(path)
            argv = [*train_args, "--run-dir", str(path)]
        else:
            argv = ["--resume", str(path)]
        cmd = [sys.executable, "-m", "furl_fast.train", *argv]
        start = time.time()
        with open(path / RUN_LOG, "a") as log:
            log.write(f"=== furl_fast.sweep attempt {attempt} of {attempts} on {socket.gethostname()} "
                      f"at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  pass_fds=(lock.fileno(),), check=False).returncode
    return {"code": code, "finished": code == 0 and is_finished(path), "resumed_from": resumed_from,
            "seconds": time.time() - start}


# ---- the driver ---------------------------------------------------------------------------------


@dataclass
class Attempt:
    run: Run
    number: int
    token: str  # in the run's lock file once the task holds the lock (it is running, not queued)


def holds_lock(run_dir: Path, token: str) -> bool:
    try:
        return (run_dir / LOCK_FILE).read_text().split(" ", 1)[0] == token
    except OSError:
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def local_ray_environment() -> None:
    """A local Ray instance serves this machine only, so it should neither look for a network
    address nor report to the outside. Unless told otherwise, Ray finds its node's IP by routing
    towards a public address (8.8.8.8) and reports usage statistics; single-machine mode (its switch
    is named for Windows and macOS, where it is the default) binds it to 127.0.0.1 instead. Ray reads
    both variables when it is imported, so this must run first; the user's own values win."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_ray(cfg: SweepConfig):
    """ray.init for the sweep: joins cfg.address, or starts a local instance on 127.0.0.1 with
    cfg.num_cpus / num_gpus. Returns the ray module."""
    if not cfg.address:
        local_ray_environment()
    import ray

    local = {} if cfg.address else {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                                    "_node_ip_address": "127.0.0.1"}
    ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, **local)
    return ray


def run_sweep(cfg: SweepConfig) -> int:
    """Runs every unfinished run of the grid on Ray; returns 0, or 1 when runs remain failed (130 when
    interrupted)."""
    if not cfg.address:
        local_ray_environment()
    import ray

    results = Path(cfg.results_dir).resolve()
    runs = grid(cfg)
    todo = [r for r in runs if not is_finished(results / r.name)]
    logger.info("%d runs in %s: %d finished before (skipped), %d to run", len(runs), results,
                len(runs) - len(todo), len(todo))
    if todo:
        start_ray(cfg)
        # After ray.init, which installs its own SIGTERM handler: a SIGTERM ends the sweep like
        # Ctrl-C, through ray.shutdown (the run directories keep their last checkpoints).
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            failed = drive(cfg, results, todo, len(runs) - len(todo), ray)
        except KeyboardInterrupt:
            logger.warning("interrupted; finished runs are kept, the others continue from their last "
                           "checkpoint when the same command is run again")
            return 130
        finally:
            ray.shutdown()
    else:
        failed = []
    md, csv_path, plots = write_report(results)
    print(md.read_text())
    print(f"table: {md}, {csv_path}; learning curves: {', '.join(map(str, plots)) or 'none'}")
    if failed:
        print(f"{len(failed)} run(s) failed after {cfg.retries + 1} attempt(s):", file=sys.stderr)
        for run in failed:
            print(f"  {run.name}: log {results / run.name / RUN_LOG}", file=sys.stderr)
        return 1
    return 0


def drive(cfg: SweepConfig, results: Path, todo: list[Run], done_before: int, ray) -> list[Run]:
    """Submits every run (Ray queues them by their resource share) and follows them to the end,
    retrying failures; returns the runs that failed every attempt."""
    remote = ray.remote(execute_run)
    train_args = run_train_args(cfg)
    attempts = cfg.retries + 1
    in_flight: dict[Any, Attempt] = {}
    sweep_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"

    def submit(run: Run, number: int) -> None:
        token = f"{sweep_id}/{run.name}/{number}"
        ref = remote.options(num_cpus=cfg.cpus_per_run, num_gpus=cfg.gpus_per_run, max_retries=0,
                             name=f"furl_fast.train {run.name}").remote(
            str(results / run.name), [*run.train_args(), *train_args], number, attempts, token)
        in_flight[ref] = Attempt(run, number, token)

    for run in todo:
        submit(run, 1)
    start, next_summary = time.time(), time.time() + cfg.summary_every
    durations: list[float] = []
    failed: list[Run] = []
    failed_attempts = 0
    total = done_before + len(todo)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1,
                            timeout=max(0.0, next_summary - time.time()))
        for ref in ready:
            attempt = in_flight.pop(ref)
            run, log = attempt.run, results / attempt.run.name / RUN_LOG
            try:
                result = ray.get(ref)
                error = None if result["finished"] else f"trainer exit code {result['code']}"
            except ray.exceptions.RayError as exc:  # the worker died, or execute_run itself raised
                result, error = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            if error is None and result["seconds"] is None:
                logger.info("%s was finished meanwhile by another process", run.name)
                continue
            if error is None:
                durations.append(result["seconds"])
                resumed = "" if result["resumed_from"] is None else \
                    f", resumed from step {result['resumed_from']}"
                logger.info("finished %s in %s%s", run.name, format_seconds(result["seconds"]), resumed)
                continue
            failed_attempts += 1
            retry = attempt.number < attempts
            logger.warning("FAILED %s (attempt %d of %d): %s; %s; log: %s", run.name, attempt.number,
                           attempts, error, "retrying" if retry else "giving up", log)
            if retry:
                submit(run, attempt.number + 1)
            else:
                failed.append(run)
        if time.time() >= next_summary or not in_flight:
            running = sum(holds_lock(results / a.run.name, a.token) for a in in_flight.values())
            done = total - len(in_flight) - len(failed)
            remaining = len(in_flight)
            eta = "known once a run has finished" if not durations else \
                format_seconds(sum(durations) / len(durations) * remaining / max(running, 1))
            logger.info("sweep: %d/%d done, %d running, %d pending, %d failed (%d failed attempts), "
                        "elapsed %s, ETA %s", done, total, running, remaining - running, len(failed),
                        failed_attempts, format_seconds(time.time() - start), eta)
            next_summary = time.time() + cfg.summary_every
    return failed


# ---- the report ---------------------------------------------------------------------------------


def find_run_dirs(results: Path) -> list[Path]:
    """Run directories under results: those holding a config.json or a sweep log."""
    found = {p.parent for name in (CONFIG_FILE, RUN_LOG) for p in results.glob(f"**/{name}")}
    return sorted(found)


def method(config: dict[str, Any]) -> str:
    """A run's column in the table: its algo, the reward when one was chosen, and +dense for
    Meta-World's shaped env reward (sac+dense is the oracle). The code reward calls no VLM while it
    trains, so its runs are plain RL plus a reward: `sac+code` with a program set from a file (one
    python -m furl_fast.generate_programs wrote with a VLM), `sac+code-ref` with the built-in
    hand-written reference programs, which no VLM wrote."""
    name = config["algo"]
    reward = config.get("reward")
    reward_name = reward["name"] if isinstance(reward, dict) else reward
    if reward_name == "code" and config["algo"] == "vlm":
        programs = reward.get("programs") if isinstance(reward, dict) else None
        name = "sac+code" if programs else "sac+code-ref"
    elif reward_name not in (None, "auto") and config["algo"] != "sac":
        name += f"+{reward_name}"
    if config.get("env_reward", "sparse") == "dense":
        name += "+dense"
    return name


def collect(results: Path) -> tuple[list[dict[str, Any]], dict[Path, dict[str, Any]], list[Path]]:
    """(rows, {finished run dir: its config}, unfinished run dirs): one row per (task, goal, method,
    agent) over its finished seeds."""
    groups: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    finished, unfinished = {}, []
    for run_dir in find_run_dirs(results):
        if not is_finished(run_dir):
            unfinished.append(run_dir)
            continue
        config = finished[run_dir] = json.loads((run_dir / CONFIG_FILE).read_text())
        key = (task_name(config["task"], config.get("suite", "metaworld")), config["goal"], config["algo"], config["agent"],
               method(config))
        groups[key].append((config["seed"], json.loads((run_dir / EVAL_FILE).read_text())))
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], ALGOS.index(k[2]), AGENTS.index(k[3]), k[4])):
        seeds = sorted(groups[key], key=lambda s: s[0])
        mean, std = mean_std([e["eval/success"] for _, e in seeds])
        ever, _ = mean_std([e["eval/ever_success"] for _, e in seeds])
        rows.append(dict(zip(("task", "goal", "algo", "agent", "method"), key), success_mean=mean,
                         success_std=std,
                         ever_success_mean=ever, n_seeds=len(seeds),
                         seeds=" ".join(str(s) for s, _ in seeds), step=min(e["step"] for _, e in seeds)))
    return rows, finished, unfinished


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The paper's layout: a row per task (and goal), a column per method (and agent), cells
    "mean ± std (n seeds)" of the success rate at the last evaluation."""
    one_agent = len({r["agent"] for r in rows}) <= 1

    def column(r: dict[str, Any]) -> str:
        return r["method"] if one_agent else f"{r['method']} ({r['agent']})"

    columns = list(dict.fromkeys(column(r) for r in rows))
    cells: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for r in rows:
        cells[(r["task"], r["goal"])][column(r)] = \
            f"{r['success_mean']:.2f} ± {r['success_std']:.2f} ({r['n_seeds']})"
    lines = ["| task | goal | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (task, goal), by_column in cells.items():
        lines.append(f"| {task} | {goal} | " + " | ".join(by_column.get(c, "–") for c in columns) + " |")
    return "\n".join(lines)


def write_report(results: Path) -> tuple[Path, Path, list[Path]]:
    """results.md, results.csv and plots/<task>-<goal>.png (learning curves, mean ± std over seeds)
    from the finished runs under results."""
    from furl_fast.plot import plot

    rows, finished, unfinished = collect(results)
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / TABLE_CSV
    columns = ["task", "goal", "algo", "agent", "method", "success_mean", "success_std", "ever_success_mean",
               "n_seeds", "seeds", "step"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    intro = ("Success rate at the last evaluation (success at the last step of the episode), "
             "mean ± std over seeds (number of seeds).")
    text = ["# Results", "", intro, "", markdown_table(rows)]
    if unfinished:
        text += ["", "Unfinished runs (not in the table):", ""]
        text += [f"- {d.relative_to(results)}: {d / RUN_LOG}" for d in unfinished]
    md = results / TABLE_MD
    md.write_text("\n".join(text) + "\n")
    by_task: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for run_dir, config in finished.items():
        by_task[(task_name(config["task"], config.get("suite", "metaworld")), config["goal"])].append(run_dir)
    plots = [plot(dirs, results / PLOTS_DIR / f"{task}-{goal}.png") for (task, goal), dirs in
             sorted(by_task.items())]
    return md, csv_path, plots


# ---- CLI ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> SweepConfig:
    """Sweep flags, then `--` and the flags passed to every run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    cfg = tyro_cli(SweepConfig, prog="python -m furl_fast.sweep", args=ours, description=__doc__)
    return dataclasses.replace(cfg, train_args=tuple(train))


def main(argv: list[str] | None = None) -> None:
    setup_logging("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = parse_args(argv)
    if cfg.report_only:
        md, _, _ = write_report(Path(cfg.results_dir).resolve())
        print(md.read_text())
        sys.exit(0)
    if not cfg.address:
        local_ray_environment()  # before ray's first import
    try:
        import ray  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(2)
    try:
        check(cfg)
    except ValueError as exc:
        print(f"furl_fast.sweep: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_sweep(cfg))


if __name__ == "__main__":
    # Through the importable module, so Ray workers find execute_run as furl_fast.sweep.execute_run
    # (a function of __main__ would be pickled by value).
    from furl_fast.sweep import main as _main

    _main()
