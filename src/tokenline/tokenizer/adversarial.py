"""VQGAN-style adversarial training parts for the tokenizer: a PatchGAN discriminator, hinge
losses, the adaptive generator weight, the warm-up switch, and an optional VGG perceptual loss.

The perceptual loss only runs from weights already on disk; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# Discriminator
# -----------------------------------------------------------------------------

def _groups(channels: int) -> int:
    """The largest divisor of channels that is at most 32: GroupNorm's group count."""
    return max(d for d in range(1, min(32, channels) + 1) if channels % d == 0)


def _init_conv(module: nn.Module) -> None:
    """pix2pix init: conv weights N(0, 0.02), biases zero."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per overlapping image patch."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1 or width < 1:
            raise ValueError(f"layers and width must be at least 1, not layers={layers}, width={width}")
        # Each stride-2 conv floors the side by half, and the two stride-1 convs take one pixel
        # each, so at least 3 pixels must be left after the stride-2 convs.
        self.min_size = 3 * 2**layers
        # GroupNorm, not BatchNorm: batch statistics are noisy at small batches, and under DDP
        # every replica would normalize with its own statistics.
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        out = width
        for i in range(1, layers + 1):
            # The last pass is the stride-1 conv with norm; the ones before it halve the side.
            inp, out = out, width * min(2**i, 8)
            stride = 2 if i < layers else 1
            # No bias: the norm right after removes it anyway.
            blocks += [
                nn.Conv2d(inp, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_groups(out), out),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(out, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.apply(_init_conv)

    def forward(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> logits [B, 1, h, w]."""
        height, width = images.shape[-2:]
        if min(height, width) < self.min_size:
            raise ValueError(
                f"input of {height}x{width} pixels is too small for this discriminator: "
                f"the minimum side is {self.min_size} pixels"
            )
        return self.net(images)


# -----------------------------------------------------------------------------
# Losses and weights
# -----------------------------------------------------------------------------

def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss of the discriminator: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """Hinge loss of the generator: -mean(fake logits)."""
    return -fake_logits.mean()


def adaptive_weight(
    reconstruction_loss: Tensor,
    generator_loss: Tensor,
    last_layer: Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Tensor:
    """VQGAN's generator weight: ||d rec / d last|| / (||d gen / d last|| + eps), clamped, detached."""
    # retain_graph: the caller still backpropagates through both losses afterwards.
    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (gen_grad,) = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gen_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def adversarial_factor(step: int, start_step: int) -> float:
    """0.0 before start_step, 1.0 from it on."""
    # Warm-up: the discriminator only switches on once the reconstruction has settled; a
    # discriminator facing blurry early reconstructions wins too easily and its gradients are noise.
    return 1.0 if step >= start_step else 0.0


# -----------------------------------------------------------------------------
# Perceptual loss
# -----------------------------------------------------------------------------

# Indices in vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.
VGG_LAYERS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_notice_logged = False


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a torch.save file (tensors only, never pickled code)."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class VGGPerceptualLoss(nn.Module):
    """LPIPS without its learned linear heads: squared distance of unit-normalized VGG16 features.

    x, y in [-1, 1] [B, 3, H, W]; the loss is the sum over relu1_2 ... relu5_3 of the mean squared
    difference of the channel-normalized activations. Frozen, always in eval mode.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        import torchvision  # heavy (about 3 s to import) and only needed when VGG weights are given

        path = Path(weights)
        # On the meta device: vgg16() would otherwise allocate and initialize its 100M-parameter
        # classifier only to throw it away; the strict load below fills every feature tensor.
        with torch.device("meta"):
            features = torchvision.models.vgg16(weights=None).features
        self.features = features.to_empty(device="cpu")
        state = _read_state_dict(path)
        if any(key.startswith("features.") for key in state):
            # A full vgg16 state dict: keep the features, drop the classifier.
            state = {key.removeprefix("features."): v for key, v in state.items() if key.startswith("features.")}
        expected = set(self.features.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path} is not a VGG16 features state dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        try:
            self.features.load_state_dict(state)
        except RuntimeError as error:  # right keys, wrong shapes
            raise ValueError(f"{path} does not fit VGG16 features: {error}") from error
        self.features.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        """Stay in eval mode even when a parent module calls .train()."""
        return super().train(False)

    def _activations(self, images: Tensor) -> list[Tensor]:
        """Channel-normalized activations at VGG_LAYERS of images in [-1, 1]."""
        x = ((images + 1) / 2 - self.mean) / self.std
        out = []
        # Stops at relu5_3: the final max-pool feeds no layer that is read.
        for index in range(VGG_LAYERS[-1] + 1):
            x = self.features[index](x)
            if index in VGG_LAYERS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Perceptual distance of x and y, both [B, 3, H, W] in [-1, 1] -> scalar."""
        return sum(
            ((fx - fy) ** 2).mean() for fx, fy in zip(self._activations(x), self._activations(y), strict=True)
        )


def load_perceptual_loss(path: str | Path | None) -> VGGPerceptualLoss | None:
    """The perceptual loss from a local weights file, or None (with one notice per process)."""
    global _notice_logged
    if path is not None and Path(path).is_file():
        return VGGPerceptualLoss(path)
    if not _notice_logged:
        _notice_logged = True
        reason = "" if path is None else f"; {path} does not exist"
        logger.warning(
            "perceptual loss skipped: no local VGG16 weights "
            "(set tokenizer.train.loss.perceptual_weights to a local file)%s",
            reason,
        )
    return None


def _reset_notice() -> None:
    """Let the next load_perceptual_loss without weights log its notice again (for tests)."""
    global _notice_logged
    _notice_logged = False
