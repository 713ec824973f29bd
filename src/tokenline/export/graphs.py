"""The three torch modules the export traces, each a single evaluation with numpy-friendly inputs.

- `TextEncoderGraph`: MiniLM token ids and attention mask -> per-token states (zero at padding)
  and the pooled sentence vector (mean over real tokens, L2-normalised: sentence-transformers).
- `GuidedFlowGraph` / `GuidedMaskedGraph`: one velocity (flow) or logits (masked) evaluation with
  classifier-free guidance folded in: the conditional and the null-caption rows run as one batch
  inside the graph, and the guidance scale is an input.
- `DecoderGraph`: latents [B, K, D] (or codes [B, K]) -> images [B, C, H, W] in [0, 1].

The null caption is asked for with the generator's `drop` rows (the same path caption dropout
trains), so one graph serves both halves of the guided batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch
from tokenline.tokenizer.model import Tokenizer1D


class TextEncoderGraph(nn.Module):
    """A BERT sentence encoder (MiniLM): (input_ids, attention_mask) -> (states [B, S, W], pooled [B, W])."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """int64 ids and mask [B, S] -> states zeroed at padding, and the normalised mean of the real ones."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state.float()
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        hidden = hidden * keep
        pooled = hidden.sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return hidden, F.normalize(pooled, dim=-1)


def _guided_text(states: Tensor, mask: Tensor, pooled: Tensor, empty: Tensor) -> tuple[TextBatch, Tensor]:
    """The caption batch twice (conditional rows, then null rows) and the rows' drop flags."""
    text = TextBatch(torch.cat([states, states]), torch.cat([mask, mask]), torch.cat([pooled, pooled]))
    return text, torch.cat([empty, torch.ones_like(empty)])


def _guide(both: Tensor, batch: int, guidance: Tensor) -> Tensor:
    conditional, unconditional = both[:batch].float(), both[batch:].float()
    return unconditional + guidance * (conditional - unconditional)


class GuidedFlowGraph(nn.Module):
    """One guided velocity: v_null + guidance (v_cond - v_null) for standardized latents x at times t."""

    def __init__(self, model: FlowTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, states: Tensor, mask: Tensor, pooled: Tensor, empty: Tensor,
                guidance: Tensor) -> Tensor:
        """x [B, K, D], t [B], caption (states [B, T, W], mask [B, T] bool, pooled [B, W]), empty [B] bool, guidance [1]."""
        text, drop = _guided_text(states, mask, pooled, empty)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), text, drop)
        return _guide(both, x.shape[0], guidance)


class GuidedMaskedGraph(nn.Module):
    """One guided logits evaluation: l_null + guidance (l_cond - l_null) for a partly masked code sequence."""

    def __init__(self, model: MaskedTransformer):
        super().__init__()
        self.model = model

    def forward(self, codes: Tensor, states: Tensor, mask: Tensor, pooled: Tensor, empty: Tensor,
                guidance: Tensor) -> Tensor:
        """codes [B, K] int64 (mask id where masked), caption as GuidedFlowGraph -> logits [B, K, V] float32."""
        text, drop = _guided_text(states, mask, pooled, empty)
        both = self.model(torch.cat([codes, codes]), text, drop)
        return _guide(both, codes.shape[0], guidance)


class DecoderGraph(nn.Module):
    """The tokenizer's decoder: latents [B, K, D] (codes [B, K] for vq) -> images [B, C, H, W] in [0, 1].

    A text-conditioned tokenizer (TexTok) also reads the caption states and mask.
    """

    def __init__(self, tokenizer: Tokenizer1D, codes: bool):
        super().__init__()
        self.tokenizer, self.codes = tokenizer, codes

    def forward(self, tokens: Tensor, states: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Tokens (and, if text-conditioned, caption states [B, T, W] and mask [B, T]) -> pixels in [0, 1]."""
        c = self.tokenizer.config
        text = None if states is None else (states[:, : c.text_tokens], mask[:, : c.text_tokens])
        images = self.tokenizer.decode_codes(tokens, text) if self.codes else self.tokenizer.decode(tokens, text)
        return ((images.float() + 1) / 2).clamp(0, 1)
