"""One-shot GPU validation: `python -m furl_fast.gpu_check --out DIR`, from a source checkout.

Runs, in this order, within a time budget (default 8 minutes on one H100/H200):
  1. build info and the self-check of every CUDA kernel (python -m furl_fast.info --selftest);
  2. the CUDA tests (pytest -m cuda, with FURL_FAST_STRICT_CUDA=1);
  3. compute-sanitizer memcheck and racecheck over a small subset of the CUDA op tests;
  4. the CUDA benchmarks with their baselines in the same run: preprocess, the reward ops at
     N = 256 and 65,536, the SAC update eager / compiled / naive, FuRL's two updates per step (FuRL
     and relay agent) as one SACEnsemble update eager / compiled (one CUDA graph) against two SAC
     updates and two textbook ones, the DrQ learner step fp32 / bf16, and bench_train's end-to-end
     env steps/s (RN50, random weights) against the release-style loop.
Each part is passed, failed or skipped, with the reason; DIR/results.json and DIR/results.md are
rewritten after every part, so a run stopped early keeps what it did (logs in DIR/logs/).

Beyond what the GPU machine has (torch with CUDA, nvcc, compute-sanitizer, pybind11, cmake, ...),
the parts need the wheels listed by `--list-wheels` (bring them along; there is no network there).
Build furl_fast there first (`pip install --no-build-isolation .` in the checkout, which compiles the
CUDA kernels), then run this from the checkout.
Without a usable GPU the GPU parts are skipped with the reason (the CPU dry run that CI tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Module -> the distribution to bring as a wheel (with its own dependencies), per part.
NEEDED_WHEELS = {
    "tests": {"pytest": "pytest", "hypothesis": "hypothesis", "open_clip": "open_clip_torch",
              "gymnasium": "gymnasium", "mujoco": "mujoco", "metaworld": "metaworld",
              "tyro": "tyro", "tensorboard": "tensorboard", "imageio": "imageio",
              "matplotlib": "matplotlib"},
    "benchmarks": {"pytest_benchmark": "pytest-benchmark"},
}

BUDGET_S = 480.0
# Each step's share of the budget (seconds); a step never runs past the run's deadline.
PART_LIMITS = {"tests": 150.0, "memcheck": 50.0, "racecheck": 50.0}
BENCHMARKS = [  # (name, file, seconds, extra environment, pytest -m: the CUDA rows only)
    ("preprocess", "bench_preprocess.py", 35.0, {}, "cuda"),
    ("reward_ops", "bench_reward_ops.py", 40.0, {}, "cuda"),
    ("sac", "bench_sac.py", 90.0, {}, "cuda"),  # three of its rows compile CUDA graphs first
    ("drq", "bench_drq.py", 35.0, {}, "cuda"),
    # bench_train has no CUDA mark: FURL_BENCH_DEVICE puts both of its loops on the GPU.
    ("train", "bench_train.py", 70.0,
     {"FURL_BENCH_DEVICE": "cuda", "FURL_BENCH_MODEL": "RN50", "FURL_BENCH_STEPS": "200",
      "MUJOCO_GL": "egl"}, None),
]
SANITIZER_TESTS = ["python_tests/test_ops_dispatch.py", "-k",
                   "cuda_kernels_pass_their_self_check or opcheck_cuda"]


def missing_wheels() -> list[str]:
    """The distributions whose modules cannot be imported here."""
    return sorted({dist for group in NEEDED_WHEELS.values() for mod, dist in group.items()
                   if importlib.util.find_spec(mod) is None})


class Run:
    def __init__(self, out: Path, repo: Path, budget_s: float) -> None:
        self.out, self.repo = out, repo
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s,
            "repo": str(repo), "missing_wheels": missing_wheels(), "parts": [],
        }
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, part: int, name: str, status: str, reason: str, seconds: float,
               details: dict | None = None) -> None:
        self.results["parts"].append({"part": part, "name": name, "status": status,
                                      "reason": reason, "seconds": round(seconds, 1),
                                      "details": details or {}})
        self.write()

    def write(self) -> None:
        """results.json and results.md, each written atomically (temp file, then rename)."""
        for name, text in (("results.json", json.dumps(self.results, indent=2)),
                           ("results.md", render_markdown(self.results))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text + "\n")
            os.replace(tmp, self.out / name)

    def command(self, name: str, cmd: list[str], limit_s: float,
                env: dict[str, str] | None = None) -> tuple[int | None, str]:
        """Runs cmd in the repository with min(limit_s, time left); (exit code or None on timeout,
        the output's tail). The whole output goes to logs/<name>.log."""
        timeout = max(1.0, min(limit_s, self.left()))
        log = self.out / "logs" / f"{name}.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=self.repo, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, timeout=timeout,
                                    check=False).returncode
            except subprocess.TimeoutExpired:
                rc = None
        text = log.read_text(errors="replace")
        return rc, text[-3000:]


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# furl_fast GPU check", "", f"Started {results['started']}, budget "
             f"{results['budget_s']:.0f} s, source tree {results['repo']}.", ""]
    if results["missing_wheels"]:
        lines += [f"Missing wheels: {', '.join(results['missing_wheels'])}.", ""]
    lines += ["| part | what | status | seconds | reason |", "|---|---|---|---|---|"]
    for p in results["parts"]:
        reason = p["reason"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {p['part']} | {p['name']} | {p['status']} | {p['seconds']} | {reason} |")
    for p in results["parts"]:
        for key, value in p["details"].items():
            if key == "table":
                lines += ["", f"## {p['name']}", "", "```", value, "```"]
    return "\n".join(lines)


def gpu_reason() -> str | None:
    """None when a CUDA GPU and furl_fast's CUDA kernels are usable, else why not."""
    import torch

    from furl_fast import _native

    if not torch.cuda.is_available():
        return "no usable CUDA GPU: torch sees no CUDA device"
    status = _native.cuda_status()
    return None if status.usable else f"no usable CUDA GPU: {status.reason}"


def part_selftest(run: Run) -> None:
    t0 = time.monotonic()
    try:
        from furl_fast import build_info, ops
        from furl_fast.info import format_selftest

        info = build_info()
        rows = ops.selftest()
    except Exception as exc:  # noqa: BLE001 - the record says what broke
        run.record(1, "build info and --selftest", "failed", f"{type(exc).__name__}: {exc}",
                   time.monotonic() - t0)
        return
    bad = [r["op"] for r in rows if r["state"] in ("fell back", "error")]
    skipped = all(r["state"] == "skipped" for r in rows)
    status = "failed" if bad else "skipped" if skipped else "passed"
    reason = (f"kernels failed their self-check: {', '.join(bad)}" if bad
              else f"self-check skipped: {rows[0]['error']}" if skipped
              else "every CUDA kernel verified")
    run.record(1, "build info and --selftest", status, reason, time.monotonic() - t0,
               {"build_info": {k: str(v) for k, v in info.items()}, "selftest": rows,
                "table": format_selftest(rows)})


def _needs(run: Run, part: int, name: str, gpu: str | None, group: str) -> bool:
    """Records the part as skipped (and returns False) when it cannot run here."""
    missing = sorted(d for m, d in NEEDED_WHEELS[group].items() if importlib.util.find_spec(m) is None)
    if group == "benchmarks":
        missing += sorted(d for m, d in NEEDED_WHEELS["tests"].items()
                          if importlib.util.find_spec(m) is None)
    why = gpu or (None if (run.repo / "python_tests").is_dir()
                  else f"no source tree at {run.repo} (pass --repo)")
    why = why or (f"missing wheels: {', '.join(missing)}" if missing else None)
    why = why or ("no time left in the budget" if run.left() < 5 else None)
    if why:
        run.record(part, name, "skipped", why, 0.0)
    return why is None


def part_tests(run: Run, gpu: str | None) -> None:
    name = "pytest -m cuda"
    if not _needs(run, 2, name, gpu, "tests"):
        return
    t0 = time.monotonic()
    rc, tail = run.command("cuda_tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q",
                                          "-p", "no:cacheprovider", "python_tests"],
                           PART_LIMITS["tests"], {"FURL_FAST_STRICT_CUDA": "1"})
    summary = tail.strip().splitlines()[-1] if tail.strip() else ""
    status = "passed" if rc == 0 else "failed"
    reason = summary if rc is not None else f"timed out after {time.monotonic() - t0:.0f} s"
    run.record(2, name, status, reason, time.monotonic() - t0, {"log": "logs/cuda_tests.log"})


def part_sanitizer(run: Run, gpu: str | None) -> None:
    name = "compute-sanitizer memcheck + racecheck"
    if not _needs(run, 3, name, gpu, "tests"):
        return
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        run.record(3, name, "skipped", "compute-sanitizer is not on PATH", 0.0)
        return
    t0, outcomes = time.monotonic(), {}
    for check in ("memcheck", "racecheck"):
        rc, tail = run.command(check, [tool, "--tool", check, "--error-exitcode", "99",
                                       sys.executable, "-m", "pytest", "-m", "cuda", "-q",
                                       "-p", "no:cacheprovider", *SANITIZER_TESTS],
                               PART_LIMITS[check], {"FURL_FAST_STRICT_CUDA": "1"})
        if "Device not supported" in tail:
            outcomes[check] = "skipped: compute-sanitizer does not support this device"
        else:
            outcomes[check] = {0: "passed", None: "timed out", 99: "errors reported"}.get(
                rc, f"failed (exit {rc})")
    states = {v.split(":")[0] for v in outcomes.values()}
    status = ("failed" if states - {"passed", "skipped"} else
              "passed" if "passed" in states else "skipped")
    reason = "; ".join(f"{k}: {v}" for k, v in outcomes.items())
    run.record(3, name, status, reason, time.monotonic() - t0, {"logs": ["logs/memcheck.log",
                                                                      "logs/racecheck.log"]})


def part_benchmarks(run: Run, gpu: str | None) -> None:
    name = "CUDA benchmarks"
    if not _needs(run, 4, name, gpu, "benchmarks"):
        return
    t0, outcomes = time.monotonic(), {}
    for bench, file, limit, env, marker in BENCHMARKS:
        if run.left() < 5:
            outcomes[bench] = "skipped: no time left"
            continue
        rc, _ = run.command(f"bench_{bench}", [
            sys.executable, "-m", "pytest", f"benchmarks/{file}", "--benchmark-only", "-s", "-q",
            "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
            *(["-m", marker] if marker else []),
            f"--benchmark-json={run.out / f'bench_{bench}.json'}"], limit, env)
        outcomes[bench] = {0: "passed", None: "timed out"}.get(rc, f"failed (exit {rc})")
        run.results.setdefault("benchmarks", {})[bench] = outcomes[bench]
        run.write()
    states = set(outcomes.values())
    status = "passed" if states == {"passed"} else "failed"
    reason = "; ".join(f"{k}: {v}" for k, v in outcomes.items())
    run.record(4, name, status, reason, time.monotonic() - t0,
               {"json": [f"bench_{b}.json" for b, *_ in BENCHMARKS]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m furl_fast.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for results.json, results.md, logs/")
    parser.add_argument("--repo", type=Path, default=Path.cwd(),
                        help="the source checkout holding python_tests/ and benchmarks/ (default: .)")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 1,2")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="time budget for the whole run in seconds (default 480)")
    parser.add_argument("--list-wheels", action="store_true",
                        help="print the wheels the parts need and which are missing here")
    args = parser.parse_args(argv)
    if args.list_wheels:
        for group, mods in NEEDED_WHEELS.items():
            print(f"{group}: {' '.join(sorted(mods.values()))}")
        print(f"missing here: {' '.join(missing_wheels()) or 'none'}")
        wheels = " ".join(sorted({d for g in NEEDED_WHEELS.values() for d in g.values()}))
        print("bring them with their dependencies: on a machine with network, "
              f"`pip download {wheels} -d wheels` (for the GPU machine's Python version and platform: --python-version, --platform, --only-binary=:all:), then on the "
              "GPU machine `pip install --no-index --find-links wheels " + wheels + "`")
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    if not parts <= {1, 2, 3, 4}:
        parser.error(f"--parts takes numbers from 1 to 4, got {args.parts!r}")
    run = Run(args.out, args.repo.resolve(), args.budget_s)
    gpu = gpu_reason() if parts - {1} else None
    steps = {1: part_selftest, 2: lambda r: part_tests(r, gpu),
             3: lambda r: part_sanitizer(r, gpu), 4: lambda r: part_benchmarks(r, gpu)}
    for part in sorted(parts):
        steps[part](run)
    for p in run.results["parts"]:
        print(f"part {p['part']} {p['name']}: {p['status']} ({p['reason']})")
    print(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 1 if any(p["status"] == "failed" for p in run.results["parts"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
