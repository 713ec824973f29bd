"""TiTok's two-stage training of a 1D tokenizer against a grid teacher.

Stage 1 ("proxy", the first `train.proxy_steps` steps): the 1D encoder reads pixels into K
tokens, the quantizer squeezes them, and the 1D decoder predicts the frozen teacher's latent at
every patch position; the loss lives in the teacher's latent space (regression, or cross-entropy
over the teacher's codes for a vq teacher). The copy of the teacher's decoder is not trained.

Stage 2 ("pixels", the remaining steps): the encoder and quantizer are fixed at their exported
(EMA) weights, so every latent stays as it is, and the 1D decoder with the teacher's pixel
decoder learn on pixels (L1/L2, + GAN after its warm-up) like any tokenizer.

A tokenizer without a teacher trains in the "pixels" phase throughout, its encoder free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenline.tokenizer.model import Tokenizer1D, on_decoder_side
from tokenline.training import EMA

PROXY, PIXELS = "proxy", "pixels"


def phase_at(step: int, proxy_steps: int, has_teacher: bool) -> str:
    """The phase of the step after `step` steps have been taken."""
    return PROXY if has_teacher and step < proxy_steps else PIXELS


def freeze_encoder_side(model: Tokenizer1D, ema: EMA) -> None:
    """Fix the encoder and quantizer at their exported (EMA) weights, in eval mode, so the latents stay as they are.

    Eval mode matters beyond dropout: codebook quantizers update usage buffers while training,
    and the kl quantizer samples its posterior; frozen, it hands the decoder its means, which
    are the latents the token cache holds.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not on_decoder_side(name):
                parameter.copy_(ema.shadow[name].to(parameter.dtype))
                parameter.requires_grad_(False)
    for name, module in model.named_children():
        if not on_decoder_side(name):
            module.eval()


def enter_phase(model: Tokenizer1D, ema: EMA, phase: str, freeze_encoder: bool) -> None:
    """Set what trains in `phase`: in "proxy" all but the pixel decoder; in "pixels" the decoder side
    (encoder frozen when the tokenizer has a teacher). `freeze_encoder` freezes the encoder in both:
    the latents then stay bit-identical whatever the phase."""
    pixel_decoder = getattr(model, "pixel_decoder", None)
    if phase == PROXY:
        pixel_decoder.requires_grad_(False)
        pixel_decoder.eval()
        if freeze_encoder:
            freeze_encoder_side(model, ema)
        return
    if pixel_decoder is not None:
        pixel_decoder.requires_grad_(True)
        pixel_decoder.train()
    if freeze_encoder or model.config.teacher is not None:
        freeze_encoder_side(model, ema)


@torch.no_grad()
def teacher_targets(teacher: Tokenizer1D, images: Tensor) -> Tensor:
    """What stage 1 regresses on: the teacher's latents [B, grid**2, D] (codes [B, grid**2] for a vq teacher)."""
    quantized = teacher.encode(images)
    if teacher.config.quantizer == "vq":
        return quantized.codes
    return quantized.latents.float()


def proxy_loss(predicted: Tensor, targets: Tensor, teacher: Tokenizer1D) -> Tensor:
    """Stage 1's loss in the teacher's latent space.

    A vq teacher: cross-entropy over its codes, the logits being the negative squared distances
    from each predicted latent to every code vector the teacher's decoder can read. Any other
    teacher: the mean squared error against its latents.
    """
    predicted = predicted.float()
    if teacher.config.quantizer != "vq":
        return F.mse_loss(predicted, targets)
    codes = teacher.quantizer.decode_codes(torch.arange(teacher.config.codebook_size, device=predicted.device))
    logits = -torch.cdist(predicted.flatten(0, 1), codes.float()).square()
    return F.cross_entropy(logits, targets.flatten())
