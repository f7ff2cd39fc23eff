"""preprocess_frames throughput: native op vs plain-PyTorch chains vs open_clip's PIL preprocessing.

FuRL's case: 256x256 uint8 renders, crop (32, 32, 192, 192), resize to 224, CLIP normalisation.
Run: python -m pytest benchmarks/bench_preprocess.py --benchmark-only -o python_files='bench_*.py'
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from furl_fast import ops, reference

CROP = (32, 32, 192, 192)
BATCHES = [1, 32, 256]
MEAN = torch.tensor(ops.CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(ops.CLIP_STD).view(1, 3, 1, 1)


def make_frames(n: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 256, 256, 3), dtype=torch.uint8, generator=g).to(device)


def torch_float_chain(frames: torch.Tensor) -> torch.Tensor:
    """The straightforward chain (= reference.preprocess_frames): float copy, interpolate, normalise."""
    return reference.preprocess_frames(frames, crop=CROP)


def torch_fast_chain(frames: torch.Tensor) -> torch.Tensor:
    """The fastest plain-PyTorch chain found: channels-last float interpolate on the cropped view,
    then one fused multiply-add for /255 and the normalisation, in place."""
    x = frames[:, 32:224, 32:224].permute(0, 3, 1, 2).float()  # stays channels-last in memory
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    scale, shift = 1.0 / (255.0 * STD.to(x.device)), -MEAN.to(x.device) / STD.to(x.device)
    return torch.addcmul(shift, x, scale).contiguous()


def torch_uint8_chain(frames: torch.Tensor) -> torch.Tensor:
    """Resize in uint8 (ATen's vectorised uint8 path, rounds to uint8: not bit-equivalent), then
    convert and normalise."""
    x = frames[:, 32:224, 32:224].permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    scale, shift = 1.0 / (255.0 * STD.to(x.device)), -MEAN.to(x.device) / STD.to(x.device)
    return torch.addcmul(shift, x.float(), scale).contiguous()


def native(frames: torch.Tensor) -> torch.Tensor:
    return ops.preprocess_frames(frames, crop=CROP)


def open_clip_pil(frames: torch.Tensor) -> torch.Tensor:
    """What a user of open_clip does: PIL image per frame through open_clip's eval transform."""
    from PIL import Image

    return torch.stack([_OPEN_CLIP_TRANSFORM(Image.fromarray(f)) for f in frames[:, 32:224, 32:224].numpy()])


_OPEN_CLIP_TRANSFORM = None


@pytest.fixture(scope="module", autouse=True)
def _open_clip_transform():
    global _OPEN_CLIP_TRANSFORM
    open_clip = pytest.importorskip("open_clip")
    _OPEN_CLIP_TRANSFORM = open_clip.image_transform(224, is_train=False)


IMPLS = {
    "native": native,
    "torch_fast_chain": torch_fast_chain,
    "torch_float_chain": torch_float_chain,
    "torch_uint8_chain": torch_uint8_chain,
    "open_clip_pil": open_clip_pil,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n", BATCHES)
def test_preprocess_cpu(benchmark, n, impl):
    frames = make_frames(n)
    if impl in ("native", "torch_fast_chain"):  # the two float-exact paths must agree before timing
        torch.testing.assert_close(IMPLS[impl](frames), torch_float_chain(frames))
    benchmark.group = f"preprocess cpu N={n}"
    benchmark.extra_info.update(images=n, impl=impl)
    benchmark.pedantic(IMPLS[impl], args=(frames,), rounds=max(3, 64 // n), warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["native", "torch_fast_chain", "torch_float_chain"])
@pytest.mark.parametrize("n", BATCHES)
def test_preprocess_cuda(benchmark, n, impl):
    frames = make_frames(n, "cuda")
    fn = IMPLS[impl]

    def run():
        fn(frames)
        torch.cuda.synchronize()

    benchmark.group = f"preprocess cuda N={n}"
    benchmark.extra_info.update(images=n, impl=impl,
                                bytes=frames.numel() + n * 3 * 224 * 224 * 4)
    benchmark.pedantic(run, rounds=50, warmup_rounds=5)
