from __future__ import annotations

import os
import subprocess
import sys

import furl_fast


def test_build_info_fields():
    info = furl_fast.build_info()
    assert info["version"] == furl_fast.__version__
    for key in ["native_module", "cuda_compiled", "cuda_architectures", "cuda_runtime_version",
                "gpu_usable", "torch_version", "cpu_threads"]:
        assert key in info
    if info["cuda_compiled"]:
        assert "90" in info["cuda_architectures"]  # the default list ends with sm_90 + PTX
        assert info["cuda_runtime_version"].count(".") == 1
    if not info["gpu_usable"]:
        assert info["gpu_unusable_reason"]


def test_info_cli_without_gpu():
    """Importing furl_fast and printing build info works with no visible GPU (and no driver here)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "furl_fast.info"], capture_output=True, text=True,
                            env=env, timeout=120, check=True)
    assert "version" in result.stdout and furl_fast.__version__ in result.stdout
    assert "gpu_usable" in result.stdout and "False" in result.stdout


def test_info_selftest_table_without_gpu():
    """--selftest lists every op; without usable CUDA kernels each is skipped with the reason."""
    from furl_fast import ops

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "furl_fast.info", "--selftest"],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["op", "kernel", "device", "error"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(ops.OPS)
    if not furl_fast.build_info()["gpu_usable"]:
        assert all(line.split()[1] == "skipped" for line in table[1:])


def test_selftest_table_format():
    from furl_fast.info import format_selftest

    text = format_selftest([
        {"op": "clip_similarity", "state": "verified", "device": "NVIDIA H200 (cuda:0)", "error": None},
        {"op": "random_shift", "state": "fell back", "device": "NVIDIA H200 (cuda:0)",
         "error": "RuntimeError: an illegal memory access was encountered"},
    ])
    lines = text.splitlines()
    assert lines[1].startswith("clip_similarity  verified   NVIDIA H200 (cuda:0)")
    assert lines[2].endswith("RuntimeError: an illegal memory access was encountered")
    assert "fell back" in lines[2]
