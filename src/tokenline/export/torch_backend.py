"""The export's graphs run by torch behind the runtime's Backend calls: parity's reference, `--runtime torch`."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from tokenline.export.graphs import DecoderGraph, TextEncoderGraph


def _call(module: nn.Module, inputs: dict[str, np.ndarray]):
    """The module on the inputs its forward names, as tensors (missing optional ones stay None)."""
    names = list(inspect.signature(module.forward).parameters)
    arguments = {name: torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in names if name in inputs}
    with torch.no_grad():
        return module(**arguments)


class TorchBackend:
    """TextEncoderGraph, a guided generator graph and DecoderGraph in eval mode, numpy in and out."""

    def __init__(self, text_encoder: TextEncoderGraph, generator: nn.Module, decoder: DecoderGraph):
        self.text_encoder, self.generator, self.decoder = (m.eval() for m in (text_encoder, generator, decoder))
        self.reads_text = bool(decoder.tokenizer.config.text_dim)

    def text(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MiniLM states and pooled vector."""
        states, pooled = _call(self.text_encoder, {"input_ids": ids, "attention_mask": mask})
        return states.numpy(), pooled.numpy()

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One guided velocity or logits evaluation."""
        return _call(self.generator, inputs).numpy()

    def decode(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Pixels in [0, 1]."""
        if not self.reads_text:
            inputs = {"tokens": inputs["tokens"]}
        return _call(self.decoder, inputs).numpy()
