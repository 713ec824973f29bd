"""Build an exported pipeline folder from the lineage's checkpoints, and measure its parity with torch.

`export_pipeline` writes the three graphs, the text tokenizer and `pipeline.json`; `torch_backend`
wraps the same modules for the runtime's loop; `measure_parity` runs that loop through both backends
on the same prompts and seeds, at several batch sizes, and compares the images.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenline.artifacts import atomic_write_json, hash_file
from tokenline.export.numpy_sampling import FLOW_SAMPLERS
from tokenline.export.graphs import DecoderGraph, GuidedFlowGraph, GuidedMaskedGraph, TextEncoderGraph
from tokenline.export.onnx_export import export_graph
from tokenline.export.runtime import GRAPH_FILES, PIPELINE_FILE, TOKENIZER_FILE, OnnxPipeline
from tokenline.export.torch_backend import TorchBackend
from tokenline.generator.generate import SamplingOptions
from tokenline.generator.model import FlowTransformer, MaskedTransformer
from tokenline.text.encoder import MiniLMEncoder, TextEncoder
from tokenline.tokenizer.model import Tokenizer1D

EXAMPLE_BATCH = 2  # traced batch; 0 and 1 would be specialised by the exporter


def _check_exportable(generator, sampling: SamplingOptions, encoder: TextEncoder) -> None:
    if not isinstance(encoder, MiniLMEncoder):
        raise ValueError(f"the export covers the minilm text encoder, not {encoder.name!r}")
    if isinstance(generator, FlowTransformer) and sampling.sampler not in FLOW_SAMPLERS:
        raise ValueError(f"the exported pipeline samples with {', '.join(FLOW_SAMPLERS)}, not {sampling.sampler!r}: "
                         "set generator.sample.sampler")
    if sampling.guidance_interval is not None:
        raise ValueError("the exported pipeline guides every step; generator.sample.guidance_interval must be null")


def graph_modules(generator, tokenizer: Tokenizer1D, encoder: MiniLMEncoder):
    """(text encoder graph, guided generator graph, decoder graph) over the live modules."""
    guided = GuidedFlowGraph(generator) if isinstance(generator, FlowTransformer) else GuidedMaskedGraph(generator)
    decoder = DecoderGraph(tokenizer, codes=isinstance(generator, MaskedTransformer))
    return TextEncoderGraph(encoder.module), guided, decoder


def torch_backend(generator, tokenizer: Tokenizer1D, encoder: MiniLMEncoder) -> TorchBackend:
    """The runtime's backend calls served by the torch modules themselves."""
    return TorchBackend(*graph_modules(generator, tokenizer, encoder))


def _examples(generator, tokenizer: Tokenizer1D, encoder: MiniLMEncoder) -> dict[str, dict[str, torch.Tensor]]:
    c, b = generator.config, EXAMPLE_BATCH
    caption = {"states": torch.randn(b, c.text_tokens, c.text_dim), "mask": torch.ones(b, c.text_tokens, dtype=torch.bool),
               "pooled": torch.randn(b, c.text_pooled_dim), "empty": torch.tensor([False, True])}
    if isinstance(generator, FlowTransformer):
        step = {"x": torch.randn(b, c.num_tokens, c.token_dim), "t": torch.full((b,), 0.5), **caption}
        tokens = torch.randn(b, c.num_tokens, c.token_dim)
    else:
        step = {"codes": torch.randint(0, c.codebook_size, (b, c.num_tokens)), **caption}
        tokens = torch.randint(0, c.codebook_size, (b, c.num_tokens))
    decoder = {"tokens": tokens}
    if tokenizer.config.text_dim:
        decoder |= {"states": caption["states"], "mask": caption["mask"]}
    ids = torch.randint(1000, 2000, (b, 8))
    return {"text_encoder": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "generator": {**step, "guidance": torch.tensor([2.0])}, "decoder": decoder}


_DYNAMIC = {
    "text_encoder": {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
    "generator": {name: {0: "batch"} for name in ("x", "t", "codes", "states", "mask", "pooled", "empty")},
    "decoder": {name: {0: "batch"} for name in ("tokens", "states", "mask")},
}
_OUTPUTS = {"text_encoder": ["states", "pooled"], "generator": ["guided"], "decoder": ["images"]}


def export_pipeline(folder: Path, generator, tokenizer: Tokenizer1D, encoder: TextEncoder, sampling: SamplingOptions,
                    sources: dict[str, str], opset: int, source_dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the graphs, tokenizer.json and pipeline.json into `folder`; returns pipeline.json's content.

    `sources` are the source checkpoints' content hashes; `source_dirs` where they live, relative to
    the published folder (what `--runtime torch` loads).
    """
    _check_exportable(generator, sampling, encoder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = dict(zip(("text_encoder", "generator", "decoder"), graph_modules(generator, tokenizer, encoder)))
    examples = _examples(generator, tokenizer, encoder)
    for name, module in modules.items():
        export_graph(module, examples[name], folder / GRAPH_FILES[name], _DYNAMIC[name], _OUTPUTS[name], opset)
    shutil.copyfile(Path(encoder.path) / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    spec = describe(generator, tokenizer, encoder, sampling, sources, opset) | {"source_dirs": source_dirs or {}}
    spec["files"] = {file: hash_file(folder / file) for file in (*GRAPH_FILES.values(), TOKENIZER_FILE)}
    atomic_write_json(folder / PIPELINE_FILE, spec)
    return spec


def describe(generator, tokenizer: Tokenizer1D, encoder: MiniLMEncoder, sampling: SamplingOptions,
             sources: dict[str, str], opset: int) -> dict[str, Any]:
    """pipeline.json without its file hashes: what the runtime needs to sample, and where it came from."""
    from tokenizers import Tokenizer

    c, t = generator.config, tokenizer.config
    flow = isinstance(generator, FlowTransformer)
    pad_token = "[PAD]"
    pad_id = Tokenizer.from_file(str(Path(encoder.path) / TOKENIZER_FILE)).token_to_id(pad_token)
    return {
        "format": 1,
        "generator": {"objective": c.objective, "num_tokens": c.num_tokens, "token_dim": c.token_dim,
                      "codebook_size": c.codebook_size, "binary": c.binary,
                      "latent_mean": generator.latent_mean.tolist() if flow else [],
                      "latent_std": generator.latent_std.tolist() if flow else [], "sampler": sampling.sampler, "steps": sampling.steps,
                      "guidance": sampling.guidance, "temperature": sampling.temperature},
        "decoder": {"image_size": t.image_size, "channels": t.channels, "quantizer": t.quantizer,
                    "reads_text": bool(t.text_dim)},
        "text": {"encoder": encoder.name, "max_tokens": encoder.max_tokens, "text_tokens": c.text_tokens,
                 "pad_token": pad_token, "pad_id": pad_id, "weights_sha256": encoder.weights_hash()},
        "sources": sources,
        "opset": opset,
    }


def measure_parity(folder: Path, reference: TorchBackend, prompts: list[str], batch_sizes: list[int],
                   threads: int | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(figures, onnxruntime images, torch images): max and mean |torch - onnxruntime| in [0, 1] per batch size.

    Images are compared as floats, before rounding to 8 bits. The torch images are made once in a
    single batch; each onnxruntime run splits the prompts into batches of the given size, so a batch
    dimension fixed at export time shows up as an error or a gap.
    """
    onnx_pipeline = OnnxPipeline(folder, threads=threads)
    torch_pipeline = OnnxPipeline(folder, backend=reference, verify=False)
    started = time.perf_counter()
    expected = torch_pipeline.render(prompts)
    torch_s = time.perf_counter() - started
    runs, worst, images = [], 0.0, expected
    for size in batch_sizes:
        started = time.perf_counter()
        images = np.concatenate(list(onnx_pipeline.generate_batches(prompts, batch_size=size, unit=True)))
        seconds = time.perf_counter() - started
        gap = np.abs(images - expected)
        runs.append({"batch_size": size, "max_abs_diff": float(gap.max()), "mean_abs_diff": float(gap.mean()),
                     "ms_per_image": 1000 * seconds / len(prompts)})
        worst = max(worst, float(gap.max()))
    figures = {"prompts": len(prompts), "max_abs_diff": worst, "runs": runs,
               "torch_ms_per_image": 1000 * torch_s / len(prompts), "providers": onnx_pipeline.backend.providers}
    return figures, images, expected
