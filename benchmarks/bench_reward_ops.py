"""Fused reward heads (furl_fast.ops) vs the eager PyTorch chain (furl_fast.reference) they replace.

Sizes: N = 256 (a training batch) and N = 65,536 (relabelling a replay buffer); FuRL's head shapes
(D = 1024, H = 256, P = 64, one prompt); K = 11 texts for the similarity heads (goal + 10 negatives).
float32 embeddings. Random weights: speed does not depend on the values.

    PYTHONPATH=src flock /tmp/furl_bench.lock python -m pytest -s \
        benchmarks/bench_reward_ops.py --benchmark-only -p no:cacheprovider -o python_files='bench_*.py'

At the end (-s shows it) a table of median times and eager / native ratios, measured in the same run.
"""

from __future__ import annotations

import pytest
import torch

from furl_fast import _native, ops, reference

D, H, P, K = 1024, 256, 64, 11
SIZES = (256, 65536)
_results: dict[tuple[str, str, int], dict[str, float]] = {}


def _device(name: str) -> torch.device:
    if name == "cuda" and not (torch.cuda.is_available() and _native.cuda_status().usable):
        pytest.skip("no usable CUDA GPU (or furl_fast's CUDA kernels cannot run here)")
    return torch.device(name)


def _inputs(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    t = {
        "emb": torch.randn(n, D, generator=g),
        "w1": torch.randn(D, H, generator=g) / D**0.5,
        "b1": torch.randn(H, generator=g) * 0.1,
        "w2": torch.randn(H, P, generator=g) / H**0.5,
        "b2": torch.randn(P, generator=g) * 0.1,
        "target": torch.randn(P, generator=g),
        "text": torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=-1),
        "goal": torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0),
        "base": torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0),
    }
    return {k: v.to(device) for k, v in t.items()}


def _calls(x: dict[str, torch.Tensor], nt: int | None):
    """op name -> (native call, eager chain call); nt: native CPU threads (None: all cores)."""
    mlp = (x["emb"], x["w1"], x["b1"], x["w2"], x["b2"], x["target"])
    return {
        "mlp_cosine_reward": (
            lambda: ops.mlp_cosine_reward(*mlp, num_threads=nt),
            lambda: reference.mlp_cosine_reward(*mlp),
        ),
        "clip_similarity": (
            lambda: ops.clip_similarity(x["emb"], x["text"], num_threads=nt),
            lambda: reference.clip_similarity(x["emb"], x["text"]),
        ),
        "goal_baseline_reward": (
            lambda: ops.goal_baseline_reward(x["emb"], x["goal"], x["base"], 0.5, num_threads=nt),
            lambda: reference.goal_baseline_reward(x["emb"], x["goal"], x["base"], 0.5),
        ),
        "softmax_goal_reward": (
            lambda: ops.softmax_goal_reward(
                x["emb"], x["text"], 0, temperature=0.01, num_threads=nt
            ),
            lambda: reference.softmax_goal_reward(x["emb"], x["text"], 0, temperature=0.01),
        ),
    }


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        "",
        "op                    device threads      N   native ms    eager ms   eager/native",
    ]
    for (op, dev, threads, n), r in sorted(_results.items()):
        if "native" in r and "eager" in r:
            lines.append(
                f"{op:21s} {dev:6s} {threads:>7s} {n:6d} {r['native'] * 1e3:11.3f}"
                f" {r['eager'] * 1e3:11.3f} {r['eager'] / r['native']:12.2f}x"
            )
    for line in lines:
        (reporter.write_line if reporter else print)(line)


@pytest.mark.parametrize("impl", ["native", "eager"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(
    "op", ["mlp_cosine_reward", "clip_similarity", "goal_baseline_reward", "softmax_goal_reward"]
)
@pytest.mark.parametrize("threads", ["all", "1"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_reward_op(benchmark, device, threads, op, n, impl):
    """threads "1": torch.set_num_threads(1) and num_threads=1, i.e. per-core efficiency, which a
    loaded machine disturbs far less than the two-thread runs (see benchmarks/README.md)."""
    dev = _device(device)
    if dev.type == "cuda" and threads == "1":
        pytest.skip("thread count is a CPU setting")
    one = threads == "1"
    fn = _calls(_inputs(n, dev), 1 if one else None)[op][0 if impl == "native" else 1]
    run = fn
    if dev.type == "cuda":

        def run():  # time the work, not the asynchronous launch
            fn()
            torch.cuda.synchronize(dev)

    benchmark.group = f"{op} {device} threads={threads} N={n}"
    # The eager mlp chain at N = 65,536 takes seconds on 2 cores: few rounds.
    rounds = 5 if n > 4096 else 50
    saved = torch.get_num_threads()
    torch.set_num_threads(1 if one else saved)
    try:
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(saved)
    _results.setdefault((op, device, threads, n), {})[impl] = benchmark.stats.stats.median
