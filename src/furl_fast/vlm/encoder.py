"""open_clip encoders, and LIV (FuRL's VLM) on open_clip's RN50, behind one small interface:
load_encoder() -> Encoder with encode_frames (uint8 frames in, embeddings out, preprocessing fused on
the device) and encode_text (cached on disk)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch

from furl_fast import ops
from furl_fast.envs.suite import CropBox

logger = logging.getLogger("furl_fast")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_PROBE_TIMEOUT_S = 3.0  # how long to wait for the weights host before failing: no hub, no retries
LIV = "liv"
"""load_encoder's name for LIV (Ma et al. 2023), the VLM of the FuRL paper: OpenAI's CLIP RN50
fine-tuned by LIV's authors, run here as open_clip's RN50 with QuickGELU."""
LIV_HUB_REPO, LIV_HUB_FILE = "jasonyma/LIV", "model.pt"  # the release's weights on the Hugging Face hub
LIV_HUB_URL = f"https://huggingface.co/{LIV_HUB_REPO}/resolve/main/{LIV_HUB_FILE}"
_LIV_ARCH = "RN50-quickgelu"  # OpenAI's CLIP architecture: LIV fine-tunes it, QuickGELU included
_LIV_PREFIX = "module.model."  # LIV saves the state dict of DataParallel(LIV), whose .model is the CLIP
_LIV_LAYOUT = ("LIV's release layout: a dict whose 'liv' entry is the state dict of "
               "torch.nn.DataParallel(LIV), every key 'module.model.' + an OpenAI CLIP RN50 key "
               "(visual.*, transformer.*, token_embedding.weight, positional_embedding, ln_final.*, "
               "text_projection, logit_scale)")
RANDOM_WEIGHTS_WARNING = (
    "load_encoder: pretrained='none' -> the VLM has RANDOM weights. Its embeddings carry no meaning, "
    "so every VLM reward computed from it is meaningless. Use this only for tests and throughput "
    "measurements."
)


def default_cache_dir() -> Path:
    """$FURL_FAST_CACHE, else ~/.cache/furl_fast."""
    return Path(os.environ.get("FURL_FAST_CACHE") or Path.home() / ".cache" / "furl_fast")


class Encoder:
    """A frozen open_clip model in eval mode on one device and precision. Build it with load_encoder().

    embed_dim: width of the embeddings. logit_scale: CLIP's learned temperature exp(t), a float.
    image_size: the model's input side. crop: the crop's name, "furl", "clip" or a crop-box function's
    qualified name (see load_encoder).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, model_name: str, weights_id: str | None,
                 device: torch.device, dtype: torch.dtype, crop: str | CropBox, bgr: bool,
                 cache_dir: Path) -> None:
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size[0] != size[1]:
            raise NotImplementedError(f"load_encoder: non-square model input {size} is not supported.")
        self.model, self.tokenizer = model, tokenizer
        self.model_name, self.weights_id = model_name, weights_id
        self.device, self.dtype, self.bgr = device, dtype, bgr
        self.crop, self._crop_box = _resolve_crop(crop)
        self.cache_dir = Path(cache_dir)
        self.image_size = int(size[0])
        self.mean = tuple(float(v) for v in cfg.get("mean", ops.CLIP_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", ops.CLIP_STD))
        # FuRL resizes its crop box bilinearly; open_clip's transform uses the model's own (bicubic
        # mostly).
        model_interp = cfg.get("interpolation", "bicubic")
        self.interpolation = "bilinear" if self._crop_box is not None else (
            model_interp if model_interp in ("bilinear", "bicubic") else "bicubic")
        with torch.inference_mode():
            self.logit_scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 1.0
            out_dim = getattr(getattr(model, "visual", None), "output_dim", None)
            if out_dim is None:  # e.g. timm towers: ask the model
                out_dim = model.encode_text(tokenizer(["a"]).to(device)).shape[-1]
        self.embed_dim = int(out_dim)

    def __repr__(self) -> str:
        return (f"Encoder({self.model_name!r}, weights={self.weights_id or 'RANDOM'}, "
                f"device={self.device}, dtype={self.dtype}, crop={self.crop!r}, bgr={self.bgr})")

    # --- images ---------------------------------------------------------------------------------
    def preprocess(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """frames: (N, H, W, 3) uint8, upright -> (N, 3, S, S) model input in the model's dtype, on the
        encoder's device. One fused pass: crop, resize, /255, normalise (ops.preprocess_frames)."""
        frames = _as_uint8_tensor(frames)
        if frames.dim() != 4:
            raise ValueError(f"encode_frames: 'frames' must have shape (N, H, W, 3), got "
                             f"{tuple(frames.shape)}.")
        height, width = frames.shape[1], frames.shape[2]
        box = (self._crop_box or ops.centre_square_crop)(height, width)
        frames = frames.to(self.device, non_blocking=True)
        return ops.preprocess_frames(frames, size=self.image_size, crop=box, bgr=self.bgr,
                                     mean=self.mean, std=self.std, out_dtype=self.dtype,
                                     interpolation=self.interpolation)

    def encode_frames(self, frames: torch.Tensor | np.ndarray, *, batch_size: int = 256) -> torch.Tensor:
        """frames: (N, H, W, 3) uint8 upright frames (tensor on any device, or ndarray) -> (N, embed_dim)
        float32 embeddings on the encoder's device, not L2-normalised (FuRL's heads take them raw).
        Runs in batches of batch_size in the model's precision (fp16 on CUDA by default)."""
        frames = _as_uint8_tensor(frames)
        if frames.dim() != 4 or frames.shape[0] == 0:
            raise ValueError(f"encode_frames: 'frames' must have shape (N, H, W, 3) with N >= 1, got "
                             f"{tuple(frames.shape)}.")
        out = []
        with torch.inference_mode():
            for start in range(0, frames.shape[0], batch_size):
                x = self.preprocess(frames[start:start + batch_size])
                out.append(self.model.encode_image(x).float())
        return torch.cat(out)

    # --- text -----------------------------------------------------------------------------------
    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """prompts: one string or K strings -> (K, embed_dim) float32 on the encoder's device, not
        L2-normalised. Cached on disk under cache_dir/text, keyed by model, weights, precision and
        prompt (random weights are never cached)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode_text: 'prompts' must be a string or a non-empty list of strings.")
        rows: list[torch.Tensor | None] = [self._cached(p) for p in prompts]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            with torch.inference_mode():
                tokens = self.tokenizer([prompts[i] for i in missing]).to(self.device)
                fresh = self.model.encode_text(tokens).float().cpu()
            for i, row in zip(missing, fresh):
                rows[i] = row.clone()
                self._store(prompts[i], rows[i])
        return torch.stack(rows).to(self.device)

    def _cache_path(self, prompt: str) -> Path | None:
        if self.weights_id is None:
            return None
        key = json.dumps([self.model_name, self.weights_id, str(self.dtype), prompt])
        return self.cache_dir / "text" / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def _cached(self, prompt: str) -> torch.Tensor | None:
        path = self._cache_path(prompt)
        if path is None or not path.is_file():
            return None
        try:
            row = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (a damaged cache file is recomputed, never trusted)
            logger.warning("furl_fast.vlm: ignoring unreadable text cache %s (%s)", path, exc)
            return None
        return row if row.shape == (self.embed_dim,) else None

    def _store(self, prompt: str, row: torch.Tensor) -> None:
        path = self._cache_path(prompt)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save(row, f)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except OSError as exc:  # a read-only cache costs a recompute, nothing more
            logger.warning("furl_fast.vlm: could not write text cache %s (%s)", path, exc)


def _resolve_crop(crop: str | CropBox) -> tuple[str, CropBox | None]:
    """(the crop's name, its box function; None for "clip"). "furl" names Meta-World's FuRL crop."""
    if crop == "clip":
        return "clip", None
    if crop == "furl" or callable(crop):
        from furl_fast.envs.metaworld import furl_crop

        if crop == "furl" or crop is furl_crop:
            return "furl", furl_crop
        return f"{crop.__module__}.{crop.__qualname__}", crop
    raise ValueError(f"load_encoder: 'crop' must be 'clip', 'furl' or a crop-box function "
                     f"(height, width) -> (top, left, height, width), got {crop!r}.")


def _as_uint8_tensor(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(f"encode_frames: 'frames' must have dtype uint8, got {frames.dtype}.")
        return torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"encode_frames: 'frames' must be a torch.Tensor or numpy array, got "
                        f"{type(frames).__name__}.")
    if frames.dtype != torch.uint8:
        raise TypeError(f"encode_frames: 'frames' must have dtype uint8, got {frames.dtype}.")
    return frames


# --- loading ------------------------------------------------------------------------------------
class WeightsUnavailableError(RuntimeError):
    """The pretrained weights `tag` of `model` could not be had (not in the local cache, and no
    download possible); `reason` says what failed. `url` is the one file that holds them and
    `file_model` the model name that loads that file as pretrained=PATH. For LIV (model "liv") tag
    is None: its default weights, the release's model.pt."""

    def __init__(self, model: str, tag: str | None, reason: str) -> None:
        self.model, self.tag, self.reason = model, tag, reason
        if model == LIV:
            self.url, self.file_model = LIV_HUB_URL, LIV
            super().__init__(_no_liv_weights_message(reason))
            return
        self.url, self.file_model = pretrained_file(model, tag)
        name = self.url.rsplit("/", 1)[-1]
        super().__init__(
            f"load_encoder: could not obtain the pretrained weights {tag!r} for {model!r}: {reason}. "
            f"Without network access, download {self.url} on a machine that has it and pass the "
            f"file: load_encoder({self.file_model!r}, pretrained='/path/to/{name}') "
            f"(furl_fast.train: --vlm.model {self.file_model} --vlm.pretrained /path/to/{name}). "
            "pretrained='none' runs with random weights, whose rewards mean nothing."
        )


def pretrained_file(model: str, tag: str) -> tuple[str, str]:
    """(the URL of the file open_clip downloads for `tag` of `model`, the model name that loads that
    file as pretrained=PATH). open_clip prefers the Hugging Face Hub copy; OpenAI-trained tags need
    QuickGELU, which only the "-quickgelu" model names set for a file."""
    import huggingface_hub.constants as hub
    from open_clip.constants import HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model, tag)
    file_model = model
    if cfg.get("quick_gelu") and not model.endswith("-quickgelu"):
        file_model = model + "-quickgelu"
    if not cfg.get("hf_hub"):
        return cfg["url"], file_model
    repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" names the repo's default file
    return f"{hub.ENDPOINT}/{repo}/resolve/main/{filename or HF_WEIGHTS_NAME}", file_model


def _unreadable_checkpoint(model: str, path: str, exc: Exception) -> ValueError:
    """A checkpoint file that exists but does not load: never torch's advice to retry with full
    unpickling, which would run whatever code a file of unknown origin holds."""
    if "state_dict" in str(exc):  # it unpickled, but its tensors are not this architecture's
        return ValueError(f"load_encoder: the checkpoint {path!r} does not fit the architecture "
                          f"{model!r} (its weights have other names or shapes); give the model name "
                          "it was trained as.")
    return ValueError(f"load_encoder: cannot read {path!r} as a checkpoint ({type(exc).__name__}): it "
                      "is damaged, or not an open_clip state dict or OpenAI TorchScript archive.")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Cache-only Hugging Face Hub access: a cached checkpoint loads, a missing one fails at once.

    huggingface_hub reads this flag on every request (it is what HF_HUB_OFFLINE=1 sets at import)."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _offline_requested() -> bool:
    import huggingface_hub.constants as hub

    return bool(hub.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _host_reachable(host: str, port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _weights_host(cfg: dict) -> str:
    if cfg.get("hf_hub"):
        import huggingface_hub.constants as hub

        return urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or "huggingface.co"


def _create_from_tag(model: str, tag: str, **kwargs) -> torch.nn.Module:
    """open_clip model with a pretrained tag's weights: from the local cache when present, else
    downloaded; fails within seconds (not after the hub's minute of retries) when the host is
    unreachable."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    # OpenAI-trained tags need QuickGELU; the plain config names (e.g. "RN50") do not set it.
    kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    try:
        # open_clip logs an ERROR of its own before raising; WeightsUnavailableError says what to do.
        with _hub_offline(), _without_root_log("Failed to download"):
            return open_clip.create_model(model, pretrained=tag, **kwargs)
    except Exception as exc:  # noqa: BLE001  (any failure here means: not usable from the cache)
        cache_error = exc
    if _offline_requested():
        raise WeightsUnavailableError(
            model, tag, f"offline mode (HF_HUB_OFFLINE) and not in the local cache ({cache_error})"
        ) from cache_error
    host = _weights_host(cfg)
    if not _host_reachable(host):
        raise WeightsUnavailableError(
            model, tag, f"not in the local cache and {host} is unreachable (no network?)"
        ) from cache_error
    try:
        with _without_root_log("Failed to download"):
            return open_clip.create_model(model, pretrained=tag, **kwargs)
    except Exception as exc:
        raise WeightsUnavailableError(model, tag, f"download failed ({exc})") from exc


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _no_liv_weights_message(reason: str) -> str:
    return (
        f"load_encoder: could not obtain LIV's weights ({LIV_HUB_FILE} of the Hugging Face hub repo "
        f"{LIV_HUB_REPO}): {reason}. Without network access, download {LIV_HUB_URL} on a machine "
        "that has it "
        "and pass the file: load_encoder('liv', pretrained='/path/to/model.pt') (furl_fast.train: "
        "--vlm.model liv --vlm.pretrained /path/to/model.pt). pretrained='none' runs with random "
        "weights, whose rewards mean nothing."
    )


def _liv_hub_file() -> Path:
    """The release's model.pt: from the Hugging Face cache (where open_clip's downloads live too) when
    present, else downloaded into it; fails within seconds when the hub is unreachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(LIV_HUB_REPO, LIV_HUB_FILE, local_files_only=True))
    except Exception as exc:  # noqa: BLE001  (any failure here means: not usable from the cache)
        cache_error = exc
    if _offline_requested():
        raise WeightsUnavailableError(
            LIV, None, f"offline mode (HF_HUB_OFFLINE) and not in the local cache ({cache_error})"
        ) from cache_error
    host = _weights_host({"hf_hub": LIV_HUB_REPO})
    if not _host_reachable(host):
        raise WeightsUnavailableError(
            LIV, None, f"not in the local cache and {host} is unreachable (no network?)"
        ) from cache_error
    try:
        return Path(hf_hub_download(LIV_HUB_REPO, LIV_HUB_FILE))
    except Exception as exc:
        raise WeightsUnavailableError(LIV, None, f"download failed ({exc})") from exc


def _liv_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The OpenAI-CLIP RN50 state dict inside a LIV checkpoint (see _LIV_LAYOUT); ValueError naming
    the expected layout for any other file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (not a torch file, or one that pickles arbitrary objects)
        raise ValueError(f"load_encoder: cannot read {str(path)!r} as a LIV checkpoint ({exc}); "
                         f"expected {_LIV_LAYOUT}.") from exc
    state = payload.get("liv") if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and k.startswith(_LIV_PREFIX) for k in state):
        seen = state if isinstance(state, dict) else payload
        found = f"keys {sorted(map(str, seen))[:4]}" if isinstance(seen, dict) else \
            f"a {type(payload).__name__}"
        raise ValueError(f"load_encoder: {str(path)!r} is not a LIV checkpoint (found {found}); "
                         f"expected {_LIV_LAYOUT}.")
    return {k.removeprefix(_LIV_PREFIX): v for k, v in state.items()}


@contextlib.contextmanager
def _without_root_log(prefix: str, active: bool = True) -> Iterator[None]:
    """Drops the root logger's records (open_clip logs through it) that start with prefix while
    active: notices that furl_fast's own message replaces or makes moot."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_liv(pretrained: str | None, **kwargs) -> tuple[torch.nn.Module, str | None]:
    """(open_clip RN50-quickgelu with LIV's weights, weights id). pretrained: None (the release's
    model.pt from the hub), a local model.pt, or 'none' (random weights)."""
    if pretrained is not None and str(pretrained).lower() == "none":
        warnings.warn(RANDOM_WEIGHTS_WARNING, UserWarning, stacklevel=3)
        logger.warning(RANDOM_WEIGHTS_WARNING)
        path = None
    elif pretrained is None:
        path = _liv_hub_file()
    elif os.path.isfile(pretrained):
        path = Path(pretrained)
    else:
        raise FileNotFoundError(f"load_encoder: LIV checkpoint file not found: {pretrained!r} (for "
                                "'liv', pretrained must be None for the release's weights from the "
                                "Hugging Face hub, a local model.pt, or 'none').")
    state = None if path is None else _liv_state_dict(path)
    # open_clip's "initialized randomly" notice: LIV's weights come right after.
    with _without_root_log("No pretrained weights loaded", active=state is not None):
        net = open_clip.create_model(_LIV_ARCH, pretrained=None, **kwargs)
    if state is not None:
        try:
            net.load_state_dict(state)  # strict: every RN50 weight present, nothing else
        except RuntimeError as exc:
            raise ValueError(f"load_encoder: {str(path)!r} does not hold a CLIP RN50 ({exc}); "
                             f"expected {_LIV_LAYOUT}.") from exc
    # LIV's transform resizes with torchvision's Resize (bilinear) and normalises with CLIP's mean/std.
    open_clip.set_model_preprocess_cfg(net, {"size": 224, "mean": ops.CLIP_MEAN, "std": ops.CLIP_STD,
                                             "interpolation": "bilinear"})
    return net, None if path is None else f"sha256:{_file_digest(path)}"


def load_encoder(
    model: str = "RN50",
    pretrained: str | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    crop: str | CropBox = "furl",
    bgr: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Encoder:
    """A frozen open_clip encoder, or LIV.

    model: "liv" (FuRL's VLM, see LIV), an open_clip architecture name (open_clip.list_models(), or one
      added with open_clip.add_model_config), or an "hf-hub:org/repo" / "local-dir:/path" name
      (pretrained ignored).
    pretrained: None, the model's default weights: for "liv" the release's model.pt from the Hugging
      Face hub repo jasonyma/LIV (cached by huggingface_hub like open_clip's downloads), for open_clip
      models the "openai" tag. For open_clip models also any tag of the model
      (open_clip.list_pretrained_tags_by_model; loaded from the local cache, else downloaded; fails
      fast with instructions when neither works) or a local checkpoint file (a state dict, or OpenAI's
      TorchScript archive with a "-quickgelu" model name); for "liv" a local model.pt in LIV's own
      layout (torch.load(path)["liv"], keys "module.model." + OpenAI CLIP RN50 keys). "none": random
      weights, with a loud warning that the rewards mean nothing.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    precision: "auto" (fp16 on CUDA as in FuRL's release, fp32 on CPU), "fp32", "fp16" or "bf16".
    crop: what of each frame the model sees; the env suite's `crop` says which fits its frames.
      A crop-box function (height, width) -> (top, left, height, width): that box, bilinear resize to
      the model input. "furl" (default): Meta-World's FuRL crop (furl_fast.envs.metaworld.furl_crop:
      the central 3/4, 32:224 of a 256 frame; for LIV this is exactly LIV's own transform of that
      crop: resize to 224, centre crop 224, CLIP mean/std). "clip": open_clip's own geometry, the
      centred square, bicubic (or the model's interpolation; bilinear for LIV) resize.
    bgr: feed channels in BGR order; None, the model's default: True for "liv" (FuRL's release feeds
      LIV the BGR frames of cv2), False for open_clip models.
    cache_dir: where text embeddings are cached (default $FURL_FAST_CACHE or ~/.cache/furl_fast).
    """
    _resolve_crop(crop)  # a bad crop fails before any weights load
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"load_encoder: 'precision' must be 'auto' or one of {sorted(_DTYPES)}, got "
                         f"{precision!r}.")
    has_schema = model.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and model != LIV and model not in open_clip.list_models():
        raise ValueError(f"load_encoder: unknown open_clip model {model!r}. Known models: {LIV!r}, "
                         f"{', '.join(open_clip.list_models())}.")
    kwargs = {"precision": precision, "device": device}
    liv_weights = pretrained  # None keeps its meaning for LIV: the release's weights from the hub
    pretrained = "openai" if pretrained is None else str(pretrained)

    if model == LIV:
        net, weights_id = _load_liv(liv_weights, **kwargs)
    elif has_schema:
        net = open_clip.create_model(model, **kwargs)
        weights_id: str | None = model
    elif pretrained.lower() == "none":
        warnings.warn(RANDOM_WEIGHTS_WARNING, UserWarning, stacklevel=2)
        logger.warning(RANDOM_WEIGHTS_WARNING)
        net = open_clip.create_model(model, pretrained=None, **kwargs)
        weights_id = None
    elif open_clip.get_pretrained_cfg(model, pretrained):
        net = _create_from_tag(model, pretrained, **kwargs)
        weights_id = f"tag:{pretrained}"
    elif os.path.isfile(pretrained):
        try:
            net = open_clip.create_model(model, pretrained=pretrained, **kwargs)
        except Exception as exc:  # noqa: BLE001  (whatever the reader raised, the file is at fault)
            raise _unreadable_checkpoint(model, pretrained, exc) from exc
        weights_id = f"sha256:{_file_digest(Path(pretrained))}"
    elif os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"load_encoder: checkpoint file not found: {pretrained!r} (pretrained "
                                f"must be an open_clip tag, an existing checkpoint file, or 'none').")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"load_encoder: {pretrained!r} is neither a pretrained tag of {model!r} "
                         f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file; "
                         "pass a tag, a checkpoint path, or 'none' for random weights.")
    net.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(_LIV_ARCH if model == LIV else model)
    return Encoder(net, tokenizer, model_name=model, weights_id=weights_id, device=device,
                   dtype=_DTYPES[precision], crop=crop, bgr=model == LIV if bgr is None else bgr,
                   cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir())
