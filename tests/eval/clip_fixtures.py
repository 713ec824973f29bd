"""A tiny open_clip CLIP (1.6 M parameters, mostly the token embedding) built offline for tests.

``make_tiny_clip(folder)`` writes an architecture config into `folder`, registers it with
``open_clip.add_model_config`` (a process-wide registry: names are global, so variants get their own names),
builds the model from a fixed seed and saves its state dict as safetensors. The returned model name and
weights path load through any code that calls ``open_clip.create_model(name, pretrained=path)``, offline:
the config has no Hugging Face text tower, so open_clip picks its bundled ``SimpleTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    # vocab_size must stay 49408: SimpleTokenizer emits ids up to 49407 whatever the model's size.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_config(image_size: int = 32, width: int = 32) -> dict:
    """The tiny architecture, with another image size or tower width for "wrong weights" cases."""
    config = json.loads(json.dumps(TINY_CLIP))
    config["vision_cfg"].update(image_size=image_size, width=width)
    config["text_cfg"]["width"] = width
    return config


def make_tiny_clip(
    folder: Path,
    image_size: int = 32,
    width: int = 32,
    seed: int = 0,
    match: tuple[torch.Tensor, list[str]] | None = None,
    steps: int = 60,
) -> tuple[str, Path]:
    """Register a tiny CLIP config and save seeded weights under `folder`; returns (model_name, weights_path).

    `match` = (images [N, 3, S, S] in [-1, 1] at `image_size`, captions): the weights are first trained for
    `steps` Adam steps with the CLIP contrastive loss so that image i matches caption i. The images are
    normalised with open_clip's default (OpenAI) mean/std, the constants open_clip attaches to a model loaded
    from a local file.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tokenline-tiny-clip-{image_size}px-w{width}"
    config_file = folder / f"{name}.json"
    config_file.write_text(json.dumps(tiny_clip_config(image_size, width)))
    open_clip.add_model_config(config_file)

    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    if match is not None:
        _train_to_match(open_clip, model, open_clip.get_tokenizer(name), *match, steps=steps)
    weights = folder / f"{name}-seed{seed}{'-matched' if match is not None else ''}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return name, weights


def _train_to_match(open_clip, model, tokenizer, images: torch.Tensor, captions: list[str], steps: int) -> None:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images = ((images + 1.0) / 2.0 - mean) / std
    loss_fn = open_clip.ClipLoss()
    tokens = tokenizer(captions)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
