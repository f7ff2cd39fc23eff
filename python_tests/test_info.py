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
