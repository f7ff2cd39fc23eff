"""`python -m furl_fast.evaluate RUN_DIR`: runs a trained agent's deterministic policy in its task.

    python -m furl_fast.evaluate runs/furl-drawer-open-s0-20261121-101500
    python -m furl_fast.evaluate RUN_DIR --episodes 10 --seed 1 --video --out results.json

Prints every episode's success at its last step (FuRL's measure), whether it succeeded at any step,
its return and its length in agent steps, then their means, and writes them as JSON
(RUN_DIR/evaluate-<step>.json, or --out FILE). --video records every episode
(RUN_DIR/videos/evaluate_step<step>_seed<seed>_ep<k>.mp4). With the run's own seed the episodes are
those the trainer's own evaluation at that step ran (eval.json). Only the policy is loaded, never the
replay buffer; the VLM's reward along the episode is not reported.

The same evaluation serves the trainer's periodic one (evaluate_policy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from furl_fast.config import Config

__all__ = ["Episode", "env_options", "evaluate_policy", "make_eval_env", "summarize"]


@dataclasses.dataclass(frozen=True)
class Episode:
    """One evaluation episode."""

    success: bool
    """Success at the episode's last step (FuRL's measure)."""
    ever_success: bool
    """Success at any step."""
    episode_return: float
    """The environment's reward summed over the episode (the run's env_reward: sparse or dense)."""
    length: int
    """Agent steps."""


def env_options(cfg: Config) -> dict[str, Any]:
    """The make_env keyword arguments of a run's environments (training and evaluation)."""
    options: dict[str, Any] = {}
    if cfg.agent == "drq":
        options.update(obs="pixels", pixel_size=cfg.drq.image_size, frame_stack=cfg.drq.frame_stack,
                       action_repeat=cfg.drq.action_repeat)
    options.update(reward=cfg.env_reward, fast_render=cfg.render_quality == "fast", **cfg.suite_options)
    return options


def make_eval_env(cfg: Config):
    """The environment a run is evaluated in: its task, seed, goal setting and observations (state,
    or DrQ's stacked pixels), rendering on demand."""
    from furl_fast.envs import get_suite

    suite = get_suite(cfg.suite)
    return suite.make_env(suite.canonical_task(cfg.task), seed=cfg.seed, goal=cfg.goal,
                          vlm_frames=False, **env_options(cfg))


def evaluate_policy(act: Callable[[np.ndarray], np.ndarray], env, cfg: Config, step: int,
                    videos: int = 0,
                    on_video: Callable[[int, list[np.ndarray]], None] | None = None) -> list[Episode]:
    """cfg.resolved_eval_episodes episodes of act (one observation -> one action, numpy) in env
    (make_eval_env(cfg)). Episode k starts from reset(seed=cfg.seed) with a fixed goal, else from
    seed cfg.seed + 100_000 + step + k (a new scene at every evaluation step). The first `videos`
    episodes are rendered: on_video(k, frames) gets each one's (H, W, 3) uint8 frames."""
    episodes = []
    for k in range(cfg.resolved_eval_episodes):
        seed = cfg.seed if cfg.goal == "fixed" else cfg.seed + 100_000 + step + k
        obs, _ = env.reset(seed=seed)
        frames = [env.render()] if k < videos else None
        total, successes, done = 0.0, [], False
        while not done:
            obs, reward, terminated, truncated, info = env.step(act(obs))
            total += float(reward)
            successes.append(bool(info["success"]))
            if frames is not None:
                frames.append(env.render())
            done = terminated or truncated
        episodes.append(Episode(successes[-1], any(successes), total, len(successes)))
        if frames is not None and on_video is not None:
            on_video(k, frames)
    return episodes


def summarize(episodes: list[Episode]) -> dict[str, float]:
    """The means the trainer logs: eval/success (at the last step), eval/ever_success, eval/return,
    eval/length (agent steps) and eval/episodes (their number)."""
    return {"eval/success": float(np.mean([e.success for e in episodes])),
            "eval/ever_success": float(np.mean([e.ever_success for e in episodes])),
            "eval/return": float(np.mean([e.episode_return for e in episodes])),
            "eval/length": float(np.mean([e.length for e in episodes])),
            "eval/episodes": float(len(episodes))}


# ---- the command line ------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr and exit 2, like every other refusal of the command."""

    def error(self, message: str):
        self.exit(2, f"furl_fast.evaluate: {message} ({self.prog} --help lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m furl_fast.evaluate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run directory (it holds checkpoints/state.pt)")
    p.add_argument("--checkpoint", default="latest",
                   help="latest, or the step of the checkpoint on disk (a run keeps its latest only)")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes to run (default: the run's eval_episodes: 1 for a fixed goal, 10 "
                        "for random goals; with a fixed goal every episode starts from the same "
                        "state, so the deterministic policy repeats the first)")
    p.add_argument("--seed", type=int, default=None,
                   help="the evaluation's seed (default: the run's; with a fixed goal another seed "
                        "is another scene than the one trained on)")
    p.add_argument("--video", action="store_true", help="record every episode (RUN_DIR/videos/)")
    p.add_argument("--render-quality", choices=["paper", "fast"], default=None,
                   help="of the videos and of DrQ's pixels (default: the run's)")
    p.add_argument("--device", default="cpu", help="where the policy runs: cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON file to write (default: RUN_DIR/evaluate-<step>.json)")
    return p


def evaluate_run(run_dir: Path, checkpoint: str = "latest", episodes: int | None = None,
                 seed: int | None = None, video: bool = False, render_quality: str | None = None,
                 device: str = "cpu", out: Path | None = None) -> dict[str, Any]:
    """The command's work (see the module docstring); returns what it writes to out. ValueError (one
    line) for bad input."""
    import torch

    from furl_fast.policy import load_agent
    from furl_fast.runs import atomic_write_text, write_video

    if episodes is not None and episodes < 1:
        raise ValueError(f"--episodes {episodes}: give 1 or more.")
    policy = load_agent(run_dir, checkpoint, device=device)
    cfg, step = policy.config, policy.step
    cfg = dataclasses.replace(cfg, seed=cfg.seed if seed is None else seed,
                              eval_episodes=cfg.eval_episodes if episodes is None else episodes,
                              render_quality=render_quality or cfg.render_quality)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)

    def save_video(k: int, frames: list[np.ndarray]) -> None:
        write_video(run_dir / "videos" / f"evaluate_step{step:08d}_seed{cfg.seed}_ep{k}", frames)

    env = make_eval_env(cfg)
    try:
        results = evaluate_policy(policy.act, env, cfg, step,
                                  videos=cfg.resolved_eval_episodes if video else 0,
                                  on_video=save_video)
    finally:
        env.close()
    report = {"run_dir": str(run_dir), "step": step, "seed": cfg.seed, **summarize(results),
              "episodes": [{"success": e.success, "ever_success": e.ever_success,
                            "return": e.episode_return, "length": e.length} for e in results]}
    for k, e in enumerate(results):
        print(f"episode {k}: success {int(e.success)} (at any step {int(e.ever_success)}), return "
              f"{e.episode_return:.2f}, length {e.length}")
    print(f"mean of {len(results)} at step {step}: success {report['eval/success']:.2f} (at any step "
          f"{report['eval/ever_success']:.2f}), return {report['eval/return']:.2f}, length "
          f"{report['eval/length']:.1f}")
    out = out or run_dir / f"evaluate-{step}.json"
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    from furl_fast._cli import setup_logging

    setup_logging()
    args = _parser().parse_args(argv)
    try:
        evaluate_run(args.run_dir, args.checkpoint, args.episodes, args.seed, args.video,
                     args.render_quality, args.device, args.out)
    except (ValueError, OSError) as exc:
        print(f"furl_fast.evaluate: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
