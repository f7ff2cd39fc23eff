"""Offline reward evaluation (Baumli et al.'s question: do larger VLMs give more accurate rewards?).

    python -m furl_fast.evaluate_reward --tasks drawer-open reach --vlm.model liv \
        --rewards cosine binary --episodes 5 --out reward_eval
    python -m furl_fast.evaluate_reward --tasks reach --models RN50 ViT-B-32 --pretrained openai

The VLM takes train's --vlm.* flags (model, pretrained, precision, bgr, prompt, cache-dir), so a
training run's VLM is evaluated with the same flags; --models A B ... (with --pretrained, one value
for all or one per model) compares several VLMs, each in --vlm.model's place.

Collects frames labelled with Meta-World's own success flag (scripted expert rollouts: positives
where the task is solved, negatives before that; random rollouts: negatives unless they happen to
succeed), scores them with every reward model of every VLM, and reports precision, recall and F1 of
goal detection, ROC-AUC, and the Pearson correlation of the reward with the true success, per task,
VLM and reward, as <out>/metrics.csv, a printed table and <out>/metrics.png.

Precision / recall / F1 need a decision threshold: the binary reward uses its own (p > threshold on
the goal probability; the AUC and correlation use p itself); continuous rewards (cosine,
goal_baseline) have none, so they are reported at the threshold that maximises F1 on these very
frames (an optimistic number: column threshold_kind says "best-F1").

Read the numbers against a random-weight baseline on the same frames (--vlm.pretrained none): the positives (the arm holding the solved state) differ from the negatives mostly in arm
position, which even random features pick up, in either direction. With 1 episode of 100 steps on
reach and button-press-topdown, a random-weight RN50 scored ROC-AUC 0.99-1.0 for cosine and
goal_baseline, and the tiny random test model 0.0-0.85: far from 0.5 both ways.

Frames are cached in <out>/frames/*.npz and image embeddings in <out>/embeddings/ (per VLM and
weights), so re-scoring with other rewards or settings skips rendering and encoding. Random-weight
encoders (pretrained none) are never cached, and their numbers mean nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from furl_fast.config import VLMConfig
from furl_fast.rewards.metrics import best_f1_threshold, pearson, precision_recall_f1, roc_auc

logger = logging.getLogger("furl_fast")

def eval_rewards() -> tuple[str, ...]:
    """Rewards that score single frames from their embedding alone (RewardModel.offline_scorable);
    furl needs trained heads and code needs whole episodes of states, so neither is offered here."""
    from furl_fast.rewards import REWARD_MODELS

    return tuple(name for name, cls in REWARD_MODELS.items() if cls.offline_scorable)

COLUMNS = ("task", "model", "weights", "reward", "frames", "positives", "threshold",
           "threshold_kind", "precision", "recall", "f1", "roc_auc", "pearson")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ("drawer-open",)
    """Meta-World tasks (MT10 tasks have built-in prompts)."""
    vlm: VLMConfig = dataclasses.field(default_factory=VLMConfig)
    """The VLM, as train's --vlm.* flags; --vlm.prompt (when given) describes every task."""
    models: tuple[str, ...] | None = None
    """Several VLMs to compare, each in --vlm.model's place (liv, open_clip names, local-dir:/path,
    hf-hub:org/repo); None: --vlm.model alone."""
    pretrained: tuple[str, ...] | None = None
    """Weights of --models: one value for all models, or one per model (tag, checkpoint file, none);
    None: --vlm.pretrained."""
    rewards: tuple[str, ...] = ("cosine", "binary")
    """Reward models to evaluate: cosine, goal_baseline, binary."""
    episodes: int = 5
    """Expert and random episodes per task (each)."""
    max_steps: int = 200
    """Steps per episode (the expert solves most MT10 tasks within ~100)."""
    seed: int = 0
    """Episode i uses seed + i (scene and random actions)."""
    out: Path = Path("reward_eval")
    """Output folder: metrics.csv, metrics.png, frames/ and embeddings/ caches."""
    device: str = "auto"
    """Encoder device: auto, cpu, cuda."""
    alpha: float = 0.5
    """goal_baseline's alpha."""
    threshold: float = 0.5
    """binary's threshold beta on the goal probability."""
    batch_size: int = 64
    """Frames per encoder batch."""


def _atomic_write(path: Path, write) -> None:
    """write(f) into a new file beside path, then renamed over it. Created with os.open's 0o666, so
    the user's umask decides the mode, as for any file a program writes (mkstemp would force 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def collect_frames(task: str, episodes: int, max_steps: int, seed: int
                   ) -> dict[str, np.ndarray]:
    """Expert and random rollouts of `task` -> frames (M, H, W, 3) uint8, success (M,) bool (the flag
    after the step that produced the frame; reset frames are False), source (M,) 0 expert / 1 random,
    episode (M,) int."""
    from furl_fast.envs.metaworld import expert_rollout, random_rollout

    parts: dict[str, list[np.ndarray]] = {"frames": [], "success": [], "source": [], "episode": []}
    for i in range(episodes):
        for source, rollout_fn in ((0, expert_rollout), (1, random_rollout)):
            r = rollout_fn(task, seed + i, max_steps=max_steps)
            n = r.frames.shape[0]
            parts["frames"].append(r.frames)
            parts["success"].append(np.r_[False, r.successes])
            parts["source"].append(np.full(n, source, dtype=np.int8))
            parts["episode"].append(np.full(n, i, dtype=np.int32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_or_collect(cfg: EvalConfig, task: str) -> tuple[str, dict[str, np.ndarray]]:
    """The task's labelled frames from <out>/frames (collected and saved on first use)."""
    key = f"{task}-seed{cfg.seed}-ep{cfg.episodes}-steps{cfg.max_steps}"
    path = cfg.out / "frames" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return key, {k: data[k] for k in data.files}
    print(f"collecting frames: {task} ({cfg.episodes} expert + {cfg.episodes} random episodes of "
          f"{cfg.max_steps} steps)", flush=True)
    data = collect_frames(task, cfg.episodes, cfg.max_steps, cfg.seed)
    _atomic_write(path, lambda f: np.savez_compressed(f, **data))
    return key, data


def load_or_embed(cfg: EvalConfig, encoder, frames_key: str, frames: np.ndarray) -> torch.Tensor:
    """(M, D) float32 image embeddings of the frames, cached per model, weights, precision and crop."""
    path = None
    if encoder.weights_id is not None:
        ident = json.dumps([encoder.model_name, encoder.weights_id, str(encoder.dtype), encoder.crop,
                            encoder.bgr, frames_key])
        path = cfg.out / "embeddings" / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.pt"
        if path.is_file():
            emb = torch.load(path, map_location="cpu", weights_only=True)
            if emb.shape == (frames.shape[0], encoder.embed_dim):
                return emb.to(encoder.device)
    emb = encoder.encode_frames(frames, batch_size=cfg.batch_size)
    if path is not None:
        buf = io.BytesIO()
        torch.save(emb.cpu(), buf)
        _atomic_write(path, lambda f: f.write(buf.getvalue()))
    return emb


def score_reward(name: str, encoder, task: str, emb: torch.Tensor, labels: np.ndarray,
                 cfg: EvalConfig) -> dict[str, object]:
    """Metrics of one reward model on one task's embeddings."""
    from furl_fast.config import REWARD_CONFIG_CLASSES
    from furl_fast.envs import get_suite
    from furl_fast.rewards import RewardContext, build_reward

    config = REWARD_CONFIG_CLASSES[name]()
    fields = {f.name for f in dataclasses.fields(config)}
    config = dataclasses.replace(config, **{k: v for k, v in (("alpha", cfg.alpha),
                                                               ("threshold", cfg.threshold)) if k in fields})
    suite = get_suite("metaworld")
    prompt = cfg.vlm.prompt or suite.prompt(task)
    model = build_reward(config, RewardContext(encoder=encoder, task=task, prompt=prompt, num_envs=1,
                                               device=encoder.device, seed=cfg.seed, suite=suite))
    scores = model.score(emb).cpu().numpy()
    if model.decision_threshold is not None:
        threshold, kind = model.decision_threshold, "reward"
        precision, recall, f1 = precision_recall_f1(labels, scores > threshold)
    else:
        threshold, precision, recall, f1 = best_f1_threshold(labels, scores)
        kind = "best-F1"
    return {"threshold": threshold, "threshold_kind": kind, "precision": precision,
            "recall": recall, "f1": f1, "roc_auc": roc_auc(labels, scores),
            "pearson": pearson(labels, scores)}


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def format_table(rows: list[dict[str, object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = ("task", "model", "reward", "frames", "positives", "threshold_kind", "precision",
            "recall", "f1", "roc_auc", "pearson")
    table = [list(cols)] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def figure(rows: list[dict[str, object]]):
    """F1 and ROC-AUC bars per task, one bar per (model, reward), each labelled with its value (an F1
    of 0 is a label on the axis, not a missing bar; n/a where the metric is undefined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    series = list(dict.fromkeys((r["model"], r["weights"], r["reward"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(tasks) * len(series) ** 0.5 + 6), 4.8))
    width = 0.8 / len(series)
    for ax, metric in zip(axes, ("f1", "roc_auc")):
        for j, (model, weights, reward) in enumerate(series):
            vals = [next((float(r[metric]) for r in rows if r["task"] == t and r["model"] == model
                          and r["weights"] == weights and r["reward"] == reward), np.nan)
                    for t in tasks]
            short = model.rstrip("/").rsplit("/", 1)[-1]  # local-dir:/long/path -> its last part
            if weights == "RANDOM":
                short += " (random weights)"
            bars = ax.bar(np.arange(len(tasks)) + j * width, np.nan_to_num(vals), width,
                          label=f"{short} / {reward}")
            ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.2f}" for v in vals],
                         fontsize=7, padding=1)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20)
        ax.set_ylim(0, 1.08)  # room for the labels above bars of 1.0
        ax.set_title("F1 (binary: own threshold; others: best-F1)" if metric == "f1" else "ROC-AUC")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")  # chance
    if any(r["weights"] == "RANDOM" for r in rows):
        fig.suptitle("RANDOM-WEIGHT encoder(s): a baseline, these numbers carry no meaning",
                     color="darkred")
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(len(series), 3)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * (-(-len(series) // ncol)) + 0.02, 1, 1))
    return fig


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """figure(rows) as a PNG at path."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _atomic_write(path, lambda f: f.write(buf.getvalue()))


def evaluate(cfg: EvalConfig) -> list[dict[str, object]]:
    """Runs the whole evaluation and writes metrics.csv and metrics.png; returns the rows."""
    from furl_fast.vlm import load_encoder

    bad = [r for r in cfg.rewards if r not in eval_rewards()]
    if bad:
        raise ValueError(f"evaluate_reward: cannot evaluate {bad}; choose from {', '.join(eval_rewards())} "
                         "(furl needs trained heads, code needs whole episodes of states).")
    models = cfg.models or (cfg.vlm.model,)
    pretrained = cfg.pretrained or (cfg.vlm.pretrained,)
    if cfg.models is not None and cfg.vlm.model != VLMConfig.model:
        raise ValueError("evaluate_reward: --models replaces --vlm.model; give one of them.")
    if len(pretrained) not in (1, len(models)):
        raise ValueError(f"evaluate_reward: give one --pretrained for all models or one per model "
                         f"({len(models)}), got {len(pretrained)}.")
    if cfg.episodes < 1 or cfg.max_steps < 1:
        raise ValueError("evaluate_reward: --episodes and --max-steps must be >= 1.")
    data = {task: load_or_collect(cfg, task) for task in cfg.tasks}
    pretrained = pretrained * len(models) if len(pretrained) == 1 else pretrained
    rows: list[dict[str, object]] = []
    random_weights = False
    for model_name, weights in zip(models, pretrained):
        encoder = load_encoder(model_name, weights, cfg.device, cfg.vlm.precision, bgr=cfg.vlm.bgr,
                               cache_dir=cfg.vlm.cache_dir)
        random_weights |= encoder.weights_id is None
        for task in cfg.tasks:
            key, frames = data[task]
            labels = frames["success"].astype(bool)
            emb = load_or_embed(cfg, encoder, key, frames["frames"])
            for reward in cfg.rewards:
                rows.append({"task": task, "model": model_name,
                             "weights": encoder.weights_id or "RANDOM", "reward": reward,
                             "frames": int(labels.size), "positives": int(labels.sum()),
                             **score_reward(reward, encoder, task, emb, labels, cfg)})
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, cfg.out / "metrics.csv")
    plot(rows, cfg.out / "metrics.png")
    print(format_table(rows))
    if any(r["positives"] in (0, r["frames"]) for r in rows):
        print("note: a task has only one class of frames: ROC-AUC and correlation are NaN there "
              "(raise --max-steps or --episodes).")
    if random_weights:
        print("WARNING: random-weight encoder(s): these numbers carry no meaning.")
    print(f"wrote {cfg.out / 'metrics.csv'} and {cfg.out / 'metrics.png'}")
    return rows


def main() -> None:
    from furl_fast._cli import setup_logging, tyro_cli

    setup_logging()
    evaluate(tyro_cli(EvalConfig, prog="python -m furl_fast.evaluate_reward", description=__doc__))


if __name__ == "__main__":
    main()
