"""torch -> ONNX for the export's graphs: the dynamo exporter with a dynamic batch, then onnx.checker.

Each graph is exported from example inputs with named dynamic axes (the batch everywhere, the
sequence length for the text encoder). Models must read the batch as `x.shape[0]`, not `len(x)`:
`len` makes the exporter bake the traced batch in as a constant, and onnxruntime then fails at
any other batch (`Concat ... mismatched dimensions`); the export stage checks batches 1 and 7.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

MAX_BATCH = 4096


def export_graph(module: nn.Module, example: dict[str, Tensor], path: Path, dynamic: dict[str, dict[int, str]],
                 output_names: list[str], opset: int) -> None:
    """Export `module(**example)` to `path` (one self-contained file) and check it with onnx.checker.

    `dynamic` maps an input name to {axis: dim name}; inputs sharing a dim name share its size.
    """
    import onnx

    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str) -> torch.export.Dim:
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1, max=MAX_BATCH if name == "batch" else 512)
        return dims[name]

    shapes = {name: {axis: dim(label) for axis, label in dynamic.get(name, {}).items()} or None for name in example}
    module.eval()
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the exporter's advice on unrelated ops, printed per graph
        torch.onnx.export(module, args=(), kwargs=example, f=str(path), dynamo=True, dynamic_shapes=shapes,
                          input_names=list(example), output_names=output_names, opset_version=opset,
                          external_data=False, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)


class _quiet_exporter:
    """Silences the exporter's INFO chatter ("Translate the graph into ONNX...") for the block."""

    def __enter__(self):
        self.loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
        return False
