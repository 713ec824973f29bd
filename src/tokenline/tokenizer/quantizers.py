"""Quantizers between the 1D tokenizer's encoder and decoder: one interface, four kinds.

Each maps encoder outputs z [B, K, D] to the latents the decoder reads (same shape), the
codes a generator models, and its own loss:

    vq      TiTok: cosine nearest code, straight-through, dead codes restarted
    softvq  SoftVQ-VAE: a softmax mix of codes, fully differentiable
    binary  Instella-T2I: every channel is -1 or +1, straight-through
    kl      a diagonal Gaussian posterior (the SD-VAE recipe): continuous latents, no codes
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# Interface
# -----------------------------------------------------------------------------

@dataclass
class QuantizerOutput:
    """What a quantizer hands on: decoder latents, codes, its loss, and terms to log."""

    latents: Tensor        # [B, K, D] what the decoder consumes
    codes: Tensor | None   # [B, K] long (vq, softvq), [B, K, D] bool (binary), None (kl)
    loss: Tensor           # scalar: the quantizer's own loss terms, weighted and summed
    terms: dict[str, Tensor] = field(default_factory=dict)  # unweighted scalars for logging


class Quantizer(nn.Module):
    """Base class: forward(z [B, K, D]) -> QuantizerOutput."""

    kind: ClassVar[str] = ""

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize encoder outputs z [B, K, D]."""
        raise NotImplementedError

    def encode_codes(self, z: Tensor) -> Tensor:
        """Codes for encoder outputs z, without losses or statistics."""
        raise NotImplementedError(f"the {self.kind!r} quantizer has no discrete codes")

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Decoder latents [B, K, D] for codes from encode_codes."""
        raise NotImplementedError(f"the {self.kind!r} quantizer has no discrete codes")

    def usage_stats(self) -> dict[str, float]:
        """Running usage statistics for logging; empty when there is nothing to track."""
        return {}


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a count vector: how many equally used codes it is worth."""
    p = counts / counts.sum().clamp_min(1e-12)
    return torch.special.entr(p).sum().exp()


# -----------------------------------------------------------------------------
# Codebook quantizers: vq and softvq
# -----------------------------------------------------------------------------

class CodebookQuantizer(Quantizer):
    """Shared by vq and softvq: an l2-normalized codebook and running usage counts."""

    def __init__(self, dim: int, codebook_size: int, dead_after: int, usage_decay: float):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))
        self.dead_after = dead_after    # a code unpicked this many training steps is dead
        self.usage_decay = usage_decay  # EMA decay of the usage counts
        # Each code's share of the picks per training step, as an EMA: perplexity reads it.
        self.register_buffer("usage", torch.zeros(codebook_size))
        # Training steps since each code was last picked; a fresh code counts as unused.
        self.register_buffer("idle", torch.full((codebook_size,), dead_after, dtype=torch.long))

    def normalized_codebook(self) -> Tensor:
        """Codes on the unit sphere [N, D]."""
        # Cosine lookup (ViT-VQGAN, TiTok): codes and encoder outputs share a bounded space,
        # so codes cannot drift far from the encoder and die.
        return F.normalize(self.codebook.float(), dim=-1)

    def similarities(self, z: Tensor) -> Tensor:
        """Cosine similarity of every token to every code [B, K, N]."""
        return F.normalize(z.float(), dim=-1) @ self.normalized_codebook().T

    def encode_codes(self, z: Tensor) -> Tensor:
        """Nearest code per token [B, K]."""
        return self.similarities(z).argmax(-1)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """The (normalized) code vectors [B, K, D]."""
        return self.normalized_codebook()[codes]

    def count(self, codes: Tensor) -> Tensor:
        """Picks per code in this batch [N]."""
        return torch.bincount(codes.flatten(), minlength=len(self.codebook)).float()

    @torch.no_grad()
    def track_usage(self, counts: Tensor) -> None:
        """Fold one training step's counts into the running usage."""
        self.usage.lerp_(counts / counts.sum(), 1 - self.usage_decay)
        self.idle += 1
        self.idle[counts > 0] = 0

    def usage_stats(self) -> dict[str, float]:
        """Share of codes picked in the last dead_after steps, and running perplexity."""
        return {
            "usage": (self.idle < self.dead_after).float().mean().item(),
            "perplexity": perplexity(self.usage).item(),
        }


class VectorQuantizer(CodebookQuantizer):
    """TiTok's VQ: cosine nearest code, codebook + commitment loss, dead-code restarts."""

    kind = "vq"

    def __init__(
        self,
        dim: int,
        codebook_size: int = 4096,
        beta: float = 0.25,             # commitment weight: pulls the encoder to its code
        codebook_weight: float = 1.0,   # pulls the picked code to the encoder output
        restart_every: int = 100,       # training steps between dead-code restarts; 0: never
        dead_after: int = 100,          # restart codes unpicked for this many steps
        usage_decay: float = 0.99,
    ):
        super().__init__(dim, codebook_size, dead_after, usage_decay)
        self.beta = beta
        self.codebook_weight = codebook_weight
        self.restart_every = restart_every
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Nearest code per token, straight-through to z."""
        if self.training:
            self.step += 1
            # Before the lookup: editing the codebook after it would break this step's backward.
            if self.restart_every and int(self.step) % self.restart_every == 0:
                self.restart_dead_codes(z)
        zn = F.normalize(z.float(), dim=-1)
        codes = (zn @ self.normalized_codebook().T).argmax(-1)
        q = self.decode_codes(codes)
        commit = F.mse_loss(zn, q.detach())
        codebook = F.mse_loss(q, zn.detach())
        # Straight-through: the decoder sees exactly q, the encoder gets q's gradient.
        latents = q.detach() + (zn - zn.detach())
        counts = self.count(codes)
        if self.training:
            self.track_usage(counts)
        loss = self.codebook_weight * codebook + self.beta * commit
        terms = {"commit": commit, "codebook": codebook, "perplexity": perplexity(counts)}
        return QuantizerOutput(latents.to(z.dtype), codes, loss, terms)

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor) -> int:
        """Move codes unpicked for dead_after steps onto random encoder outputs of z."""
        # One process's view: under data parallelism, broadcast the codebook afterwards.
        dead = (self.idle >= self.dead_after).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        pool = rearrange(z.detach().float(), "b k d -> (b k) d")
        picks = torch.randint(len(pool), (len(dead),), device=pool.device)
        self.codebook[dead] = pool[picks].to(self.codebook.dtype)
        self.idle[dead] = 0  # a grace period to get picked
        return len(dead)


class SoftVectorQuantizer(CodebookQuantizer):
    """SoftVQ-VAE: latents are a softmax(similarity / tau) mix of codes; no straight-through."""

    kind = "softvq"

    def __init__(
        self,
        dim: int,
        codebook_size: int = 4096,
        tau: float = 0.1,               # softmax temperature; toward 0 it becomes hard vq
        entropy_weight: float = 0.0,    # weight of the entropy term (0: off, still logged)
        dead_after: int = 100,          # for the usage statistic only
        usage_decay: float = 0.99,
    ):
        super().__init__(dim, codebook_size, dead_after, usage_decay)
        self.tau = tau
        self.entropy_weight = entropy_weight

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Soft assignment to the codebook; codes are the argmax, for statistics."""
        logits = self.similarities(z) / self.tau
        probs = logits.softmax(-1)
        latents = probs @ self.normalized_codebook()
        codes = logits.argmax(-1)
        # Entropy term: each token confident, yet the batch spread over the codebook.
        # log_softmax rather than log(probs): a probability of exactly 0 stays finite.
        token_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
        mean_probs = probs.mean((0, 1))
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        entropy = token_entropy - batch_entropy
        counts = self.count(codes)
        if self.training:
            self.track_usage(counts)
        terms = {
            "entropy": entropy,
            "token_entropy": token_entropy,
            "batch_entropy": batch_entropy,
            "perplexity": perplexity(counts),
        }
        return QuantizerOutput(latents.to(z.dtype), codes, self.entropy_weight * entropy, terms)


# -----------------------------------------------------------------------------
# Binary and continuous quantizers
# -----------------------------------------------------------------------------

def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(p), elementwise."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class BinaryQuantizer(Quantizer):
    """Instella-T2I-style binary latents: each channel -1 or +1, straight-through."""

    kind = "binary"

    def __init__(
        self,
        dim: int,
        estimator: str = "tanh",        # gradient of the sign: "tanh" (its derivative) or "identity"
        stochastic: bool = False,       # training: sample bits with P(+1) = sigmoid(2 z)
        balance_weight: float = 0.01,   # pushes each bit's batch mean toward 1/2
        usage_decay: float = 0.99,
    ):
        super().__init__()
        if estimator not in ("tanh", "identity"):
            raise ValueError(f"binary estimator must be 'tanh' or 'identity', not {estimator!r}")
        self.estimator = estimator
        self.stochastic = stochastic
        self.balance_weight = balance_weight
        self.usage_decay = usage_decay
        self.register_buffer("bit_mean", torch.full((dim,), 0.5))  # EMA of P(bit = +1) per channel

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Bits per channel; latents exactly +-1."""
        dtype, z = z.dtype, z.float()
        soft = torch.tanh(z) if self.estimator == "tanh" else z
        if self.stochastic and self.training:
            # E[bit] = tanh(z): the sample is unbiased for the tanh relaxation.
            bits = torch.bernoulli(torch.sigmoid(2 * z)).bool()
        else:
            bits = self.encode_codes(z)
        # hard + (soft - soft) is hard exactly in the forward pass, soft's gradient in the backward.
        latents = self.decode_codes(bits) + (soft - soft.detach())
        # Balance: each bit's batch mean of P(+1) toward 1/2, as 1 - entropy (0 when balanced).
        # Per token slot and channel, over the batch: needs batches of more than one image.
        p_mean = torch.sigmoid(2 * z).mean(0)
        balance = (1 - binary_entropy(p_mean) / math.log(2)).mean()
        if self.training:
            self.bit_mean.lerp_(bits.float().mean((0, 1)), 1 - self.usage_decay)
        terms = {"balance": balance, "bit_mean": bits.float().mean()}
        return QuantizerOutput(latents.to(dtype), bits, self.balance_weight * balance, terms)

    def encode_codes(self, z: Tensor) -> Tensor:
        """Bits [B, K, D] (True = +1); 0 counts as +1."""
        return z >= 0

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Latents in {-1, +1} for bits."""
        return codes.float() * 2 - 1

    def usage_stats(self) -> dict[str, float]:
        """Bit balance (1: every channel half +1, 0: constant) and bit entropy in bits."""
        return {
            "bit_balance": (1 - (2 * self.bit_mean - 1).abs()).mean().item(),
            "bit_entropy": (binary_entropy(self.bit_mean) / math.log(2)).mean().item(),
        }


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), summed over channels, averaged over tokens."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(-1).mean()


class KLQuantizer(Quantizer):
    """Continuous latents from a diagonal Gaussian posterior, sampled in training."""

    kind = "kl"

    def __init__(self, dim: int, kl_weight: float = 1e-4):
        super().__init__()
        self.moments = nn.Linear(dim, 2 * dim)  # z -> (mean, logvar)
        self.kl_weight = kl_weight

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Reparameterized sample in training, the mean at eval."""
        mean, logvar = self.moments(z).float().chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite
        latents = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        kl = kl_divergence(mean, logvar)
        terms = {"kl": kl, "std": (0.5 * logvar).exp().mean()}
        return QuantizerOutput(latents.to(z.dtype), None, self.kl_weight * kl, terms)


# -----------------------------------------------------------------------------
# Registry
# -----------------------------------------------------------------------------

QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "softvq": SoftVectorQuantizer,
    "binary": BinaryQuantizer,
    "kl": KLQuantizer,
}


def build_quantizer(kind: str, dim: int, **options) -> Quantizer:
    """The quantizer named `kind` over dim-wide tokens; options go to its constructor."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {kind!r}; choose one of: {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[kind]
    try:
        inspect.signature(cls).bind(dim, **options)
    except TypeError as error:
        # Options come from params files: name the kind rather than a constructor.
        raise ValueError(f"bad options for the {kind!r} quantizer: {error}") from None
    return cls(dim, **options)
