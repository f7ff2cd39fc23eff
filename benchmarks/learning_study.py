"""Does the RL stack learn Meta-World? One command, a 2-core CPU, about an hour.

    python benchmarks/learning_study.py --out docs/results/learning

Three methods on the same tasks, seeds and step budget, state-based SAC (FuRL's settings, with
LayerNorm in the critics: SAC_FLAGS), fixed goal:
- sac+dense: Meta-World's own shaped reward (the oracle upper bound; no VLM, no weights needed);
- sac: the sparse reward success - 1 alone (FuRL's setting without any VLM);
- sac+code-ref: the sparse reward plus the code reward of the task's hand-written reference programs
  (written by a person from the simulator's privileged state; no VLM wrote them). A set that a VLM
  wrote (python -m furl_fast.generate_programs) adds a sac+code row: see CODE_FROM_VLM.

The runs go through furl_fast.sweep (Ray, one CPU per run, `--torch-threads 1`), so the same command
run again skips finished runs and resumes the others from their checkpoints. At the end OUT/README.md
holds the table (success at the last evaluation, at its last step and at any step, per task and
method), each run's wall time and steps/s, the machine, the date, the commit and the command;
OUT/plots/ the learning curves and OUT/results.md the sweep's own table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("reach", "button-press", "handle-press", "drawer-open")  # four: two runs at a time, none waits alone
GOAL = "fixed"  # the sweep's goal setting, part of its run and plot names
STUDY_FILE = "study.json"  # the commit, when the study started and ended, and each run's wall time
# Every method's SAC: FuRL's settings plus LayerNorm in the critics, without which the oracle loses
# a solved task again within a few thousand steps (docs/results/learning/diagnosis.md), and the
# 2,000-step warm-up the committed results ran with (a fifth of FuRL's 10,000, for a 40k budget).
SAC_FLAGS = ["--sac.critic-layer-norm", "--warmup-steps", "2000"]
METHODS = {
    # name: (sweep flags, flags after `--`)
    "sac+dense": (["--algos", "sac", "--env-rewards", "dense"], []),
    "sac": (["--algos", "sac", "--env-rewards", "sparse"], []),
    "sac+code-ref": (["--algos", "vlm", "--env-rewards", "sparse"], ["--reward", "code"]),
}
ANALYSIS_MARKER = "<!-- analysis: written by hand, kept when the report above is rewritten -->"
# What a user with a VLM endpoint runs to add a sac+code row (a set generated per task, then the same
# sweep with --reward.programs); the study itself needs no VLM service.
CODE_FROM_VLM = """\
python -m furl_fast.generate_programs --task {task} --base-url $OPENAI_BASE_URL --model MODEL --out {task}.json
python -m furl_fast.sweep --tasks {task} --seeds {seeds} --results-dir {out} --num-cpus 2 --cpus-per-run 1 \\
  --algos vlm --env-rewards sparse -- {train} --reward code --reward.programs {task}.json"""


def sweep_commands(args: argparse.Namespace) -> list[list[str]]:
    train = ["--total-steps", str(args.steps), "--eval-every", str(args.eval_every), "--no-eval-video",
             "--checkpoint-every", str(args.eval_every * 2), "--log-every", "1000", *SAC_FLAGS]
    common = ["--tasks", *args.tasks, "--seeds", *map(str, args.seeds), "--results-dir", str(args.out),
              "--num-cpus", str(args.num_cpus), "--cpus-per-run", "1", "--summary-every", "120"]
    return [[sys.executable, "-m", "furl_fast.sweep", *common, *flags, "--", *train, *extra]
            for flags, extra in METHODS.values()]


def wall_seconds(run_dir: Path) -> float:
    """Seconds from a run's config.json to its final eval.json, from the files' mtimes: true only in
    the checkout the run wrote (git keeps no mtimes), so the study stores them in STUDY_FILE."""
    return (run_dir / "eval.json").stat().st_mtime - (run_dir / "config.json").stat().st_mtime


def steps_per_second(run_dir: Path) -> float:
    """The env steps/s of the run's last log line."""
    with open(run_dir / "metrics.csv") as f:
        sps = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "perf/steps_per_second"]
    return sps[-1] if sps else float("nan")


def write_readme(args: argparse.Namespace, commands: list[list[str]]) -> Path:
    from furl_fast.sweep import collect, find_run_dirs, is_finished, method

    rows, finished, _ = collect(args.out)
    study = json.loads((args.out / STUDY_FILE).read_text())
    try:  # the command as a user would type it, from the checkout
        out = args.out.relative_to(Path.cwd())
    except ValueError:
        out = args.out
    lines = [
        "# Learning study: SAC on Meta-World with the oracle, sparse and code rewards", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU "
        f"({platform.platform()}). Started {study['started']} at commit {study['commit']}; "
        + (f"finished {study['finished']}, {study['minutes']:.0f} min in all (resumed invocations "
           "included)." if "finished" in study else "not finished yet."), "",
        "Command:", "", "```bash", (f"python benchmarks/learning_study.py --out {out} --steps {args.steps} "
        f"--eval-every {args.eval_every} --seeds {' '.join(map(str, args.seeds))} "
        f"--tasks {' '.join(args.tasks)}"), "```", "",
        "which runs:", "", "```bash",
        *(" ".join(["python", *c[1:]]).replace(str(args.out), str(out)) for c in commands), "```", "",
        (f"Eval: the deterministic policy every {args.eval_every} steps, 1 episode (fixed goal), "
         "at the run's last evaluation. Two measures of success: at the episode's last step (FuRL's "
         "measure: the task is still done when the episode ends) and at any step (Meta-World's own "
         "definition: an episode succeeds if any of its steps does)."), "",
        "| task | method | success at the last step | success at any step | seeds | steps |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['success_mean']:.2f} ± {r['success_std']:.2f} | "
                     f"{r['ever_success_mean']:.2f} | {r['seeds']} | {r['step']} |")
    lines += ["", "Per run:", "", "| run | method | wall time | env steps/s |", "|---|---|---:|---:|"]
    for run_dir in find_run_dirs(args.out):
        if not is_finished(run_dir):
            lines.append(f"| {run_dir.relative_to(args.out)} | – | unfinished | – |")
            continue
        name = str(run_dir.relative_to(args.out))
        wall = study.get("wall_seconds", {}).get(name)
        wall = f"{wall / 60:.1f} min" if wall is not None else "–"
        lines.append(f"| {name} | {method(finished[run_dir])} | {wall} | "
                     f"{steps_per_second(run_dir):.0f} |")
    lines += ["", ("The sac+code-ref rows come from the hand-written reference programs, not from a VLM: "
                   "a person wrote them from the simulator's privileged state and Meta-World's own "
                   "success thresholds. To add a sac+code row from a set a VLM writes (and the "
                   "verifier accepts), per task, e.g. drawer-open:"), "", "```bash",
              CODE_FROM_VLM.format(task="drawer-open", seeds=" ".join(map(str, args.seeds)), out=out,
                                   train=" ".join(commands[0][commands[0].index("--") + 1:])),
              "```"]
    plots = sorted((args.out / "plots").glob(f"*-{GOAL}.png"))  # the sweep's, not other studies'
    lines += ["", "Learning curves:", "", *(f"![{p.stem}](plots/{p.name})" for p in plots)]
    path = args.out / "README.md"
    # A person's reading of the results, below ANALYSIS_MARKER, survives a rewrite of the report.
    old = path.read_text() if path.exists() else ""
    analysis = old[old.index(ANALYSIS_MARKER):] if ANALYSIS_MARKER in old else ANALYSIS_MARKER + "\n"
    path.write_text("\n".join(lines) + "\n\n" + analysis)
    return path


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/learning"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--eval-every", type=int, default=2_500)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="only rewrite OUT/README.md")
    args = parser.parse_args()
    args.out = args.out.resolve()
    commands = sweep_commands(args)
    study_file = args.out / STUDY_FILE
    if not args.report_only:
        if not study_file.exists():
            args.out.mkdir(parents=True, exist_ok=True)
            study_file.write_text(json.dumps({"commit": git_commit(), "started": now(),
                                              "start_time": time.time()}))
        for cmd in commands:
            print("+", " ".join(cmd), flush=True)
            code = subprocess.run(cmd, check=False).returncode
            if code != 0:
                print(f"learning_study: the sweep exited {code}; run the same command again to resume",
                      file=sys.stderr)
                return code
        # The last sweep's report covers every run under OUT; rebuild it once more to be sure.
        subprocess.run([sys.executable, "-m", "furl_fast.sweep", "--results-dir", str(args.out),
                        "--report-only"], check=True, stdout=subprocess.DEVNULL)
        study = json.loads(study_file.read_text())
        from furl_fast.sweep import find_run_dirs, is_finished
        study.update(finished=now(), minutes=(time.time() - study["start_time"]) / 60,
                     wall_seconds={str(d.relative_to(args.out)): wall_seconds(d)
                                   for d in find_run_dirs(args.out) if is_finished(d)})
        study_file.write_text(json.dumps(study))
    print(write_readme(args, commands).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
