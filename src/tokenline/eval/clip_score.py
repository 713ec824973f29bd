"""CLIPScore of generated images against their captions, from an open_clip model loaded from a local file.

Definition (Hessel et al. 2021 with weight w = 100, as torchmetrics' ``CLIPScore`` scales it)::

    clip_score = mean over images i of 100 * max(cos(E_image(x_i), E_text(c_i)), 0)

``clip_score_std`` is the population standard deviation (ddof=0) of the per-image values, so a single image
gives 0 rather than NaN. torchmetrics clamps the *mean* at 0 instead of each image; the two agree whenever no
image-caption cosine is negative, which is the usual case for trained CLIP models.

Weights are read from a local ``.safetensors`` / ``.bin`` / ``.pt`` file only, through the same offline checks as
:class:`tokenline.text.OpenCLIPTextEncoder`: nothing is ever downloaded. Images use the pipeline's convention
(float [N, 3, H, W] in [-1, 1], see :mod:`tokenline.tokenizer.pixels`) and are resized, cropped and normalised
in torch with the model's own preprocessing constants, mirroring open_clip's eval transform without a PIL round
trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenline.artifacts import hash_file
from tokenline.text.encoder import (
    SHORT_HASH,
    freeze,
    local_weights_file,
    offline_text_config,
)

DEFINITION = "100 * max(cos(image, caption), 0), mean over images"
PROGRESS_MIN_BATCHES = 8  # below this many batches a progress bar is noise
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


class ClipScorer:
    """CLIPScore with a frozen open_clip model (image and text towers) whose weights come from a local file.

    ``preprocess_tag`` names an open_clip pretrained tag (e.g. ``"laion2b_s34b_b79k"``) whose image mean/std,
    interpolation and resize mode should be used: open_clip only applies a tag's preprocessing when it
    downloads that tag, and falls back to the OpenAI constants for a local file, which is wrong for e.g.
    MobileCLIP, CLIPA or EVA weights. The tag is looked up in open_clip's bundled table; nothing is fetched.
    """

    def __init__(
        self,
        model_name: str,
        weights: str | Path,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        preprocess_tag: str | None = None,
    ) -> None:
        if weights is None:
            # Random weights would give a number that looks like a metric but means nothing.
            raise ValueError("ClipScorer needs a local weights file (weights=None is not allowed)")
        weights_file = local_weights_file(weights)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        import open_clip  # slow import (timm, ...), only paid when CLIPScore is asked for

        offline_text_config(open_clip, model_name)
        forced = _tag_preprocess(open_clip, model_name, preprocess_tag)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=str(weights_file),  # resolved absolute path: never mistaken for a download tag
                pretrained_text=False,
                device=device,
                force_preprocess_cfg=forced,
            )
            _check_shapes(model, weights_file)
        except torch.OutOfMemoryError:
            raise  # a RuntimeError too, but not the file's fault
        except Exception as err:  # shape, key and format errors all mean "this file is not that model"
            raise ValueError(
                f"weights file {weights_file} does not fit OpenCLIP model {model_name!r}: {err}"
            ) from err
        self.model = freeze(model)
        self.model_name = model_name
        self.weights_file = weights_file
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.preprocess_tag = preprocess_tag
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        self.resize_mode = str(cfg.get("resize_mode", "shortest"))
        self.fill_color = int(cfg.get("fill_color", 0))
        self.context_length = int(getattr(model, "context_length", 77))
        self._open_clip_version = getattr(open_clip, "__version__", "unknown")
        self._weights_hash: str | None = None

    def preprocess(self, images: Tensor) -> Tensor:
        """Pipeline images [N, 3, H, W] in [-1, 1] -> the model's normalised input [N, 3, S, S] on its device."""
        x = ((images.to(self.device, torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)  # clipped like a saved image
        x = _resize(x, self.image_size, self.resize_mode, self.interpolation, self.fill_color / 255.0)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def cosines(self, images: Tensor, captions: list[str], progress: bool | None = None) -> Tensor:
        """Per-pair cosine similarity [N] (CPU, float64) between image i and caption i."""
        _check_inputs(images, captions)
        starts = range(0, len(images), self.batch_size)
        if progress is None:
            progress = len(starts) >= PROGRESS_MIN_BATCHES
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="clip_score", unit="batch")
        parts = []
        for start in starts:
            stop = start + self.batch_size
            image_features = self.model.encode_image(self.preprocess(images[start:stop]), normalize=True)
            tokens = self.tokenizer(list(captions[start:stop])).to(self.device)  # truncated to the context
            text_features = self.model.encode_text(tokens, normalize=True)
            parts.append((image_features.float() * text_features.float()).sum(dim=-1).double().cpu())
        return torch.cat(parts)

    def score(self, images: Tensor, captions: list[str], progress: bool | None = None) -> dict[str, float]:
        """{"clip_score", "clip_score_std"} of images [N, 3, H, W] in [-1, 1] against their N captions."""
        per_image = 100.0 * self.cosines(images, captions, progress).clamp_min(0.0)
        return {"clip_score": float(per_image.mean()), "clip_score_std": float(per_image.std(correction=0))}

    def weights_hash(self) -> str:
        """Short sha256 of the weights file (computed once: large checkpoints take seconds to hash)."""
        if self._weights_hash is None:
            self._weights_hash = hash_file(self.weights_file)[:SHORT_HASH]
        return self._weights_hash

    def describe(self) -> dict[str, Any]:
        """The protocol behind the number (JSON-serialisable), for reports to print next to it."""
        return {
            "metric": "clip_score",
            "definition": DEFINITION,
            "std": "population std (ddof=0) of the per-image scores",
            "model": self.model_name,
            "weights": self.weights_file.name,
            "weights_sha256": self.weights_hash(),
            "preprocess_tag": self.preprocess_tag,
            "image_size": list(self.image_size),
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "context_length": self.context_length,
            "open_clip": self._open_clip_version,
        }

    def protocol(self) -> str:
        """describe() as one line of text, like GenerationMetrics.protocol()."""
        size = "x".join(str(s) for s in self.image_size)
        return (
            f"CLIPScore: {DEFINITION}; open_clip {self.model_name} weights {self.weights_file.name} "
            f"(sha256 {self.weights_hash()}), {size} px {self.resize_mode} {self.interpolation} resize, "
            f"captions truncated to {self.context_length} tokens"
        )


def _tag_preprocess(open_clip: Any, model_name: str, tag: str | None) -> dict[str, Any] | None:
    """Preprocessing constants of a known pretrained tag, read from open_clip's bundled table (no download)."""
    if tag is None:
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"unknown open_clip pretrained tag {tag!r} for {model_name!r}; known tags: {known}")
    # Not "size": the image size must stay the model's own, whatever the tag's training resolution was.
    return {k: cfg[k] for k in _PREPROCESS_KEYS if cfg.get(k) is not None}


def _check_shapes(model: torch.nn.Module, weights_file: Path) -> None:
    """Refuse tensors whose size differs from the model's; open_clip silently interpolates positional embeddings."""
    if weights_file.suffix != ".safetensors":
        return  # reading shapes of a pickle means loading it twice; open_clip's strict load still checks the rest
    from safetensors import safe_open

    expected = model.state_dict()
    wrong = []
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("module.")  # DataParallel checkpoints; open_clip strips it too
            if name in expected:
                shape = tuple(f.get_slice(key).get_shape())
                # Compare element counts: open_clip reshapes a scalar logit_scale to [1] and back on its own.
                if torch.Size(shape).numel() != expected[name].numel():
                    wrong.append(f"{name} {list(shape)} vs model {list(expected[name].shape)}")
    if wrong:
        raise ValueError("tensor shapes differ: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))


def _check_inputs(images: Tensor, captions: list[str]) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("images must be a float tensor [N, 3, H, W] in [-1, 1]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str, not a single str")
    if len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("CLIPScore of zero images is undefined")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is {type(caption).__name__}, expected str")
    if not torch.isfinite(images).all():
        # NaN would pass the clamp and poison every score in the batch without an error.
        raise ValueError("images contain NaN or infinite values")


def _resize(x: Tensor, size: tuple[int, int], mode: str, interpolation: str, fill: float) -> Tensor:
    """open_clip's eval geometry (torchvision Resize / ResizeKeepRatio, then center crop or pad) in torch."""
    height, width = x.shape[-2:]
    target_h, target_w = size
    if mode == "squash":
        new = (target_h, target_w)
    elif mode == "shortest" and target_h == target_w:
        # torchvision Resize(int): the short edge becomes the size, the long edge is truncated, not rounded.
        short, long = min(height, width), max(height, width)
        new_long = int(target_h * long / short)
        new = (target_h, new_long) if height <= width else (new_long, target_h)
    elif mode in ("shortest", "longest"):
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
        new = (round(height / ratio), round(width / ratio))
    else:
        raise ValueError(f"unsupported open_clip resize_mode {mode!r}")
    if new != (height, width):
        interp = "bilinear" if interpolation == "bilinear" else "bicubic"
        # antialias matches PIL's downscaling; the clamp matches PIL's uint8 output (bicubic overshoots).
        x = F.interpolate(x, size=new, mode=interp, align_corners=False, antialias=True).clamp(0.0, 1.0)
    return _center_crop_or_pad(x, size, fill)


def _center_crop_or_pad(x: Tensor, size: tuple[int, int], fill: float) -> Tensor:
    """torchvision center_crop / open_clip center_crop_or_pad offsets, for [N, C, H, W] tensors."""
    target_h, target_w = size
    height, width = x.shape[-2:]
    if target_h > height or target_w > width:
        pad_h, pad_w = max(target_h - height, 0), max(target_w - width, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        height, width = x.shape[-2:]
    top = round((height - target_h) / 2.0)
    left = round((width - target_w) / 2.0)
    return x[..., top : top + target_h, left : left + target_w]
