"""From prompts to images: clean the prompts, encode them, sample tokens, decode with the tokenizer.

Prompts are cleaned by `tokenline.prompts.clean_prompt`, and the text encoder keeps only its
first `text_tokens` tokens (a 2,000-character prompt is cut, not refused). An empty prompt
(or one that is empty once cleaned) asks for an unconditional sample: the generator sees its
null caption. Non-Latin text passes through: MiniLM's WordPiece maps what it does not know to
[UNK], which is a poor caption but not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm
from torch import Tensor

from tokenline.generator.masked_decoding import decode_masked, guided_logits
from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch
from tokenline.generator.samplers import (
    CountingVelocity,
    build_sampler,
    guided_velocity,
)
from tokenline.prompts import clean_prompt
from tokenline.text.captions import cut_or_pad

@dataclass
class SamplingOptions:
    """How to sample: the sampler and its steps, guidance, and masked decoding's temperature."""

    sampler: str = "euler"        # flow: euler | heun | euler_maruyama | time_shift
    steps: int = 25               # flow: integration steps; masked: decoding rounds
    guidance: float = 1.0         # classifier-free guidance scale; 1: conditional only
    guidance_interval: tuple[float, float] | None = None  # flow: guide only for t in (low, high]
    temperature: float = 1.0      # masked: softmax temperature of the sampled codes
    seed: int = 0                 # noise and sampling randomness

    def describe(self) -> dict:
        """The options as a protocol record for reports."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance,
                "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
                "temperature": self.temperature, "seed": self.seed}


def encode_prompts(prompts: list[str], text_encoder, text_tokens: int) -> tuple[TextBatch, Tensor]:
    """(TextBatch, empty [B] bool) for prompts; empty marks prompts that are empty once cleaned."""
    cleaned = [clean_prompt(p) for p in prompts]
    encoding = text_encoder.encode(cleaned)
    states, mask = cut_or_pad(encoding.tokens.float(), encoding.mask, text_tokens)
    # Rounded like the token cache stores them, so sampling sees what training saw.
    text = TextBatch(states.half().float(), mask, encoding.pooled.float().half().float())
    empty = torch.tensor([not p for p in cleaned], dtype=torch.bool)
    return text, empty


@torch.no_grad()
def flow_endpoint(model: FlowTransformer, text: TextBatch, options: SamplingOptions, drop: Tensor | None = None,
                  generator: torch.Generator | None = None, noise: Tensor | None = None) -> tuple[Tensor, int]:
    """(the ODE/SDE endpoint at t = 0 in the flow's standardized space, network evaluations) from `noise` (default: the seed's)."""
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    if noise is None:
        noise = torch.randn(len(text), model.config.num_tokens, model.config.token_dim, generator=generator, device=device)
    # NFE counts network evaluations: a guided step costs two.
    conditional = CountingVelocity(lambda x, t: model(x, t, text, drop))
    unconditional = CountingVelocity(lambda x, t: model(x, t, None))
    velocity = guided_velocity(conditional, unconditional, options.guidance, options.guidance_interval)
    result = build_sampler(options.sampler).sample(velocity, noise, options.steps, generator=generator)
    return result.x, conditional.calls + unconditional.calls


@torch.no_grad()
def sample_tokens(
    model: FlowTransformer | MaskedTransformer, text: TextBatch, options: SamplingOptions,
    empty: Tensor | None = None,
) -> tuple[Tensor, int]:
    """(tokenizer latents [B, K, D] for a flow model, or codes [B, K] for a masked one; velocity/logit evaluations)."""
    model.eval()
    device = next(model.parameters()).device
    text = text.to(device)
    drop = None if empty is None else empty.to(device)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    batch, c = len(text), model.config
    if isinstance(model, FlowTransformer):
        x, calls = flow_endpoint(model, text, options, drop, generator)
        return model.denormalize(x), calls
    calls = 0

    def conditional(codes: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return model(codes, text, drop)

    def unconditional(codes: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return model(codes, None)

    codes = decode_masked(
        guided_logits(conditional, unconditional, options.guidance), batch, c.num_tokens, model.mask_id,
        steps=options.steps, temperature=options.temperature, generator=generator, device=device,
    )
    return codes, calls


@torch.no_grad()
def tokens_to_images(tokens: Tensor, tokenizer, text: TextBatch | None = None) -> Tensor:
    """Decode latents [B, K, D] or codes [B, K] with the tokenizer -> images [B, C, H, W] in [-1, 1]."""
    tokenizer.eval()
    condition = None
    if tokenizer.config.text_dim:
        if text is None:
            raise ValueError("this tokenizer is text-conditioned: decoding needs the captions")
        condition = (text.states[:, : tokenizer.config.text_tokens], text.mask[:, : tokenizer.config.text_tokens])
    if tokens.dtype in (torch.int32, torch.int64):
        return tokenizer.decode_codes(tokens, condition)
    return tokenizer.decode(tokens, condition)


def generate_images(
    model: FlowTransformer | MaskedTransformer, tokenizer, prompts: list[str], text_encoder,
    options: SamplingOptions, batch_size: int = 64, progress: str | None = None,
) -> tuple[Tensor, int]:
    """Images [N, C, H, W] in [-1, 1] for prompts, in batches; and the model evaluations per batch of the last batch.

    `progress` names a progress bar over the images (None: silent).
    """
    images, calls = [], 0
    bar = tqdm(total=len(prompts), desc=progress, unit="img", disable=progress is None)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        text, empty = encode_prompts(chunk, text_encoder, model.config.text_tokens)
        chunk_options = SamplingOptions(**{**options.__dict__, "seed": options.seed + start})
        tokens, calls = sample_tokens(model, text, chunk_options, empty)
        images.append(tokens_to_images(tokens.cpu(), tokenizer, text))
        bar.update(len(chunk))
    bar.close()
    if not images:
        size = tokenizer.config.image_size
        return torch.zeros(0, tokenizer.config.channels, size, size), 0
    return torch.cat(images), calls
