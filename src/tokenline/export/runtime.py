"""Prompts -> images with numpy and onnxruntime only: the exported pipeline a downstream team runs.

    from tokenline.export.runtime import OnnxPipeline
    pipeline = OnnxPipeline("models/openmoji/onnx")
    images = pipeline.generate(["a red heart"], steps=25, guidance=3.0, seed=0)  # uint8 [N, H, W, 3]

The folder holds `pipeline.json`, `tokenizer.json` and three graphs (`text_encoder.onnx`,
`generator.onnx`, `decoder.onnx`); `pipeline.json` records every file's sha256, and a folder whose
files are missing, truncated or changed is refused with one line naming the file. Importing this
module imports no torch; `OnnxPipeline` takes any backend with the same three calls, which is how
the export stage runs the identical loop through the torch modules to measure parity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from tokenline.artifacts import hash_file
from tokenline.export import numpy_sampling
from tokenline.prompts import clean_prompt

PIPELINE_FILE = "pipeline.json"
GRAPH_FILES = {"text_encoder": "text_encoder.onnx", "generator": "generator.onnx", "decoder": "decoder.onnx"}
TOKENIZER_FILE = "tokenizer.json"
MODEL_ARTIFACT = "pipeline"  # the exported folder's name among a registered MLflow model's artifacts


class PipelineError(ValueError):
    """An exported pipeline folder that cannot be used: the message names the file and what is wrong."""


class Backend(Protocol):
    """Evaluates the three exported graphs on numpy arrays."""

    def text(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask [B, S] int64 -> (states [B, S, W], pooled [B, W]) float32."""

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One guided generator evaluation; inputs named as the generator graph's."""

    def decode(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Tokens (and caption states, mask if the tokenizer reads them) -> images [B, C, H, W] in [0, 1]."""


def read_pipeline(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """pipeline.json of an exported folder, with every listed file present and (verify) matching its sha256."""
    folder = Path(folder)
    spec_file = folder / PIPELINE_FILE
    if not spec_file.is_file():
        raise PipelineError(f"{folder} is not an exported pipeline: it has no {PIPELINE_FILE}")
    try:
        spec = json.loads(spec_file.read_text())
        files = spec["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PipelineError(f"{spec_file} is not a pipeline description ({err})") from err
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise PipelineError(f"{path} is missing (listed in {PIPELINE_FILE})")
        if verify and hash_file(path) != digest:
            raise PipelineError(f"{path} does not match the sha256 in {PIPELINE_FILE}: truncated or changed")
    return spec


def session_options(threads: int | None):
    """onnxruntime session options with `threads` intra-op threads (None: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxBackend:
    """The three graphs of a folder as onnxruntime sessions."""

    def __init__(self, folder: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime

        options = session_options(threads)
        self.providers = providers or default_providers()
        self.sessions = {
            name: onnxruntime.InferenceSession(str(Path(folder) / file), options, providers=self.providers)
            for name, file in GRAPH_FILES.items()
        }
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in self.sessions.items()}

    def text(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MiniLM states and pooled vector."""
        states, pooled = self.sessions["text_encoder"].run(None, {"input_ids": ids, "attention_mask": mask})
        return states, pooled

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One guided velocity or logits evaluation."""
        return self.sessions["generator"].run(None, self._only("generator", inputs))[0]

    def decode(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Pixels in [0, 1]."""
        return self.sessions["decoder"].run(None, self._only("decoder", inputs))[0]

    def _only(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: value for name, value in inputs.items() if name in self._inputs[graph]}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images [B, C, H, W] in [0, 1] -> uint8 [B, H, W, C] (rounded, as tokenline saves images)."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)


class OnnxPipeline:
    """An exported pipeline folder: prompts -> uint8 images, the sampler loop in numpy."""

    def __init__(self, folder: str | Path, backend: Backend | None = None, threads: int | None = None,
                 verify: bool = True):
        self.folder = Path(folder)
        self.spec = read_pipeline(self.folder, verify=verify)
        self.backend = backend if backend is not None else OnnxBackend(self.folder, threads)
        from tokenizers import Tokenizer  # Rust tokenizers: no torch

        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_FILE))
        text = self.spec["text"]
        self.tokenizer.enable_truncation(max_length=text["max_tokens"])
        self.tokenizer.enable_padding(pad_id=text["pad_id"], pad_token=text["pad_token"])

    @property
    def image_size(self) -> int:
        """Side of the square images, in pixels."""
        return int(self.spec["decoder"]["image_size"])

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Caption inputs of the generator: states, mask, pooled, and empty (prompts that clean to nothing)."""
        cleaned = [clean_prompt(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(cleaned)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        states, pooled = self.backend.text(ids, attention)
        length = int(self.spec["text"]["text_tokens"])
        mask = attention[:, :length].astype(bool)
        states = states[:, :length] * mask[..., None]
        missing = length - states.shape[1]
        if missing > 0:
            states = np.pad(states, ((0, 0), (0, missing), (0, 0)))
            mask = np.pad(mask, ((0, 0), (0, missing)))
        # Rounded to float16 as the token cache stores captions, so sampling sees what training saw.
        return {"states": states.astype(np.float16).astype(np.float32), "mask": mask,
                "pooled": pooled.astype(np.float16).astype(np.float32),
                "empty": np.array([not p for p in cleaned], dtype=bool)}

    def sample_tokens(self, caption: dict[str, np.ndarray], steps: int, guidance: float, seed: int,
                      first_index: int = 0) -> np.ndarray:
        """Latents [B, K, D] float32 (flow) or codes [B, K] int64 (masked) for encoded captions."""
        g = self.spec["generator"]
        streams = numpy_sampling.image_streams(seed, first_index, len(caption["empty"]))
        scale = np.array([guidance], dtype=np.float32)
        if g["objective"] == "flow":
            def velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
                return self.backend.step({"x": x, "t": t, **caption, "guidance": scale})

            noise = numpy_sampling.initial_noise(streams, g["num_tokens"], g["token_dim"])
            x = numpy_sampling.sample_flow(velocity, noise, steps, g["sampler"], streams)
            latents = x * np.array(g["latent_std"], np.float32) + np.array(g["latent_mean"], np.float32)
            if g["binary"]:
                latents = np.where(latents >= 0, 1.0, -1.0).astype(np.float32)
            return latents.astype(np.float32)

        def logits(codes: np.ndarray) -> np.ndarray:
            return self.backend.step({"codes": codes, **caption, "guidance": scale})

        return numpy_sampling.decode_masked(logits, streams, g["num_tokens"], g["codebook_size"], steps,
                                            g.get("temperature", 1.0))

    def render(self, prompts: list[str], steps: int | None = None, guidance: float | None = None,
               seed: int = 0, first_index: int = 0) -> np.ndarray:
        """float32 images [N, C, H, W] in [0, 1] for prompts in one batch; image i draws from stream (seed, first_index + i)."""
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts, not a single str")
        g = self.spec["generator"]
        steps = int(g["steps"] if steps is None else steps)
        guidance = float(g["guidance"] if guidance is None else guidance)
        if not prompts:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        caption = self.encode(list(prompts))
        tokens = self.sample_tokens(caption, steps, guidance, seed, first_index)
        return self.backend.decode({"tokens": tokens, "states": caption["states"], "mask": caption["mask"]})

    def generate(self, prompts: list[str], **options) -> np.ndarray:
        """uint8 images [N, H, W, 3] for prompts in one batch (options: steps, guidance, seed, first_index)."""
        return to_uint8(self.render(prompts, **options))

    def generate_batches(self, prompts: list[str], batch_size: int = 16, unit: bool = False,
                         **options) -> Iterator[np.ndarray]:
        """generate() (render() if `unit`) over batches of prompts, yielding each batch's images: the same
        images as one big batch."""
        make = self.render if unit else self.generate
        for start in range(0, len(prompts), batch_size):
            yield make(prompts[start : start + batch_size], first_index=start, **options)
