"""furl_fast.vlm: loading open_clip encoders (tag / checkpoint / none), the image pipeline against
open_clip's own transforms, the text cache, prompts. Tiny random-weight models registered through
open_clip's model-config mechanism stand in for real ones (no weights are reachable here)."""

from __future__ import annotations

import json
import time

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from furl_fast.envs.metaworld import MT10_PROMPTS, furl_crop, task_prompt
from furl_fast.vlm import encoder as encoder_module
from furl_fast.vlm import load_encoder

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY = {
    "furl-test-tiny-vit": {"embed_dim": 32, "text_cfg": TEXT_CFG, "vision_cfg": {
        "image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}},
    "furl-test-tiny-rn": {"embed_dim": 32, "text_cfg": TEXT_CFG, "vision_cfg": {
        "image_size": 64, "layers": [1, 1, 1, 1], "width": 16}},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{model name: path of a saved random-weight state dict}, configs registered with open_clip."""
    root = tmp_path_factory.mktemp("open_clip")
    for name, cfg in TINY.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    paths = {}
    for i, name in enumerate(TINY):
        torch.manual_seed(100 + i)
        model = open_clip.create_model(name)
        paths[name] = root / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    return paths


def smooth_frames(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """Camera-like frames: smooth colour fields (noise would measure only the resize kernels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    f = rng.uniform(0.05, 0.3, size=(n, 3, 2))
    ph = rng.uniform(0, 6, size=(n, 3))
    img = [[127 + 120 * np.sin(xx * f[k, c, 0] + ph[k, c]) * np.cos(yy * f[k, c, 1]) for c in range(3)]
           for k in range(n)]
    return np.stack([np.stack(ch, -1) for ch in img]).round().astype(np.uint8)


def open_clip_reference(name: str, path, frames: np.ndarray) -> torch.Tensor:
    """Embeddings from open_clip's own model + PIL transform pipeline."""
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=str(path))
    model.eval()
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(Image.fromarray(f)) for f in frames]))


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpoint_matches_open_clip_pipeline(name, checkpoints):
    enc = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu", precision="auto",
                       crop="clip")
    assert enc.embed_dim == 32 and enc.image_size == 64 and enc.dtype == torch.float32
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's initial temperature

    # Frames at the model's input size: both pipelines only normalise, so they agree to fp32 rounding.
    frames = smooth_frames(3, 64, 64, seed=1)
    ours = enc.encode_frames(frames)
    assert ours.shape == (3, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, open_clip_reference(name, checkpoints[name], frames),
                               rtol=1e-5, atol=1e-5)
    # Non-square frames go through resize + centre crop. open_clip resizes PIL images with PIL's bicubic
    # (a = -0.5), the fused op with torch's (a = -0.75), so pixels differ by a few levels: we state a
    # tolerance of cosine >= 0.999 and max error <= 2% of the largest embedding entry.
    frames = smooth_frames(3, 96, 80, seed=2)
    ours = enc.encode_frames(torch.from_numpy(frames))
    ref = open_clip_reference(name, checkpoints[name], frames)
    assert F.cosine_similarity(ours, ref).min() >= 0.999
    assert (ours - ref).abs().max() <= 0.02 * ref.abs().max()
    # Fresh random weights give other embeddings: the weights really came from the file.
    with pytest.warns(UserWarning, match="RANDOM"):
        random = load_encoder(name, pretrained="none", device="cpu", crop="clip")
    assert not torch.allclose(ours, random.encode_frames(frames), atol=1e-3)


def test_furl_crop_matches_pil_pipeline(checkpoints):
    name = "furl-test-tiny-vit"
    assert furl_crop(256, 256) == (32, 32, 192, 192)
    enc = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu")
    assert enc.crop == "furl" and enc.interpolation == "bilinear"
    frames = smooth_frames(2, 256, 256, seed=3)
    # FuRL: rows/cols 32:224, bilinear (antialiased) resize to the input size, CLIP mean/std.
    model = open_clip.create_model(name, pretrained=str(checkpoints[name])).eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    pil = [Image.fromarray(f).crop((32, 32, 224, 224)).resize((64, 64), Image.BILINEAR) for f in frames]
    x = torch.stack([(torch.from_numpy(np.array(p)).permute(2, 0, 1) / 255.0 - mean) / std for p in pil])
    with torch.no_grad():
        ref = model.encode_image(x)
    ours = enc.encode_frames(frames)
    # PIL rounds its resized image to uint8 (<= 0.5 level), the fused op does not.
    assert F.cosine_similarity(ours, ref).min() >= 0.9999
    # The BGR quirk feeds reversed channels: same as encoding the channel-flipped frames.
    bgr = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu", bgr=True)
    torch.testing.assert_close(bgr.encode_frames(frames), enc.encode_frames(frames[..., ::-1]))
    assert not torch.allclose(bgr.encode_frames(frames), ours)


def test_encode_text_matches_open_clip_and_is_cached(checkpoints, tmp_path, monkeypatch):
    name = "furl-test-tiny-rn"
    prompts = [MT10_PROMPTS["drawer-open"], MT10_PROMPTS["reach"]]
    enc = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu", cache_dir=tmp_path)
    model = open_clip.create_model(name, pretrained=str(checkpoints[name])).eval()
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer(name)(prompts))
    out = enc.encode_text(prompts)
    assert out.shape == (2, enc.embed_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert len(list((tmp_path / "text").glob("*.pt"))) == 2

    # A fresh encoder on the same weights reads the cache and never runs the text tower.
    again = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu", cache_dir=tmp_path)
    monkeypatch.setattr(again.model, "encode_text", lambda *a, **k: pytest.fail("cache miss"))
    torch.testing.assert_close(again.encode_text(prompts[::-1]), out.flip(0))
    assert again.encode_text(prompts[0]).shape == (1, enc.embed_dim)

    # Other weights under the same model name: another key, so no stale embeddings.
    torch.manual_seed(7)
    torch.save(open_clip.create_model(name).state_dict(), tmp_path / "retrained.pt")
    other = load_encoder(name, pretrained=str(tmp_path / "retrained.pt"), device="cpu",
                         cache_dir=tmp_path)
    assert not torch.allclose(other.encode_text(prompts), out, atol=1e-3)
    assert len(list((tmp_path / "text").glob("*.pt"))) == 4
    half = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu", precision="bf16",
                        cache_dir=tmp_path)
    torch.testing.assert_close(half.encode_text(prompts), out, atol=0.05, rtol=0.05)  # bf16 compute
    assert len(list((tmp_path / "text").glob("*.pt"))) == 6  # precision is part of the key
    with pytest.raises(ValueError, match="prompts"):
        enc.encode_text([])


def test_none_warns_and_is_not_cached(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM weights.*meaningless"):
        enc = load_encoder("furl-test-tiny-vit", pretrained="none", device="cpu", cache_dir=tmp_path)
    assert enc.encode_text("open a drawer").shape == (1, 32)
    assert not (tmp_path / "text").exists()


def test_bad_pretrained_values(tmp_path, checkpoints):
    missing = tmp_path / "nope" / "RN50.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint file not found.*nope"):
        load_encoder("furl-test-tiny-vit", pretrained=str(missing), device="cpu")
    with pytest.raises(ValueError, match="neither a pretrained tag of 'RN50' .*openai"):
        load_encoder("RN50", pretrained="opnai", device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip model 'RN5O'"):
        load_encoder("RN5O", pretrained="none", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        load_encoder("furl-test-tiny-vit", pretrained="none", device="cpu", precision="fp8")
    enc = load_encoder("furl-test-tiny-vit", pretrained=str(checkpoints["furl-test-tiny-vit"]), device="cpu")
    with pytest.raises(TypeError, match="uint8"):
        enc.encode_frames(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        enc.encode_frames(np.zeros((64, 64, 3), np.uint8))


@pytest.fixture
def fake_tag(monkeypatch, checkpoints):
    """A pretrained tag for the tiny model that points at a hub repo no cache can hold."""
    from open_clip import pretrained as registry

    cfg = dict(open_clip.get_pretrained_cfg("RN50", "openai"), hf_hub="furl-fast-test/never-published/",
               url="", quick_gelu=False)
    monkeypatch.setitem(registry._PRETRAINED, "furl-test-tiny-vit", {"fake": cfg})
    return "fake"


def test_unfetchable_tag_fails_fast_offline(fake_tag, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # what the variable sets when read at import
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not obtain .*pass the file: load_encoder\("):
        load_encoder("furl-test-tiny-vit", pretrained=fake_tag, device="cpu")
    assert time.monotonic() - start < 30  # no network round trips (a lax bound: it is a failure check)


def test_unfetchable_tag_fails_fast_when_host_unreachable(fake_tag, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    probed = []
    monkeypatch.setattr(encoder_module, "_host_reachable", lambda host: probed.append(host) or False)
    monkeypatch.setattr(open_clip, "create_model", _only_offline(open_clip.create_model))
    with pytest.raises(RuntimeError, match=r"unreachable.*download https://huggingface.co/furl-fast-test/"
                       r"never-published/resolve/main/open_clip_pytorch_model.bin .*"
                       r"pretrained='/path/to/open_clip_pytorch_model.bin'"):
        load_encoder("furl-test-tiny-vit", pretrained=fake_tag, device="cpu")
    assert probed == ["huggingface.co"]
    assert hub.HF_HUB_OFFLINE is False  # the cache-only attempt restores the flag


def test_cached_tag_loads_without_network(fake_tag, checkpoints, tmp_path, monkeypatch):
    """A tag whose checkpoint sits in the local hub cache loads with no network access at all."""
    import huggingface_hub.constants as hub

    frames = smooth_frames(2, 256, 256, seed=5)
    ref = load_encoder("furl-test-tiny-vit", pretrained=str(checkpoints["furl-test-tiny-vit"]),
                       device="cpu").encode_frames(frames)
    repo = tmp_path / "hub" / "models--furl-fast-test--never-published"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = checkpoints["furl-test-tiny-vit"].read_bytes()
    (repo / "snapshots" / commit / "open_clip_pytorch_model.bin").write_bytes(weights)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(encoder_module, "_host_reachable", lambda host: pytest.fail("probed the net"))
    monkeypatch.setattr(open_clip, "create_model", _only_offline(open_clip.create_model))
    enc = load_encoder("furl-test-tiny-vit", pretrained=fake_tag, device="cpu", cache_dir=tmp_path)
    torch.testing.assert_close(enc.encode_frames(frames), ref)
    assert enc.weights_id == "tag:fake"


def _only_offline(create_model):
    """Wraps open_clip.create_model so that any call made with the hub online fails the test."""
    def wrapped(*args, **kwargs):
        import huggingface_hub.constants as hub

        if not hub.HF_HUB_OFFLINE:
            pytest.fail("open_clip.create_model ran with the hub online")
        return create_model(*args, **kwargs)

    return wrapped


# --- LIV -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def liv_checkpoint(tmp_path_factory):
    """(path, source model): a random OpenAI-architecture CLIP RN50 saved in exactly the layout of LIV's
    release, torch.save({"liv": DataParallel(LIV).state_dict(), ...}), so every key is "module.model." +
    an OpenAI CLIP key; weights in fp16 as LIV's GPU training leaves them. The source model holds the
    same fp16-rounded values in fp32."""
    torch.manual_seed(11)
    source = open_clip.create_model("RN50-quickgelu").eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    source.load_state_dict(state)
    path = tmp_path_factory.mktemp("liv") / "model.pt"
    torch.save({"liv": {"module.model." + k: v for k, v in state.items()}, "optimizer": {},
                "global_step": 0}, path)
    return path, source


def liv_reference(source, frames: np.ndarray) -> torch.Tensor:
    """LIV's own pipeline on FuRL's crop: BGR frames (cv2), rows/cols 32:224, then LIV's
    transforms_tensor (torchvision Resize(224) without antialias, CenterCrop(224), CLIP mean/std)."""
    import torchvision.transforms as T

    x = torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2)[:, :, 32:224, 32:224] / 255.0
    x = T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)(
        T.CenterCrop(224)(T.Resize(224, antialias=False)(x)))
    with torch.no_grad():
        return source.encode_image(x)


def test_liv_checkpoint_gives_the_embeddings_of_the_model_it_came_from(liv_checkpoint, tmp_path):
    path, source = liv_checkpoint
    enc = load_encoder("liv", pretrained=str(path), device="cpu", cache_dir=tmp_path)
    assert enc.bgr and enc.embed_dim == 1024 and enc.image_size == 224 and enc.interpolation == "bilinear"
    assert enc.weights_id.startswith("sha256:") and enc.dtype == torch.float32
    frames = smooth_frames(1, 256, 256, seed=6)  # one frame: a random RN50 is slow on a CPU
    ref = liv_reference(source, frames)
    # Both resize bilinearly (upsampling 192 -> 224) in fp32; only summation order differs.
    torch.testing.assert_close(enc.encode_frames(frames), ref, rtol=1e-4,
                               atol=1e-4 * ref.abs().max().item())
    prompts = [MT10_PROMPTS["drawer-open"]]
    with torch.no_grad():
        text_ref = source.encode_text(open_clip.get_tokenizer("RN50-quickgelu")(prompts))
    torch.testing.assert_close(enc.encode_text(prompts), text_ref)


def test_liv_checkpoint_in_another_layout_names_the_layout_expected(checkpoints, tmp_path):
    tiny = torch.load(checkpoints["furl-test-tiny-rn"], weights_only=True)  # a plain open_clip state dict
    files = {
        "plain": tiny,
        "no_module_prefix": {"liv": {"model." + k: v for k, v in tiny.items()}},
        "not_rn50": {"liv": {"module.model." + k: v for k, v in tiny.items()}},
    }
    for name, payload in files.items():
        torch.save(payload, tmp_path / f"{name}.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    layout = (r"expected LIV's release layout: a dict whose 'liv' entry .* 'module.model.' \+ an "
              r"OpenAI CLIP RN50")
    for name in [*files, "text"]:
        with pytest.raises(ValueError, match=layout) as err:
            load_encoder("liv", pretrained=str(tmp_path / f"{name}.pt"), device="cpu")
        assert ("does not hold a CLIP RN50" in str(err.value)) == (name == "not_rn50")
    with pytest.raises(FileNotFoundError, match="LIV checkpoint file not found: 'openai'"):
        load_encoder("liv", pretrained="openai", device="cpu")


def test_liv_default_weights_come_from_the_hub_cache_or_a_download(liv_checkpoint, tmp_path, monkeypatch):
    """pretrained=None takes the release's model.pt through huggingface_hub: from the cache without
    any network probe, else (host reachable) downloaded; offline without it, a fast error saying what
    to do."""
    import huggingface_hub
    import huggingface_hub.constants as hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    path, _ = liv_checkpoint
    calls, cached = [], [False]

    def fake_download(repo_id, filename, *, local_files_only=False, **kwargs):
        calls.append((repo_id, filename, local_files_only))
        if local_files_only and not cached[0]:
            raise LocalEntryNotFoundError("not in the cache")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probed = []
    monkeypatch.setattr(encoder_module, "_host_reachable", lambda host: probed.append(host) or True)
    enc = load_encoder("liv", device="cpu", cache_dir=tmp_path)
    assert calls == [("jasonyma/LIV", "model.pt", True), ("jasonyma/LIV", "model.pt", False)]
    assert probed == ["huggingface.co"] and enc.bgr
    assert enc.weights_id == f"sha256:{encoder_module._file_digest(path)}"

    cached[0], calls[:] = True, []
    monkeypatch.setattr(encoder_module, "_host_reachable", lambda host: pytest.fail("probed the net"))
    assert encoder_module._liv_hub_file() == path  # what load_encoder loads, as above
    assert calls == [("jasonyma/LIV", "model.pt", True)]

    cached[0] = False
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"offline mode .*resolve/main/model.pt.*--vlm.pretrained"):
        load_encoder("liv", device="cpu")


def test_prompts():
    assert len(MT10_PROMPTS) == 10
    assert task_prompt("drawer-open") == "open a drawer"
    assert task_prompt("peg-insert-side-v3") == "insert a peg sideways"
    assert task_prompt("box-close", prompt="close the box") == "close the box"
    with pytest.raises(ValueError, match="no built-in prompt for task 'box-close'"):
        task_prompt("box-close")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_close_to_cpu_fp32(checkpoints):
    name = "furl-test-tiny-vit"
    frames = smooth_frames(4, 256, 256, seed=4)
    cpu = load_encoder(name, pretrained=str(checkpoints[name]), device="cpu").encode_frames(frames)
    gpu_enc = load_encoder(name, pretrained=str(checkpoints[name]), device="cuda")
    assert gpu_enc.dtype == torch.float16
    gpu = gpu_enc.encode_frames(torch.from_numpy(frames).cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert F.cosine_similarity(gpu.cpu(), cpu).min() >= 0.999  # fp16 end to end vs fp32
