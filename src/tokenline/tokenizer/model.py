"""The 1D image tokenizer: a ViT reads image patches into K latent tokens, a quantizer
squeezes them, and a second ViT paints every patch back from those K tokens alone.

TiTok's layout, with TexTok's option of caption tokens in both encoder and decoder.

`layout="grid"` is the 2D baseline to compare against: no learned latent tokens, the encoder's
outputs at the patch positions are the latents themselves (one per patch, raster order, so
K = grid**2), and the decoder reads that latent grid directly as its patch tokens (no mask
tokens). Everything downstream sees [B, K, D] latents either way.

`layout="1d-mix"` keeps K 1D tokens but forms them without attention routing: each token is a learned,
input-independent mix of every patch position's encoder output (per head of channels), and the decoder
unmixes them back to the patch positions. It can represent a PCA-like compression of the patch field
from step 0, where TiTok's latent tokens must first learn to route 64 patches through attention
(benchmarks/RESULTS.md, "1D tokens by fixed mixing").

`teacher` (TiTok's two-stage training) makes the 1D decoder predict a grid teacher's latents at
every patch position (`to_teacher`), and a copy of the teacher's decoder (`pixel_decoder`) paints
them: one model, pixels -> K tokens -> pixels, that needs no teacher once trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenline.model_checkpoint import config_from_dict, load_model
from tokenline.tokenizer.quantizers import (
    QUANTIZERS,
    CodebookQuantizer,
    QuantizerOutput,
    build_quantizer,
)

TOKEN_COUNTS = (16, 32, 64, 128)
# learned 1D latent tokens gathered by attention (TiTok) | 1D tokens, each a learned fixed mix of every
# patch position | one latent per patch (a 2D grid)
LAYOUTS = ("1d", "1d-mix", "grid")


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------

@dataclass
class TokenizerConfig:
    """Everything needed to rebuild a Tokenizer1D; saved as config.json beside the weights."""

    image_size: int = 64        # square image side in pixels
    patch_size: int = 8         # patch side in pixels; divides image_size
    channels: int = 3           # image channels
    width: int = 192            # transformer width
    depth: int = 4              # blocks in the encoder, and again in the decoder
    heads: int = 3              # attention heads; divides width
    num_tokens: int = 32        # K, latent tokens per image: 16, 32, 64 or 128
    token_dim: int = 12         # D, latent width per token; small like TiTok's 12 so codes carry meaning
    quantizer: str = "vq"       # vq | softvq | binary | kl
    quantizer_options: dict[str, Any] = field(default_factory=dict)  # constructor options of the quantizer
    codebook_size: int = 4096   # codes, for vq and softvq
    text_dim: int = 0           # caption embedding width (e.g. 384); 0: no text conditioning
    text_tokens: int = 32       # caption tokens that enter, at most; longer captions are cut
    mlp_ratio: float = 4.0      # MLP hidden width / width
    dropout: float = 0.0        # dropout in attention and MLP
    layout: str = "1d"          # 1d: K learned latent tokens | 1d-mix: K fixed mixes of the patches | grid: K = grid**2
    teacher: dict[str, Any] | None = None  # a grid tokenizer's config: its latents are the 1D decoder's targets (two-stage)

    def __post_init__(self):
        if self.layout != "grid" and self.num_tokens not in TOKEN_COUNTS:  # a grid has grid**2, whatever that is
            raise ValueError(f"num_tokens must be one of {TOKEN_COUNTS}, not {self.num_tokens}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} does not divide width {self.width}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer kind {self.quantizer!r}; choose one of: {', '.join(QUANTIZERS)}")
        if self.text_dim < 0 or (self.text_dim and self.text_tokens < 1):
            raise ValueError("text conditioning needs text_dim > 0 and text_tokens >= 1")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown tokenizer layout {self.layout!r}; choose one of: {', '.join(LAYOUTS)}")
        if self.layout == "grid" and self.num_tokens != self.grid**2:
            raise ValueError(
                f"layout 'grid' has one latent per patch: image_size {self.image_size} / patch_size "
                f"{self.patch_size} gives {self.grid}x{self.grid} = {self.grid**2} latents, but num_tokens "
                f"is {self.num_tokens}; set num_tokens to {self.grid**2} or use layout '1d'"
            )
        if self.teacher is not None:
            self.teacher = TokenizerConfig.from_dict(self.teacher).to_dict()  # checked, and stored plain
            check_teacher_fits(self, self.teacher_config)

    @property
    def teacher_config(self) -> TokenizerConfig | None:
        """The grid teacher's config (two-stage training), or None."""
        return None if self.teacher is None else TokenizerConfig.from_dict(self.teacher)

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields; `layout` only when not "1d", so 1D configs (and their hashes) stay as before."""
        values = asdict(self)
        for name, default in (("layout", "1d"), ("teacher", None)):
            if values[name] == default:  # absent when unused: older configs and their hashes stay as they were
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TokenizerConfig:
        """The config from to_dict's output; unknown fields are an error."""
        return config_from_dict(cls, values, "tokenizer")


def check_teacher_fits(student: TokenizerConfig, teacher: TokenizerConfig) -> None:
    """ValueError unless `teacher` can be a 1D tokenizer's proxy target: a grid, same resolution, patch and channels."""
    if teacher.layout != "grid":
        raise ValueError(f"a teacher tokenizer must have layout 'grid', not {teacher.layout!r}")
    if teacher.text_dim:
        raise ValueError("a teacher tokenizer reads pixels only (text_dim 0)")
    for name in ("image_size", "patch_size", "channels"):
        if getattr(teacher, name) != getattr(student, name):
            raise ValueError(f"the teacher's {name} is {getattr(teacher, name)}, the 1D tokenizer's "
                             f"{getattr(student, name)}: they must match (one teacher latent per 1D decoder patch)")


# -----------------------------------------------------------------------------
# Transformer
# -----------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm ViT block: self-attention, then an MLP, each around a residual."""

    def __init__(self, c: TokenizerConfig):
        super().__init__()
        self.heads, self.dropout = c.heads, c.dropout
        self.norm1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.norm2 = nn.LayerNorm(c.width)
        hidden = int(c.width * c.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(c.width, hidden), nn.GELU(), nn.Linear(hidden, c.width), nn.Dropout(c.dropout)
        )

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x [B, L, W]; keep [B, 1, 1, L] bool marks the keys that may be attended to."""
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b l (n h d) -> n b h l d", n=3, h=self.heads)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)
        x = x + self.proj(rearrange(attended, "b h l d -> b l (h d)"))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """ViT blocks over [tokens ; caption tokens]; returns the tokens, caption tokens dropped."""

    def __init__(self, c: TokenizerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        if c.text_dim:
            self.text_proj = nn.Linear(c.text_dim, c.width)
            # Tells caption tokens from image tokens, and their order.
            self.text_pos = nn.Parameter(torch.randn(c.text_tokens, c.width) * 0.02)

    def forward(self, x: Tensor, text: tuple[Tensor, Tensor] | None) -> Tensor:
        """x [B, L, W], text (states [B, T, text_dim], mask [B, T]) or None -> [B, L, W]."""
        length, keep = x.shape[1], None
        if text is not None:
            states, mask = text
            x = torch.cat([x, self.text_proj(states) + self.text_pos[: states.shape[1]]], dim=1)
            # Padded caption tokens are never attended to, so their values cannot matter.
            keep = torch.cat([mask.new_ones(x.shape[0], length), mask], dim=1)[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x[:, :length])


# -----------------------------------------------------------------------------
# Tokenizer
# -----------------------------------------------------------------------------

# Top-level attributes of Tokenizer1D that turn latents into pixels; every other one makes latents.
DECODER_SIDE = ("from_latent", "latent_pos", "mask_token", "mask_pos", "decoder", "to_pixels", "to_teacher",
                "pixel_decoder", "patch_unmix")


def patches_to_images(patches: Tensor, c: TokenizerConfig) -> Tensor:
    """Per-patch pixel predictions [B, grid**2, p*p*C] -> images [B, C, H, W] in [-1, 1]."""
    images = rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=c.grid, p=c.patch_size, q=c.patch_size)
    return torch.tanh(images)


class GridPixelDecoder(nn.Module):
    """A grid tokenizer's decoder alone: latents at the patch positions [B, grid**2, D] -> pixels.

    Its parameter names are the grid Tokenizer1D's own, so a teacher's decoder-side weights load as they are.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        c = self.config = config
        self.from_latent = nn.Linear(c.token_dim, c.width)
        self.latent_pos = nn.Parameter(torch.zeros(c.grid**2, c.width))
        self.decoder = Transformer(c)
        self.to_pixels = nn.Linear(c.width, c.patch_size**2 * c.channels)

    def forward(self, latents: Tensor) -> Tensor:
        """Teacher latents [B, grid**2, D] -> images [B, C, H, W] in [-1, 1]."""
        x = self.decoder(self.from_latent(latents) + self.latent_pos, None)
        return patches_to_images(self.to_pixels(x), self.config)

    def load_teacher(self, teacher: nn.Module) -> None:
        """Copy a grid tokenizer's decoder-side weights (strict: every tensor present and shaped alike)."""
        own = set(self.state_dict())
        self.load_state_dict({name: t for name, t in teacher.state_dict().items() if name in own})


class TokenMixer(nn.Module):
    """A learned linear map along the sequence axis, one [out, in] matrix per head of channels:
    [B, in, W] -> [B, out, W]. The weights do not depend on the input (MLP-Mixer's token mixing)."""

    def __init__(self, inputs: int, outputs: int, width: int, heads: int, start: Tensor | None = None):
        super().__init__()
        self.heads = heads
        bound = (6 / (inputs + outputs)) ** 0.5  # xavier-uniform, as every Linear here
        weight = torch.empty(heads, outputs, inputs).uniform_(-bound, bound)
        if start is not None:  # a known map [heads or 1, out, in] plus a little noise
            weight = start.expand(heads, -1, -1) + 0.1 * weight
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in, W] -> [B, out, W]."""
        grouped = rearrange(x, "b l (h d) -> b h l d", h=self.heads)
        return rearrange(self.weight @ grouped, "b h l d -> b l (h d)")


def block_assignment(side: int, tokens: int) -> Tensor:
    """[tokens, side**2] 0/1: which patches each token starts from. Fewer tokens than patches: each token a
    block of neighbouring patches (2 x 1 for half, 2 x 2 for a quarter ...), so the mix starts as a coarser
    grid that is known to reconstruct; more tokens: token k starts at patch k mod side**2."""
    patches = side * side
    if tokens >= patches:
        return F.one_hot(torch.arange(tokens) % patches, patches).float()
    ratio = patches // tokens
    columns = 2 ** ((ratio.bit_length()) // 2)  # block width: the larger half of the power of two
    rows = ratio // columns
    if ratio * tokens != patches or side % columns or side % rows:  # no tiling: runs of the raster order
        return F.one_hot(torch.arange(patches) * tokens // patches, tokens).float().T
    row, column = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    block = (row // rows) * (side // columns) + column // columns
    return F.one_hot(block.flatten(), tokens).float().T


def space_to_heads(blocks: Tensor, heads: int) -> Tensor:
    """[heads, tokens, patches]: the encoder mix's start, space-to-depth over heads of channels. Head h of a
    token averages its share of the token's block (with as many heads as patches per block, one patch
    each), so the patches of one block enter different channels instead of being averaged together."""
    start = torch.zeros(heads, *blocks.shape)
    for token, row in enumerate(blocks):
        members = row.nonzero().flatten()
        for head in range(heads):
            share = members[[i for i in range(len(members)) if i * heads // len(members) == head]]
            if len(share) == 0:  # more heads than patches in the block: head h reads patch h * n // heads
                share = members[[head * len(members) // heads]]
            start[head, token, share] = 1.0 / len(share)
    return start


def on_decoder_side(name: str) -> bool:
    """Whether a parameter or module name of Tokenizer1D belongs to the decoder (latents -> pixels)."""
    return name.split(".")[0] in DECODER_SIDE


class Tokenizer1D(nn.Module):
    """Image <-> K 1D tokens: ViT encoder, quantizer, ViT decoder (or K = grid**2 patch latents: layout "grid")."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        c = self.config = config
        patches = c.grid**2
        grid = c.layout == "grid"
        # Encoder: patches plus K learned latent tokens that gather the image through attention
        # (grid: no latent tokens, the patch outputs are the latents). Parameters are drawn in the
        # same order for both layouts.
        # 1D: 2D sin-cos patch positions and unit-scale latent tokens, so attention can route by
        # position from step 0 (tiny random ones left the latents a blur of the image's mean colour
        # for longer: benchmarks/RESULTS.md, "1D positions"). The grid keeps its measured init.
        token_scale = 0.02 if grid else 1.0
        self.patchify = nn.Conv2d(c.channels, c.width, c.patch_size, stride=c.patch_size)
        self.patch_pos = nn.Parameter(torch.randn(patches, c.width) * 0.02)
        if c.layout == "1d":
            self.latent_tokens = nn.Parameter(torch.randn(c.num_tokens, c.width) * token_scale)
        self.encoder = Transformer(c)
        self.to_latent = nn.Linear(c.width, c.token_dim)
        options = dict(c.quantizer_options)
        if issubclass(QUANTIZERS[c.quantizer], CodebookQuantizer):
            options.setdefault("codebook_size", c.codebook_size)
        self.quantizer = build_quantizer(c.quantizer, c.token_dim, **options)
        # Decoder: the K latents, plus one mask token per patch position to paint that patch
        # (grid: the latents sit at the patch positions, latent_pos is their position embedding).
        self.from_latent = nn.Linear(c.token_dim, c.width)
        self.latent_pos = nn.Parameter(torch.randn(c.num_tokens, c.width) * token_scale)
        if not grid:
            if c.layout == "1d":
                self.mask_token = nn.Parameter(torch.randn(c.width) * 0.02)
            self.mask_pos = nn.Parameter(torch.randn(patches, c.width) * 0.02)
            with torch.no_grad():  # overwritten after drawing, so every later parameter's seeded init is as before
                self.patch_pos.copy_(grid_sincos(c.grid, c.width))
                self.mask_pos.copy_(grid_sincos(c.grid, c.width))
        self.decoder = Transformer(c)
        if c.layout == "1d-mix":  # drawn after the others, so the other layouts' seeded init is unchanged
            blocks = block_assignment(c.grid, c.num_tokens)
            self.token_mix = TokenMixer(patches, c.num_tokens, c.width, c.heads, space_to_heads(blocks, c.heads))
            self.patch_unmix = TokenMixer(c.num_tokens, patches, c.width, c.heads, blocks.T)
        if c.teacher is None:
            self.to_pixels = nn.Linear(c.width, c.patch_size**2 * c.channels)
        else:  # two-stage: predict the teacher's latent at each patch, its decoder paints them
            teacher = c.teacher_config
            self.to_teacher = nn.Linear(c.width, teacher.token_dim)
            self.pixel_decoder = GridPixelDecoder(teacher)
        self.apply(_init_linear)

    def _text(self, text, batch: int) -> tuple[Tensor, Tensor] | None:
        """Check caption input and cut it to text_tokens: (states, bool mask) or None."""
        c = self.config
        if not c.text_dim:
            if text is not None:
                raise ValueError("this tokenizer has no text conditioning (text_dim=0); pass text=None")
            return None
        if text is None:
            raise ValueError(
                f"this tokenizer is text-conditioned (text_dim={c.text_dim}): pass text as "
                f"(states [B, T, {c.text_dim}], mask [B, T]), {{'states': ..., 'mask': ...}} or a TextEncoding"
            )
        if isinstance(text, Mapping):
            states, mask = text["states"] if "states" in text else text["tokens"], text["mask"]
        elif hasattr(text, "tokens"):  # a tokenline.text TextEncoding
            states, mask = text.tokens, text.mask
        else:
            states, mask = text
        if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != c.text_dim:
            raise ValueError(f"text states must be [{batch}, T, {c.text_dim}], got {list(states.shape)}")
        if mask.shape != states.shape[:2]:
            raise ValueError(f"text mask must be {list(states.shape[:2])}, got {list(mask.shape)}")
        return states[:, : c.text_tokens], mask[:, : c.text_tokens].bool()

    def encode(self, images: Tensor, text=None) -> QuantizerOutput:
        """Images [B, C, H, W] in [-1, 1] -> quantized K tokens."""
        text = self._text(text, images.shape[0])
        x = rearrange(self.patchify(images), "b c h w -> b (h w) c") + self.patch_pos
        if self.config.layout == "grid":  # one latent per patch, raster order
            return self.quantizer(self.to_latent(self.encoder(x, text)))
        if self.config.layout == "1d-mix":
            return self.quantizer(self.to_latent(self.token_mix(self.encoder(x, text))))
        latents = self.latent_tokens.expand(images.shape[0], -1, -1)
        x = self.encoder(torch.cat([x, latents], dim=1), text)
        return self.quantizer(self.to_latent(x[:, -self.config.num_tokens :]))

    def _decode_patches(self, latents: Tensor, text) -> Tensor:
        """Latents [B, K, D] -> the decoder's output at every patch position [B, grid**2, width]."""
        c = self.config
        text = self._text(text, latents.shape[0])
        x = self.from_latent(latents) + self.latent_pos
        if c.layout == "grid":  # the latent grid is the patch sequence
            return self.decoder(x, text)
        if c.layout == "1d-mix":
            return self.decoder(self.patch_unmix(x) + self.mask_pos, text)
        masks = (self.mask_token + self.mask_pos).expand(latents.shape[0], -1, -1)
        return self.decoder(torch.cat([x, masks], dim=1), text)[:, c.num_tokens :]

    def predict_teacher(self, latents: Tensor, text=None) -> Tensor:
        """Two-stage only: latents [B, K, D] -> the teacher's latents at every patch [B, grid**2, teacher D]."""
        if self.config.teacher is None:
            raise ValueError("this tokenizer has no teacher: predict_teacher needs a two-stage tokenizer")
        return self.to_teacher(self._decode_patches(latents, text))

    def decode(self, latents: Tensor, text=None) -> Tensor:
        """Latents [B, K, D] -> images [B, C, H, W] in [-1, 1]."""
        if self.config.teacher is not None:
            return self.pixel_decoder(self.predict_teacher(latents, text))
        return patches_to_images(self.to_pixels(self._decode_patches(latents, text)), self.config)

    def forward(self, images: Tensor, text=None, predict: str = "pixels",
                latent_noise: float = 0.0) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruct images through the tokens: (reconstruction, quantizer output).

        predict="teacher" (two-stage only) returns the predicted teacher latents in place of pixels.
        latent_noise > 0: the decoder reads noised latents (TrainConfig.latent_noise says how).
        """
        quantized = self.encode(images, text)
        if predict == "teacher":
            return self.predict_teacher(quantized.latents, text), quantized
        return self.decode(noised(quantized.latents, latent_noise), text), quantized

    @property
    def last_layer(self) -> nn.Linear:
        """The layer that writes pixels (where VQGAN's adaptive GAN weight compares gradients)."""
        return self.to_pixels if self.config.teacher is None else self.pixel_decoder.to_pixels

    def decode_codes(self, codes: Tensor, text=None) -> Tensor:
        """Images from discrete codes (vq, softvq: [B, K] ids; binary: [B, K, D] bits)."""
        return self.decode(self.quantizer.decode_codes(codes), text)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count (codebook included)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> Tokenizer1D:
        """Load a folder written by save_checkpoint, in eval mode."""
        return load_model(folder, TokenizerConfig.from_dict, cls, "tokenizer")


def noised(latents: Tensor, scale: float) -> Tensor:
    """latents + u * scale * std(latents) * N(0, 1), u ~ U(0, 1) per image (the std taken over the batch, without
    gradient); `latents` itself when scale is 0."""
    if not scale:
        return latents
    strength = torch.rand(latents.shape[0], *[1] * (latents.ndim - 1), device=latents.device, dtype=latents.dtype)
    return latents + strength * scale * latents.detach().std() * torch.randn_like(latents)


def grid_sincos(side: int, width: int) -> Tensor:
    """MAE's fixed 2D sin-cos position table [side**2, width], raster order: a quarter of the channels each
    for sin(row), cos(row), sin(column), cos(column) at geometric frequencies; leftover channels are zero."""
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter) / max(quarter, 1))
    parts = []
    for coordinate in (rows.flatten(), columns.flatten()):
        angles = coordinate[:, None].float() * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, width - table.shape[1]))


def _init_linear(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases (the ViT/DiT default)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


# -----------------------------------------------------------------------------
# Sizes
# -----------------------------------------------------------------------------

# Width, depth and heads of each named size; params pick one by name (tokenizer.size).
SIZE_DEFAULTS = {
    "T": dict(width=64, depth=2, heads=2),  # tiny: tests
    "S": dict(width=192, depth=4, heads=3),  # small: the CPU demo
    "B": dict(width=768, depth=12, heads=12, patch_size=16),  # base: GPU training (patch 16 as TiTok-B; image_size=256)
}


def Tokenizer_T(**overrides) -> Tokenizer1D:
    """Tiny: tests."""
    return Tokenizer1D(TokenizerConfig(**(SIZE_DEFAULTS["T"] | overrides)))


def Tokenizer_S(**overrides) -> Tokenizer1D:
    """Small: the CPU demo."""
    return Tokenizer1D(TokenizerConfig(**(SIZE_DEFAULTS["S"] | overrides)))


def Tokenizer_B(**overrides) -> Tokenizer1D:
    """Base: GPU training (patch 16 as TiTok-B; pass image_size=256)."""
    return Tokenizer1D(TokenizerConfig(**(SIZE_DEFAULTS["B"] | overrides)))


TOKENIZER_SIZES = {"T": Tokenizer_T, "S": Tokenizer_S, "B": Tokenizer_B}
