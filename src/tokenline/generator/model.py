"""Transformers that generate the K 1D tokens of an image from its caption.

Two heads on one DiT-style backbone (adaLN-zero blocks, text by cross-attention or in context):

- FlowTransformer: the velocity of a rectified flow over continuous latents [B, K, D] (kl, softvq,
  and binary latents as ±1, signed at the end), conditioned on the time t and the caption.
- MaskedTransformer: logits over the codebook for every position of a partly masked code
  sequence [B, K] (vq), MaskGIT/MaskGen-style, conditioned on the caption.

Caption dropout for classifier-free guidance: a dropped caption becomes a learned null caption
(a pooled vector, and a key token that cross-attention can always attend to), so `text=None`
asks for the unconditional prediction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenline.model_checkpoint import config_from_dict

OBJECTIVES = ("flow", "masked")
TEXT_MODES = ("cross", "context")


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------

@dataclass
class GeneratorConfig:
    """Everything needed to rebuild a generator; saved as config.json beside the weights."""

    objective: str = "flow"         # flow (continuous latents) | masked (vq codes)
    num_tokens: int = 32            # K, tokens per image (the tokenizer's)
    token_dim: int = 12             # D, latent width per token (flow input and output)
    codebook_size: int = 0          # masked: codes in the tokenizer's codebook (the mask id is this value)
    width: int = 256                # transformer width
    depth: int = 6                  # blocks
    heads: int = 4                  # attention heads; divides width
    mlp_ratio: float = 4.0          # MLP hidden width / width
    text_dim: int = 384             # width of the caption's token states
    text_pooled_dim: int = 384      # width of the caption's pooled embedding
    text_tokens: int = 32           # caption token states read, at most
    text_mode: str = "cross"        # cross: cross-attention in every block | context: caption tokens join self-attention
    text_refiner: int = 0           # trainable transformer layers over the caption tokens before the blocks read them
    binary: bool = False            # flow over ±1 latents (binary quantizer): samples are signed at the end
    latent_mean: list[float] = field(default_factory=list)  # flow: per-channel mean of the training latents
    latent_std: list[float] = field(default_factory=list)   # flow: per-channel std; latents are standardized with both
    tokenizer_hash: str = ""        # content hash of the tokenizer checkpoint whose tokens this models
    quantizer: str = ""             # that tokenizer's quantizer kind

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, not {self.text_mode!r}")
        if self.text_refiner < 0:
            raise ValueError(f"text_refiner is a layer count, not {self.text_refiner}")
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} does not divide width {self.width}")
        if self.objective == "masked" and self.codebook_size < 2:
            raise ValueError("a masked generator needs the tokenizer's codebook_size (at least 2)")
        for name in ("latent_mean", "latent_std"):
            values = getattr(self, name)
            if values and len(values) != self.token_dim:
                raise ValueError(f"{name} has {len(values)} channels, token_dim is {self.token_dim}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GeneratorConfig:
        """The config from to_dict's output; unknown fields are an error."""
        return config_from_dict(cls, values, "generator")


@dataclass
class TextBatch:
    """A batch of captions as the generator reads them: token states, their mask, the pooled vector."""

    states: Tensor  # [B, T, text_dim]
    mask: Tensor    # [B, T] bool, True on real caption tokens
    pooled: Tensor  # [B, text_pooled_dim]

    def __len__(self) -> int:
        return len(self.states)

    def to(self, device) -> TextBatch:
        """The same batch on `device`."""
        return TextBatch(self.states.to(device), self.mask.to(device), self.pooled.to(device))

    def select(self, keep: Tensor) -> TextBatch:
        """The rows where `keep` is True."""
        return TextBatch(self.states[keep], self.mask[keep], self.pooled[keep])

    def concat(self, other: TextBatch) -> TextBatch:
        """These rows, then `other`'s."""
        return TextBatch(torch.cat([self.states, other.states]), torch.cat([self.mask, other.mask]),
                         torch.cat([self.pooled, other.pooled]))


# -----------------------------------------------------------------------------
# Blocks
# -----------------------------------------------------------------------------

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention from x to `context` (x itself when None), keys masked by `keep`."""

    def __init__(self, width: int, heads: int, context_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width or width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """x [B, L, W], context [B, S, Wc], keep [B, S] bool -> [B, L, W]."""
        context = x if context is None else context
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.kv(context), "b s (n h d) -> n b h s d", n=2, h=self.heads)
        mask = None if keep is None else keep[:, None, None, :]
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h l d -> b l (h d)"))


class GeneratorBlock(nn.Module):
    """adaLN-zero DiT block: self-attention, optional cross-attention to the caption, MLP."""

    def __init__(self, c: GeneratorConfig):
        super().__init__()
        self.cross = c.text_mode == "cross"
        self.norm1 = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c.width, c.heads)
        if self.cross:
            # Cross-attention is not modulated: its query norm is learned, as in PixArt.
            self.norm_cross = nn.LayerNorm(c.width, eps=1e-6)
            self.cross_attn = Attention(c.width, c.heads)
        self.norm2 = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        hidden = int(c.width * c.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c.width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, c.width))
        # Zero-initialised: every block starts as the identity (the "zero" of adaLN-zero).
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 6 * c.width))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, cond: Tensor, text: Tensor, text_keep: Tensor, self_keep: Tensor | None) -> Tensor:
        """x [B, L, W], cond [B, W], text [B, S, W] with text_keep [B, S]; self_keep masks self-attention keys."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), keep=self_keep)
        if self.cross:
            x = x + self.cross_attn(self.norm_cross(x), text, text_keep)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection to the output width."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out)
        for layer in (self.ada[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x [B, L, W], cond [B, W] -> [B, L, out]."""
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DiT's integer steps) -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class TextRefiner(nn.Module):
    """Pre-norm transformer layers over the caption tokens (null token first), padding masked out."""

    def __init__(self, c: GeneratorConfig):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            c.width, c.heads, int(c.width * c.mlp_ratio), dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, c.text_refiner, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.width, eps=1e-6)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """tokens [B, S, W] with keep [B, S] (True on real tokens) -> refined tokens [B, S, W]."""
        return self.norm(self.layers(tokens, src_key_padding_mask=~keep))


# -----------------------------------------------------------------------------
# Backbone
# -----------------------------------------------------------------------------

class Backbone(nn.Module):
    """Token positions, caption conditioning (with the learned null caption) and the block stack."""

    def __init__(self, c: GeneratorConfig):
        super().__init__()
        self.config = c
        self.pos = nn.Parameter(torch.randn(c.num_tokens, c.width) * 0.02)
        self.text_proj = nn.Linear(c.text_dim, c.width)
        self.text_pos = nn.Parameter(torch.randn(c.text_tokens, c.width) * 0.02)
        self.pooled_proj = nn.Sequential(nn.Linear(c.text_pooled_dim, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        # The null caption: what a dropped caption becomes. The null key token is always
        # attendable, so no attention row is ever fully masked (softmax over nothing is NaN).
        self.null_pooled = nn.Parameter(torch.zeros(c.width))
        self.null_token = nn.Parameter(torch.randn(1, c.width) * 0.02)
        # Optional trainable layers over the caption, so each word sees its neighbours before the
        # image tokens read it (as Lumina's context refiner or HunyuanVideo's token refiner). Tried
        # for the shapes relations, which frozen states might not bind to nouns: 6,000 steps with
        # two layers left position at chance (README, shapes), so it stays off by default.
        self.refiner = TextRefiner(c) if c.text_refiner else None
        self.blocks = nn.ModuleList(GeneratorBlock(c) for _ in range(c.depth))
        self.apply(_init_linear)
        for block in self.blocks:  # _init_linear would undo the zero init of the modulations
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)

    def caption(self, text: TextBatch | None, batch: int, drop: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled condition [B, W], caption tokens [B, 1 + T, W], keep [B, 1 + T]); dropped rows see only the null caption."""
        c = self.config
        device = self.pos.device
        null_tokens = self.null_token.expand(batch, -1, -1)
        if text is None:
            keep = torch.ones(batch, 1, dtype=torch.bool, device=device)
            # Refined alone, the null token is what a dropped caption's keeps: both read the same.
            if self.refiner is not None:
                null_tokens = self.refiner(null_tokens, keep)
            return self.null_pooled.expand(batch, -1), null_tokens, keep
        if text.states.shape[-1] != c.text_dim or text.pooled.shape[-1] != c.text_pooled_dim:
            raise ValueError(
                f"caption states are {text.states.shape[-1]}-wide and pooled {text.pooled.shape[-1]}-wide; "
                f"this generator reads {c.text_dim} and {c.text_pooled_dim}"
            )
        states, mask = text.states[:, : c.text_tokens], text.mask[:, : c.text_tokens].bool()
        pooled = self.pooled_proj(text.pooled.to(self.pos.dtype))
        if drop is not None:
            pooled = torch.where(drop[:, None], self.null_pooled.expand_as(pooled), pooled)
            mask = mask & ~drop[:, None]
        tokens = self.text_proj(states.to(self.pos.dtype)) + self.text_pos[: states.shape[1]]
        keep = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), mask], dim=1)
        tokens = torch.cat([null_tokens, tokens], dim=1)
        if self.refiner is not None:
            tokens = self.refiner(tokens, keep)
        return pooled, tokens, keep

    def forward(self, x: Tensor, cond: Tensor, text: TextBatch | None, drop: Tensor | None) -> Tensor:
        """x [B, K, W] embedded tokens, cond [B, W] (time or zero) -> [B, K, W] features, and the final condition."""
        pooled, tokens, keep = self.caption(text, x.shape[0], drop)
        cond = cond + pooled
        x = x + self.pos
        self_keep = None
        if self.config.text_mode == "context":
            length = x.shape[1]
            x = torch.cat([x, tokens], dim=1)
            self_keep = torch.cat([keep.new_ones(x.shape[0], length), keep], dim=1)
        for block in self.blocks:
            x = block(x, cond, tokens, keep, self_keep)
        return x[:, : self.config.num_tokens], cond


def _init_linear(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases (the DiT default)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# -----------------------------------------------------------------------------
# Generators
# -----------------------------------------------------------------------------

class FlowTransformer(nn.Module):
    """Velocity of a rectified flow over standardized latents [B, K, D], given time t and caption."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        if config.objective != "flow":
            raise ValueError(f"FlowTransformer needs objective 'flow', the config says {config.objective!r}")
        c = self.config = config
        self.backbone = Backbone(c)
        self.embed = nn.Linear(c.token_dim, c.width)
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.head = FinalLayer(c.width, c.token_dim)
        for layer in (self.embed, self.time_mlp[0], self.time_mlp[2]):
            _init_linear(layer)
        mean = torch.tensor(c.latent_mean or [0.0] * c.token_dim)
        std = torch.tensor(c.latent_std or [1.0] * c.token_dim)
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_std", std, persistent=False)

    def forward(self, x: Tensor, t: Tensor, text: TextBatch | None = None, drop: Tensor | None = None) -> Tensor:
        """x [B, K, D] standardized latents at time t [B] -> velocity [B, K, D]."""
        return self.head(*self.features(x, t, text, drop))

    def features(self, x: Tensor, t: Tensor, text: TextBatch | None = None,
                 drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The backbone's token features [B, K, W] and final condition [B, W] (what the head reads; DMD2's GAN head too)."""
        cond = self.time_mlp(timestep_embedding(t, self.config.width).to(x.dtype))
        return self.backbone(self.embed(x), cond, text, drop)

    def normalize(self, latents: Tensor) -> Tensor:
        """Tokenizer latents -> the standardized space the flow runs in."""
        return (latents - self.latent_mean) / self.latent_std

    def denormalize(self, x: Tensor) -> Tensor:
        """Flow samples -> tokenizer latents (signed to ±1 for binary latents)."""
        latents = x * self.latent_std + self.latent_mean
        if self.config.binary:
            # sign() would map an exact 0 to 0, which is no bit: ties go to +1.
            latents = torch.where(latents >= 0, 1.0, -1.0).to(latents.dtype)
        return latents


class MaskedTransformer(nn.Module):
    """Logits over the codebook for each of K positions of a partly masked code sequence, given the caption."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        if config.objective != "masked":
            raise ValueError(f"MaskedTransformer needs objective 'masked', the config says {config.objective!r}")
        c = self.config = config
        self.backbone = Backbone(c)
        self.embed = nn.Embedding(c.codebook_size + 1, c.width)  # the last id is [MASK]
        nn.init.normal_(self.embed.weight, std=0.02)
        self.head = FinalLayer(c.width, c.codebook_size)

    @property
    def mask_id(self) -> int:
        """The id of the [MASK] token."""
        return self.config.codebook_size

    def forward(self, codes: Tensor, text: TextBatch | None = None, drop: Tensor | None = None) -> Tensor:
        """codes [B, K] (mask_id where masked) -> logits [B, K, codebook_size]."""
        x = self.embed(codes)
        cond = torch.zeros(codes.shape[0], self.config.width, device=x.device, dtype=x.dtype)
        features, cond = self.backbone(x, cond, text, drop)
        return self.head(features, cond)


def build_generator(config: GeneratorConfig) -> FlowTransformer | MaskedTransformer:
    """The generator class the config's objective names."""
    return FlowTransformer(config) if config.objective == "flow" else MaskedTransformer(config)


def num_params(model: nn.Module) -> int:
    """Parameter count."""
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Sizes
# -----------------------------------------------------------------------------

# Width, depth and heads of each named size; params pick one by name (generator.size).
SIZE_DEFAULTS = {
    "T": dict(width=64, depth=2, heads=2),     # tiny: tests
    "S": dict(width=256, depth=6, heads=4),    # small: the CPU demo
    "B": dict(width=768, depth=12, heads=12),  # base: GPU training
}
