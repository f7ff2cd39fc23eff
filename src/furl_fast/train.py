"""`python -m furl_fast.train`: FuRL and its baselines (sac, vlm, relay) on sparse-reward
Meta-World, or on any Gymnasium env.

    python -m furl_fast.train --algo furl --task drawer-open --seed 0
    python -m furl_fast.train --preset paper --algo sac --task reach
    python -m furl_fast.train --algo vlm --reward binary --reward.threshold 0.3 --task reach
    python -m furl_fast.train --suite gymnasium --task CartPole-v1 --algo vlm --vlm.prompt "a pole"
    python -m furl_fast.train --resume runs/furl-drawer-open-s0-20261121-101500

Every field of furl_fast.config.Config is a flag; --preset picks the defaults the other flags
change (laptop: CPU-friendly, the default; paper: the FuRL paper's settings). A run directory holds
config.json, metrics.csv, TensorBoard events (tb/), evaluation videos (videos/), eval.json and
checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from furl_fast.config import PRESETS, REWARD_CONFIG_CLASSES, REWARDS, Config, config_to_dict, resolve_device
from furl_fast.runs import (
    CHECKPOINT_DIR,
    atomic_write_text,
    prepare,
    remove_temporaries,
    saved_config,
)

logger = logging.getLogger("furl_fast.train")


# ---- the command line ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Args:
    """The command line: --preset, then every Config field under its own name."""

    preset: Literal["laptop", "paper"] = "laptop"  # the keys of config.PRESETS
    """The defaults every other flag starts from: laptop (CPU-friendly, 100k steps) or paper (the FuRL
    paper's settings: 1M steps, replay 500k for furl and 1M for the baselines, Meta-World's own
    visuals, the paper's VLM LIV; --vlm.model NAME picks another). Flags given always win over the
    preset."""
    track: bool = False
    """Track the run with Weights & Biases (pip install "furl_fast[track]"): config and every
    TensorBoard scalar; WANDB_MODE=offline keeps it local (wandb sync uploads it later)."""
    wandb_project_name: str = "furl_fast"
    """The W&B project of --track."""
    wandb_entity: str | None = None
    """The W&B team or user of --track; None: your default entity."""
    allow_many_envs: bool = False
    """Start even with more --num-envs than this machine holds (more than 4 env workers per CPU core,
    or more than its available memory at the measured size of one worker)."""
    config: Annotated[Config, tyro.conf.arg(name="")] = Config()


def parse_config(argv: list[str] | None = None) -> Config:
    """--preset NAME chooses the defaults, tyro parses every Config field on top of them."""
    return parse_args(argv).config


def parse_args(argv: list[str] | None = None) -> _Args:
    """The command line. With --resume RUN the defaults are RUN's saved configuration instead of a
    preset, so the flags given are exactly the changes (prepare() checks them against RESUMABLE)."""
    from furl_fast._cli import tyro_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume is None:
        preset = known.preset or "laptop"
        default = PRESETS[preset]
    elif known.preset is not None:
        raise ValueError(f"--preset {known.preset} with --resume: a resumed run keeps its saved "
                         "settings (change the ones a resume may change with their own flags).")
    else:
        preset = "laptop"
        default = dataclasses.replace(saved_config(Path(known.resume)), resume=known.resume)
    return tyro_cli(_Args, prog="python -m furl_fast.train", description=__doc__,
                    args=reward_subcommand(argv, default.reward),
                    default=_Args(preset, config=default))


def reward_subcommand(argv: list[str], default_reward: Any) -> list[str]:
    """`--reward NAME [--reward.OPTION VALUE ...]` anywhere on the command line, rewritten into
    tyro's form for the reward's config (a subcommand): the other flags, then `reward:NAME`, then
    the reward's own options. NAME may be spelled with - or _ (goal-baseline, goal_baseline). With
    --reward, --help shows that reward's options."""
    rest, options, name = [], [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--reward" and i + 1 < len(argv):
            name, i = argv[i + 1], i + 2
        elif arg.startswith("--reward="):
            name, i = arg.split("=", 1)[1], i + 1
        elif arg.startswith("--reward."):
            options.append(arg)
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):  # its values
                options.append(argv[i])
                i += 1
        else:
            rest.append(arg)
            i += 1
    if name is None and options:
        if default_reward.name == "auto":
            raise ValueError(f"{options[0]} needs --reward NAME before it (one of {', '.join(REWARDS)}).")
        name = default_reward.name
    if name is None:
        return rest
    name = name.replace("-", "_")
    if name not in REWARD_CONFIG_CLASSES:
        raise ValueError(f"--reward {name} is unknown; use one of auto, {', '.join(REWARDS)}.")
    helps = [a for a in rest if a in ("-h", "--help")]
    rest = [a for a in rest if a not in helps]
    return [*rest, "reward:" + name.replace("_", "-"), *options, *helps]


def check_config(cfg: Config, allow_many_envs: bool = False) -> None:
    """Everything that can be checked before any work starts (and before torch or the VLM load);
    raises ValueError saying what to change. allow_many_envs: skip too_many_envs."""
    from furl_fast.envs import get_suite

    suite = get_suite(cfg.suite)
    try:
        cfg.validate(suite)
    except ValueError as exc:
        raise ValueError(f"{exc} (python -m furl_fast.train --help lists every flag)") from None
    problem = None if allow_many_envs else too_many_envs(cfg.num_envs, pixels=cfg.agent == "drq")
    if problem is not None:
        raise ValueError(problem)
    if cfg.loads_encoder and cfg.vlm.prompt is None and suite.prompt(cfg.task) is None:
        raise ValueError(f"--task {cfg.task} has no built-in prompt in the {cfg.suite} suite; describe "
                         'its goal for the VLM with --vlm.prompt "..." (a short sentence saying what '
                         "success looks like).")
    if cfg.resolved_reward == "code":
        from furl_fast.rewards.code import SandboxLimits, SandboxUnavailable, check_isolation

        code = cfg.reward_config
        if code.programs is not None and code.trust_programs:
            logger.warning("--reward.trust-programs: the programs in %s are trusted; where the "
                           "sandbox's OS-level isolation cannot be set up they run without it",
                           code.programs)
        try:
            check_isolation(SandboxLimits(isolation=code.isolation))
        except SandboxUnavailable as exc:
            raise ValueError(f"--reward.programs {code.programs}: {exc}; only for a file you trust, "
                             "--reward.trust-programs runs it without that isolation.") from None
        verify_code_reward(cfg, suite)


# Memory of one env worker process (its proportional set size, PSS), measured on Meta-World reach
# with fast rendering: a state env that renders VLM frames (~260 MiB; ~125 MiB without frames), and a
# DrQ env rendering 84x84 frame stacks (~645 MiB). Other suites' envs may take more.
ENV_WORKER_BYTES = {"state": 300 << 20, "pixels": 700 << 20}
ENVS_PER_CORE = 4  # more workers than this only wait for a core: no faster, much more memory


def too_many_envs(num_envs: int, pixels: bool) -> str | None:
    """Why this machine cannot hold num_envs env worker processes (one per env when num_envs > 1),
    or None: at most ENVS_PER_CORE per usable CPU core, and num_envs workers of ENV_WORKER_BYTES
    within the memory available now (Linux; elsewhere only the core rule)."""
    if num_envs <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker = ENV_WORKER_BYTES["pixels" if pixels else "state"]
    need = num_envs * worker
    available = _available_memory()
    if num_envs > ENVS_PER_CORE * cores:
        why = f"more than {ENVS_PER_CORE} env workers per CPU core ({cores} cores here)"
    elif available is not None and need > available:
        why = (f"its env workers take about {need / 2**30:.1f} GiB (~{worker >> 20} MiB each), "
               f"more than the {available / 2**30:.1f} GiB of memory available")
    else:
        return None
    return (f"--num-envs {num_envs} is too many for this machine: {why}; lower --num-envs, or pass "
            "--allow-many-envs to start anyway.")


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (MemAvailable of /proc/meminfo), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def verify_code_reward(cfg: Config, suite) -> None:
    """--reward code: load the program set and verify it on the suite's expert and full-length random
    rollouts (the report cached by set content, task, seed and settings, so a resume or a sweep reuses
    it). ValueError with the report's numbers when it fails, unless --reward.allow-unverified."""
    from furl_fast.rewards.code import (RolloutSettings, SandboxLimits, VerifierConfig,
                                        load_program_set, verify_on_suite)
    from furl_fast.vlm.encoder import default_cache_dir

    rc = cfg.reward_config
    programs = load_program_set(cfg.task, rc.programs, suite.reference_programs(cfg.task))
    if rc.verify_expert < 1 or rc.verify_random < 1:
        raise ValueError("--reward.verify-expert and --reward.verify-random must be >= 1.")
    source = f"--reward.programs {rc.programs}" if rc.programs else \
        f"the hand-written reference programs of {cfg.task}"
    settings = RolloutSettings(num_expert=rc.verify_expert, num_random=rc.verify_random, seed=cfg.seed,
                               goal=cfg.goal, fast_render=cfg.render_quality == "fast",
                               options=tuple(sorted(cfg.suite_options.items())))
    try:
        report = verify_on_suite(programs, suite, suite.canonical_task(cfg.task), settings,
                                 VerifierConfig(limits=SandboxLimits(isolation=rc.isolation)),
                                 cache_dir=default_cache_dir())
    except ValueError as exc:
        if not rc.allow_unverified:
            raise ValueError(f"{source}: cannot verify the set ({exc}); --reward.allow-unverified "
                             "trains on it unverified.") from None
        logger.warning("%s: not verified (%s); training anyway (--reward.allow-unverified)", source, exc)
        return
    if report.accepted:
        logger.info("%s: verified: %s", source, report.one_line())
    elif rc.allow_unverified:
        logger.warning("%s failed verification, training anyway (--reward.allow-unverified): %s",
                       source, report.one_line())
    else:
        raise ValueError(f"{source} failed verification: {report.one_line()}; fix the set "
                         "(python -m furl_fast.generate_programs) or pass --reward.allow-unverified.")


def load_vlm(cfg: Config):
    """The frozen VLM, cropping frames as the suite's VLM frames need; fails fast (RuntimeError /
    FileNotFoundError / ValueError) without weights."""
    from furl_fast.envs import get_suite
    from furl_fast.vlm import load_encoder

    return load_encoder(cfg.vlm.model, cfg.vlm.pretrained, device=resolve_device(cfg.device),
                        precision=cfg.vlm.precision, bgr=cfg.vlm.bgr, cache_dir=cfg.vlm.cache_dir,
                        crop=get_suite(cfg.suite).crop)


def train(cfg: Config, wandb_project: str | None = None, wandb_entity: str | None = None,
          allow_many_envs: bool = False) -> int:
    """Runs (or resumes) one training run; returns the process exit code (2: it could not start,
    with a one-line message on stderr and no run directory made; 1: a file of the run could not be
    written (a full disk, a path of the wrong kind), with a one-line message naming it; 128 + signal
    number: stopped by SIGINT or SIGTERM, with a checkpoint once training has started, with nothing
    written before). The run directory is locked while the run writes it (runs.lock_run_dir): a
    second run or resume of it is refused. wandb_project: track the run with Weights & Biases in that
    project (metrics.start_wandb). allow_many_envs: see too_many_envs."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from furl_fast.envs import get_suite

    # SIGINT / SIGTERM only set a flag: start-up looks at it between its phases (a KeyboardInterrupt
    # raised inside MuJoCo's renderer, a worker start or a weights load could leave a half-built
    # object or a hung worker behind), the training loop before every step. A second SIGINT during
    # start-up interrupts at once.
    stop: list[int] = []
    starting = True

    def on_signal(signum: int, _frame) -> None:
        stop.append(signum)
        if starting and stop.count(signal.SIGINT) > 1:
            raise KeyboardInterrupt

    def interrupted() -> None:
        if stop:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = lock = None
    try:
        try:
            check_config(cfg, allow_many_envs)
            cfg, run_dir, state, lock = prepare(cfg, get_suite(cfg.suite).short_name(cfg.task))
            if wandb_project is not None:
                from furl_fast.metrics import require_wandb

                require_wandb()
            import torch

            if cfg.torch_threads is not None:
                torch.set_num_threads(cfg.torch_threads)
            loading = "the VLM and the environments" if cfg.loads_encoder else "the environments"
            vlm = f"{cfg.vlm.model} ({cfg.vlm.pretrained or 'default weights'})" if cfg.loads_encoder \
                else "none"
            print(f"furl_fast.train: {'resuming' if state is not None else 'starting'} {cfg.algo} "
                  f"{cfg.task} in {run_dir} ({cfg.algo}-{cfg.agent}, seed {cfg.seed}, VLM {vlm}, render "
                  f"quality {cfg.render_quality}, env reward {cfg.env_reward}; loading {loading})",
                  flush=True)
            interrupted()
            encoder = None
            if cfg.loads_encoder:
                from furl_fast.vlm.encoder import WeightsUnavailableError

                try:
                    encoder = load_vlm(cfg)
                except WeightsUnavailableError as exc:
                    raise ValueError(cli_message(exc)) from exc
            interrupted()
            from furl_fast.trainer import Trainer

            trainer = Trainer(cfg, run_dir, encoder)
            interrupted()
            if state is not None:
                trainer.load_checkpoint(state)
            interrupted()
            # Only now, with everything ready: a run that cannot start leaves no directory behind
            # (the lock's release removes what it made). A resume rewrites config.json with the
            # changes it made: total_steps, cadences, device.
            resolved = config_to_dict(dataclasses.replace(cfg, resume=None))
            atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2))
            starting = False
        except (KeyboardInterrupt, ValueError, OSError) as exc:
            if trainer is not None:
                trainer.close()
            if isinstance(exc, KeyboardInterrupt):
                print("furl_fast.train: interrupted while starting; nothing was written.",
                      file=sys.stderr)
                return 128 + (stop[0] if stop else signal.SIGINT)
            print(f"furl_fast.train: {cli_message(exc)}", file=sys.stderr)
            return 2
        if state is not None:
            logger.info("resumed %s at step %d", run_dir, trainer.step)
        tracker = None
        if wandb_project is not None:
            from furl_fast.metrics import start_wandb

            tracker = start_wandb(run_dir, config_to_dict(cfg), project=wandb_project,
                                  entity=wandb_entity)
        try:
            with logging_redirect_tqdm():  # log records above the progress bar, not through it
                code = trainer.run(stop)
        except OSError as exc:  # a full disk, a read-only file system, a path of the wrong kind
            remove_temporaries(run_dir)
            print(f"furl_fast.train: {write_error_message(exc, run_dir, trainer.step)}",
                  file=sys.stderr)
            code = 1
        finally:
            trainer.close()
            if tracker is not None:
                tracker.finish()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock is not None:
            lock.release(discard=starting)
    if code == 0:
        print(f"done: {trainer.step} steps, run directory {run_dir}")
    return code


def write_error_message(exc: OSError, run_dir: Path, step: int) -> str:
    """One line for a write that failed during training: the path, the cause, what to do."""
    from furl_fast.runs import STATE_FILE

    path = exc.filename or f"a file in {run_dir}"
    checkpoint = run_dir / CHECKPOINT_DIR / STATE_FILE
    after = f"--resume {run_dir} continues from its last checkpoint" if checkpoint.exists() else \
        "start it again (it has no checkpoint yet)"
    return (f"cannot write {path}: {exc.strerror or exc} (at step {step}); the run stopped. Fix that "
            f"(free disk space, make the path writable), then {after}.")


def cli_message(exc: BaseException) -> str:
    """One line saying what to change, in terms of the command line's flags."""
    if not isinstance(exc, RuntimeError):  # the VLM's WeightsUnavailableError is a RuntimeError
        return " ".join(line.strip() for line in str(exc).splitlines())
    from furl_fast.vlm.encoder import LIV, LIV_HUB_FILE, LIV_HUB_REPO, WeightsUnavailableError

    if isinstance(exc, WeightsUnavailableError) and exc.model == LIV:
        return (f"--vlm.model liv: LIV's weights ({LIV_HUB_FILE} of the Hugging Face hub repo "
                f"{LIV_HUB_REPO}) are not in the local cache and cannot be downloaded "
                f"({exc.reason}). "
                f"Download {exc.url} on a machine with network access and pass it with "
                "--vlm.pretrained /path/to/model.pt; "
                "--vlm.model RN50 runs OpenAI's CLIP instead (set --furl.phase-a-gap for its "
                "embeddings); --vlm.pretrained none runs with random weights, whose rewards mean "
                "nothing.")
    if isinstance(exc, WeightsUnavailableError):
        name = exc.url.rsplit("/", 1)[-1]
        model = "" if exc.file_model == exc.model else f"--vlm.model {exc.file_model} "
        return (f"--vlm.pretrained {exc.tag}: the weights of {exc.model} are not in the local cache and "
                f"cannot be downloaded ({exc.reason}). Download {exc.url} on a machine with network "
                f"access and pass it with {model}--vlm.pretrained /path/to/{name}; "
                "--vlm.pretrained none runs with random weights, whose rewards mean nothing.")
    return " ".join(line.strip() for line in str(exc).splitlines())


def main(argv: list[str] | None = None) -> None:
    from furl_fast._cli import setup_logging

    setup_logging()
    try:
        args = parse_args(argv)
    except ValueError as exc:  # a --resume without a readable run
        print(f"furl_fast.train: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("furl_fast.train: interrupted while starting; nothing was written.", file=sys.stderr)
        sys.exit(130)
    sys.exit(train(args.config, wandb_project=args.wandb_project_name if args.track else None,
                   wandb_entity=args.wandb_entity, allow_many_envs=args.allow_many_envs))


if __name__ == "__main__":
    main()
