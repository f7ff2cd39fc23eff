"""The ops as torch.library custom ops: schema / fake / dispatcher checks (opcheck), torch.compile
without graph breaks, the reference as the kernel without the native module, and the self-check that
guards each CUDA kernel (exercised on the CPU with injected kernels)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from furl_fast import _native, ops, reference

OPS = ["preprocess_frames", "mlp_cosine_reward", "clip_similarity", "goal_baseline_reward",
       "softmax_goal_reward", "random_shift"]


def test_every_public_op_is_a_custom_op():
    assert sorted(ops.OPS) == sorted(OPS)
    for name in OPS:
        assert getattr(torch.ops.furl_fast, name) is not None
        assert name in ops.__all__


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schema, fake tensor, dispatcher and AOT checks of each op on its self-check input."""
    args = ops.self_check_inputs(name, "cpu")
    torch.library.opcheck(ops.OPS[name], args)


def _all_ops(frames, emb, text, shifts):
    """A function a user would compile: every op, with the public signatures."""
    x = ops.preprocess_frames(frames, size=8, crop=(1, 1, 10, 10))
    sim = ops.clip_similarity(emb, text)
    goal = ops.goal_baseline_reward(emb, text[0], text[1], 0.5)
    p = ops.softmax_goal_reward(emb, text, 1, temperature=0.1, threshold=0.5)
    w1, w2 = text.T, text[:, :4]  # (D, K) and (K, 4)
    mlp = ops.mlp_cosine_reward(emb, w1, text[:, 0], w2, text[0, :4], text[1, :4])
    img = ops.random_shift(frames.permute(0, 3, 1, 2).contiguous(), shifts, 2)
    return x.sum() + sim.sum() + goal.sum() + p.sum() + mlp.sum() + img.float().mean()


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 12, 12, 3), dtype=torch.uint8, generator=g)
    emb, text = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    shifts = torch.tensor([[0, 4], [3, 1]])
    compiled = torch.compile(_all_ops, fullgraph=True, backend="aot_eager")  # fakes + AOT
    torch.testing.assert_close(compiled(frames, emb, text, shifts), _all_ops(frames, emb, text, shifts))
    explain = torch._dynamo.explain(_all_ops)(frames, emb, text, shifts)
    assert explain.graph_break_count == 0, explain.break_reasons


def test_random_shift_matches_reference(gen):
    frames = torch.randint(0, 256, (6, 9, 7, 5), dtype=torch.uint8, generator=gen)
    shifts = torch.randint(0, 9, (6, 2), generator=gen)
    assert torch.equal(ops.random_shift(frames, shifts, 4), reference.random_shift(frames, shifts, 4))
    with pytest.raises(ValueError, match=r"random_shift_cpu: argument 'shifts' must be in \[0, 8\]"):
        ops.random_shift(frames, shifts + 9, 4)
    with pytest.raises(ValueError, match=r"random_shift_cpu: argument 'shifts' must be in \[0, 8\]"):
        ops.random_shift(frames, shifts + 2**32, 4)  # not wrapped into range by the int32 cast
    with pytest.raises(TypeError, match=r"random_shift: 'frames' must have dtype uint8"):
        ops.random_shift(frames.float(), shifts, 4)
    with pytest.raises(ValueError, match=r"random_shift: 'shifts' must have size 6 in dimension 0"):
        ops.random_shift(frames, shifts[:5], 4)
    with pytest.raises(ValueError, match=r"random_shift: 'pad' must be an int in \[0, 1024\]"):
        ops.random_shift(frames, shifts, 1025)


def test_limits_come_from_the_native_module():
    if not _native.HAS_NATIVE:
        pytest.skip("native module not built")
    size = _native.LIMITS["max_preprocess_size"]
    frames = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"'size' must be an int in \[1, {size}\]"):
        ops.preprocess_frames(frames, size=size + 1)


NO_NATIVE_SCRIPT = """
import logging, sys, torch
sys.modules["furl_fast._C"] = None  # as if the package were installed without its build
logging.basicConfig()
from furl_fast import _native, ops, reference
assert not _native.HAS_NATIVE
x, t = torch.randn(4, 8), torch.randn(3, 8)
assert torch.equal(ops.clip_similarity(x, t), reference.clip_similarity(x, t))
frames = torch.randint(0, 256, (2, 9, 9, 3), dtype=torch.uint8)
assert torch.equal(ops.preprocess_frames(frames, size=4), reference.preprocess_frames(frames, size=4))
print("ok")
"""


def test_reference_is_the_kernel_without_the_native_module():
    result = subprocess.run([sys.executable, "-c", NO_NATIVE_SCRIPT], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert "clip_similarity: using the pure-PyTorch reference" in result.stderr
    assert "could not be imported" in result.stderr


# ---- the self-check, on the CPU with injected kernels ----------------------------------------


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.delenv(_native.STRICT_ENV, raising=False)
    _native.reset_kernel_checks()
    yield
    _native.reset_kernel_checks()


def _guard(op, kernel):
    check = ops._SELF_CHECKS[op]
    return _native.kernel_trusted(op, kernel, ops._REFERENCE_KERNELS[op], check.make_inputs,
                                  torch.device("cpu"), check.tolerance)


def _failing(*args):
    raise RuntimeError("an illegal memory access was encountered")


def _wrong(*args):
    return ops._REFERENCE_KERNELS["clip_similarity"](*args) + 1e-3


@pytest.mark.parametrize("kernel,error", [(_failing, "illegal memory access"),
                                          (_wrong, "AssertionError")])
def test_broken_kernel_falls_back_with_one_warning(fresh_checks, caplog, kernel, error):
    calls = []

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    with caplog.at_level(logging.WARNING, logger="furl_fast"):
        assert _guard("clip_similarity", counted) is False
        assert _guard("clip_similarity", counted) is False  # decided once per process
    assert len(calls) == 1
    [record] = [r for r in caplog.records if "self-check" in r.getMessage()]
    msg = record.getMessage()
    assert "clip_similarity" in msg and "cpu" in msg and error in msg
    assert "--selftest" in msg and _native.STRICT_ENV in msg
    check = _native.kernel_checks()["clip_similarity"]
    assert check.state == "fell back" and error in check.error


def test_good_kernel_is_verified(fresh_checks):
    assert _guard("clip_similarity", ops._NATIVE_KERNELS.get("clip_similarity", {}).get(
        "cpu", ops._REFERENCE_KERNELS["clip_similarity"])) is True
    assert _native.kernel_checks()["clip_similarity"].state == "verified"


@pytest.mark.parametrize("kernel", [_failing, _wrong])
def test_strict_mode_raises(fresh_checks, monkeypatch, kernel):
    monkeypatch.setenv(_native.STRICT_ENV, "1")
    for _ in range(2):  # every call, not only the first
        with pytest.raises(RuntimeError, match=r"clip_similarity: the native kernel failed its self-check"):
            _guard("clip_similarity", kernel)
    assert _native.kernel_checks()["clip_similarity"].state == "error"


@pytest.mark.parametrize("name", OPS)
def test_self_check_inputs_pass_the_cpu_kernels(fresh_checks, name):
    """The fixed inputs and tolerances are sound: the CPU kernel (or the reference) passes them."""
    kernel = ops._NATIVE_KERNELS.get(name, {}).get("cpu", ops._REFERENCE_KERNELS[name])
    assert _guard(name, kernel) is True, _native.kernel_checks()[name]


# ---- the CUDA runtime: lazy, and explained when unusable ----------------------------------------


def test_cuda_runtime_reasons():
    d = _native.describe_cuda_runtime
    assert d(None).reason == "furl_fast was built without CUDA kernels"
    no_driver = d({"runtime_version": 13000, "driver_version": 0, "device_count": 0,
                   "error_code": 35, "error": "CUDA driver version is insufficient for CUDA runtime version"})
    assert not no_driver.usable and no_driver.reason.startswith("no NVIDIA driver found")
    old = d({"runtime_version": 13000, "driver_version": 12080, "device_count": 0, "error_code": 35,
             "error": "CUDA driver version is insufficient for CUDA runtime version"})
    assert not old.usable and "12.8" in old.reason and "13.0" in old.reason and "R580" in old.reason
    none = d({"runtime_version": 13000, "driver_version": 13000, "device_count": 0,
              "error_code": 100, "error": "no CUDA-capable device is detected"})
    assert not none.usable and "no CUDA-capable device" in none.reason
    ok = d({"runtime_version": 13000, "driver_version": 13010, "device_count": 1, "error_code": 0,
            "error": ""})
    assert ok.usable and ok.reason is None and ok.driver_version == "13.1"


def test_unusable_runtime_warns_with_the_versions_and_uses_the_reference(fresh_checks, monkeypatch,
                                                                      caplog):
    """A build whose runtime is newer than the driver: the op says so once and is not trusted."""
    status = _native.describe_cuda_runtime(
        {"runtime_version": 13000, "driver_version": 12040, "device_count": 0, "error_code": 35,
         "error": "CUDA driver version is insufficient for CUDA runtime version"})
    monkeypatch.setattr(_native, "cuda_status", lambda: status)
    with caplog.at_level(logging.WARNING, logger="furl_fast"):
        assert ops.cuda_kernel_usable("clip_similarity", torch.device("cpu")) is False
        assert ops.cuda_kernel_usable("clip_similarity", torch.device("cpu")) is False
    [record] = [r for r in caplog.records if "clip_similarity" in r.getMessage()]
    assert "12.4" in record.getMessage() and "13.0" in record.getMessage()
    assert "clip_similarity" not in _native.kernel_checks()  # the kernel never ran


def test_no_driver_is_named_in_cuda_builds():
    """A CUDA build on a machine without an NVIDIA driver says exactly that."""
    if not _native.HAS_CUDA_KERNELS:
        pytest.skip("built without CUDA kernels")
    status = _native.cuda_status()
    if status.driver_version is not None:
        pytest.skip("an NVIDIA driver is installed")
    assert status.reason.startswith("no NVIDIA driver found"), status.reason


LAZY_SCRIPT = """
import torch, furl_fast, furl_fast.ops, furl_fast.replay
from furl_fast import _native
print(_native.cuda_status.cache_info().currsize, torch.cuda.is_initialized())
"""


def test_import_does_not_start_cuda():
    """Importing furl_fast asks the CUDA runtime nothing (that would start the driver and freeze
    CUDA_VISIBLE_DEVICES for the process)."""
    result = subprocess.run([sys.executable, "-c", LAZY_SCRIPT], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "False"]


VISIBLE_SCRIPT = """
import os, torch
import furl_fast, furl_fast.ops
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # still changeable: nothing started the driver
print(torch.cuda.device_count())
"""


@pytest.mark.cuda
def test_import_leaves_cuda_visible_devices_changeable():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    result = subprocess.run([sys.executable, "-c", VISIBLE_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0"


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernels_pass_their_self_check(fresh_checks, monkeypatch, name):
    monkeypatch.setenv(_native.STRICT_ENV, "1")
    assert ops.cuda_kernel_usable(name, torch.device("cuda")) is True
    assert _native.kernel_checks()[name].state == "verified"


@pytest.mark.cuda
def test_injected_cuda_error_falls_back(fresh_checks, monkeypatch):
    """A CUDA kernel whose launch fails (here: an injected error) leaves the op on the reference."""
    monkeypatch.setitem(ops._NATIVE_KERNELS["clip_similarity"], "cuda", _failing)
    x, t = torch.randn(5, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    torch.testing.assert_close(ops.clip_similarity(x, t), reference.clip_similarity(x, t))
    assert _native.kernel_checks()["clip_similarity"].state == "fell back"


THREADS_FIRST_CALL_SCRIPT = """
import threading, torch
from furl_fast import ops
emb, w1, b1 = torch.randn(9000, 64).cuda(), torch.randn(64, 32).cuda(), torch.randn(32).cuda()
w2, b2, t = torch.randn(32, 600).cuda(), torch.randn(600).cuda(), torch.randn(2, 600).cuda()
results, barrier = [], threading.Barrier(8)
def work():
    barrier.wait()  # eight first calls at once: the shared-memory attribute is set once, not raced
    results.append(ops.mlp_cosine_reward(emb, w1, b1, w2, b2, t))
threads = [threading.Thread(target=work) for _ in range(8)]
[th.start() for th in threads]; [th.join() for th in threads]
torch.cuda.synchronize()
print(len(results) == 8 and all(torch.equal(r, results[0]) for r in results))
"""


@pytest.mark.cuda
def test_concurrent_first_cuda_calls():
    env = dict(os.environ, FURL_FAST_STRICT_CUDA="1")
    result = subprocess.run([sys.executable, "-c", THREADS_FIRST_CALL_SCRIPT], capture_output=True,
                            text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPS)
def test_opcheck_cuda(name):
    torch.library.opcheck(ops.OPS[name], ops.self_check_inputs(name, "cuda"))


def test_self_check_is_not_fooled_by_autocast(fresh_checks):
    """A first call inside an autocast region (DrQ's bf16 update) checks in float32, as outside:
    bf16 matmuls in the reference would fail a correct kernel."""
    kernel = ops._NATIVE_KERNELS.get("mlp_cosine_reward", {}).get(
        "cpu", ops._REFERENCE_KERNELS["mlp_cosine_reward"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _guard("mlp_cosine_reward", kernel) is True, _native.kernel_checks()
