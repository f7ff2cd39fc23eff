"""Write a verified code-reward program set with a VLM (VLM-CaR, Venuto et al., ICML 2024).

    python -m furl_fast.generate_programs --task drawer-open --base-url URL --model NAME --out FILE

Collects the suite's scripted-expert and random-action rollouts of the task, sends the VLM the task
text and the first and goal frames of an expert episode, parses its sub-tasks and programs, verifies
them in the sandbox (every sub-task on 100% of expert rollouts, all together on at most 10% of
random ones) and sends the failure report back, for at most --rounds requests. Writes FILE (the
accepted set; nothing when none was accepted), FILE's stem + .report.json (per sub-task rates on
expert and random rollouts, seeds, episode length) and + .transcript.json (every request, without
the API key, and every response). Train with it:

    python -m furl_fast.train --algo vlm --reward code --reward.programs FILE --task drawer-open

--inputs frame (the default, as in the paper): programs see the camera image only. --inputs state:
they also see the simulator's state vector, privileged information (exact object positions, hidden
goals) that a real robot may not have.

The endpoint is any OpenAI-compatible chat-completions API with image input: --base-url (default
$OPENAI_BASE_URL), the key in $OPENAI_API_KEY (any value for a local server that checks none).
Nothing is sent anywhere unless an endpoint is given. Exit status: 0 a set was accepted, 1 none was
(or the endpoint failed), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from furl_fast.rewards.code.program_set import INPUTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m furl_fast.generate_programs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, e.g. drawer-open")
    p.add_argument("--out", required=True, type=Path, help="program-set JSON file to write")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", ""),
                   help="endpoint root, e.g. https://api.openai.com/v1 (default $OPENAI_BASE_URL)")
    p.add_argument("--model", required=True, help="model name; it must accept images")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--inputs", choices=INPUTS, default="frame",
                   help="what programs read: frame (camera image only, as in the paper) or state "
                        "(also the simulator's privileged state vector)")
    p.add_argument("--rounds", type=int, default=3, help="requests at most (1 + feedback rounds)")
    p.add_argument("--suite", default="metaworld", help="environment suite (default metaworld)")
    p.add_argument("--goal", default="fixed", help="the suite's goal mode (Meta-World: fixed|random)")
    p.add_argument("--prompt", default=None,
                   help="task description sent to the VLM (default: the suite's prompt for the task)")
    p.add_argument("--seed", type=int, default=0,
                   help="rollout i (expert and random) runs in the scene of seed + i")
    p.add_argument("--expert-episodes", type=int, default=10)
    p.add_argument("--random-episodes", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None,
                   help="episode length of the rollouts (default: the suite's full episode)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    p.add_argument("--max-retries", type=int, default=4,
                   help="retries on 429, 5xx, timeouts (exponential backoff)")
    return p.parse_args(argv)


class BadInput(ValueError):
    """A one-line message for exit status 2."""


def _paths(out: Path) -> tuple[Path, Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".report.json"), out.with_name(stem + ".transcript.json")


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _print_report(report) -> None:
    print(f"  {'sub-task':<48} {'expert':>7} {'random':>7}")
    for p in report.programs:
        print(f"  {p.index + 1}. {p.description[:45]:<45} {p.expert_rate:>7.0%} {p.random_rate:>7.0%}")
        for e in p.errors[:2]:
            print(f"     failure: {e[:120]}")
    print(f"  all sub-tasks in order: {report.expert_rate:.0%} of {report.num_expert} expert, "
          f"{report.random_rate:.0%} of {report.num_random} random rollouts")


def run(args: argparse.Namespace) -> int:
    from furl_fast.envs import get_suite
    from furl_fast.rewards.code.client import GenerationError, VLMConfig, generate_program_set
    from furl_fast.rewards.code.verifier import RolloutSettings, verify_on_suite
    from furl_fast.vlm.encoder import default_cache_dir

    if not args.base_url:
        raise BadInput("no VLM endpoint: pass --base-url URL or set OPENAI_BASE_URL "
                       "(nothing is sent anywhere otherwise)")
    if args.rounds < 1 or args.expert_episodes < 1 or args.random_episodes < 1:
        raise BadInput("--rounds, --expert-episodes and --random-episodes must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise BadInput("--max-steps must be >= 1")
    if not args.out.parent.is_dir():
        raise BadInput(f"--out {args.out}: folder {args.out.parent} does not exist")
    suite = get_suite(args.suite)
    task = suite.canonical_task(args.task)
    prompt = args.prompt or suite.prompt(task)
    if not prompt:
        raise BadInput(f"--task {task} has no built-in description; give one with --prompt \"...\"")
    config = VLMConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                       timeout_s=args.timeout, max_retries=args.max_retries, max_rounds=args.rounds)
    # Checks the endpoint settings and the key before any rollout is collected.
    from furl_fast.rewards.code.client import VLMClient

    VLMClient(config)
    settings = RolloutSettings(num_expert=args.expert_episodes, num_random=args.random_episodes,
                               seed=args.seed, goal=args.goal, max_steps=args.max_steps)
    length = args.max_steps or suite.max_episode_steps(task)
    print(f"generate_programs: {task}, {args.inputs} programs, model {args.model} at {args.base_url}",
          flush=True)
    print(f"rendering an expert episode for the first and goal frames ({length} steps)", flush=True)
    episode = suite.rollout(task, args.seed, "expert", goal=args.goal, max_steps=length, render=True)
    goal_index = episode.first_success() or len(episode.frames) - 1
    first, goal = episode.frames[0], episode.frames[goal_index]
    del episode

    def verify(program_set):
        print(f"  verifying {len(program_set)} programs on {args.expert_episodes} expert and "
              f"{args.random_episodes} random rollouts of {length} steps (seeds {args.seed}..)",
              flush=True)
        return verify_on_suite(program_set, suite, task, settings, cache_dir=default_cache_dir())

    def on_round(index: int, event: str, report) -> None:
        if event == "asking":
            print(f"round {index}/{args.rounds}: asking {args.model}", flush=True)
        elif event == "unparseable":
            print(f"round {index}: the reply holds no program set; sending the reason back", flush=True)
        else:
            print(f"round {index}: {event.upper()}", flush=True)
            _print_report(report)

    report_path, transcript_path = _paths(args.out)
    started = time.monotonic()
    try:
        result = generate_program_set(task, prompt, first, goal, verify, config, inputs=args.inputs,
                                      on_round=on_round)
        failure = None
    except GenerationError as exc:
        result, failure = exc.result, str(exc)
    meta = {"task": task, "suite": args.suite, "model": args.model, "base_url": args.base_url,
            "inputs": args.inputs, "prompt": prompt, "seconds": round(time.monotonic() - started, 1)}
    _write_json(transcript_path, {**meta, "exchanges": result.transcript if result else []})
    _write_json(report_path, {
        **meta, "accepted": bool(result and result.accepted), "rounds": result.rounds if result else 0,
        "error": failure, "final": result.reports[-1].to_dict() if result and result.reports else None,
        "all_rounds": [r.to_dict() for r in result.reports] if result else []})
    if failure is not None:
        print(f"generate_programs: {failure}; transcript in {transcript_path}", file=sys.stderr)
        return 1
    if not result.accepted:
        print(f"generate_programs: no program set passed verification in {result.rounds} round(s); "
              f"nothing written to {args.out}; report in {report_path}, transcript in "
              f"{transcript_path}", file=sys.stderr)
        return 1
    result.program_set.save(args.out)
    print(f"accepted after {result.rounds} round(s): {args.out} ({len(result.program_set)} sub-tasks,"
          f" {args.inputs} programs); report {report_path}; transcript {transcript_path}")
    print(f"train with: python -m furl_fast.train --algo vlm --reward code --reward.programs "
          f"{args.out} --task {args.task}")
    return 0


def main(argv: list[str] | None = None) -> None:
    from furl_fast._cli import setup_logging

    setup_logging()
    args = parse_args(argv)
    try:
        code = run(args)
    except (BadInput, ValueError, OSError) as exc:
        print(f"generate_programs: {' '.join(str(exc).split())}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("generate_programs: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
