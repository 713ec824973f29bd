"""`tokenline generate`: prompts -> PNG files (and a contact sheet) from an exported pipeline folder.

`--runtime onnx` (default) runs the folder's graphs with onnxruntime; `--runtime torch` runs the
same sampler loop through the torch checkpoints the folder was exported from (found beside it,
as pipeline.json's `source_dirs` name them, and refused if their content hash has changed), so
both runtimes draw the same images for the same seed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tokenline.artifacts import read_manifest
from tokenline.contact_sheet import contact_sheet
from tokenline.export.build import torch_backend
from tokenline.export.runtime import PIPELINE_FILE, OnnxPipeline, PipelineError, read_pipeline
from tokenline.generator.checkpoint import load_generator
from tokenline.text.encoder import build_text_encoder
from tokenline.tokenizer.model import Tokenizer1D

RUNTIMES = ("onnx", "torch")
SHEET = "sheet.png"


def resolve_model(model: str, tracking_uri: str | None = None) -> Path:
    """The exported folder `--model` names: a local folder, or an MLflow `models:/name@alias`,
    `models:/name/version` or `runs:/<run>/pipeline` URI (downloaded from `tracking_uri`)."""
    if model.startswith(("models:/", "runs:/")):
        return download_model(model, tracking_uri)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"{model} is not a folder: pass an exported pipeline such as models/openmoji/onnx")
    return folder


def download_model(uri: str, tracking_uri: str | None) -> Path:
    """The pipeline folder inside a registered (or logged) pyfunc model, downloaded to a local cache."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for chatty in ("mlflow", "alembic"):  # set after the import, which configures mlflow's logger
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise PipelineError(f"{uri} does not resolve ({available_models()}): "
                            f"{str(err).splitlines()[0][:200]}") from err
    # A pyfunc model keeps its artifacts under artifacts/<folder name>; a runs:/ URI may name the folder itself.
    found = sorted(path.parent for path in local.glob(f"artifacts/*/{PIPELINE_FILE}"))
    return found[0] if found else local


def available_models() -> str:
    """The registered models and their aliases, for an error message."""
    from mlflow import MlflowClient

    models = MlflowClient().search_registered_models()
    if not models:
        return "no model is registered"
    described = [f"{m.name} (aliases: {', '.join(sorted(m.aliases)) or 'none'})" for m in models]
    return "registered: " + "; ".join(described)


def _source(folder: Path, spec: dict, name: str) -> Path:
    """The checkpoint folder `name` this export came from, with the content hash it had then."""
    source = (folder / spec["source_dirs"][name]).resolve()
    manifest = read_manifest(source) if source.is_dir() else None
    if manifest is None or manifest["content_hash"] != spec["sources"][name]:
        raise PipelineError(f"--runtime torch needs the {name} checkpoint {folder} was exported from; {source} "
                            "is missing or has changed since (rerun the export stage, or use --runtime onnx)")
    return source


def open_pipeline(folder: Path, runtime: str = "onnx", threads: int | None = None) -> OnnxPipeline:
    """The exported pipeline in `folder`, evaluated by onnxruntime or by its source torch checkpoints."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "onnx":
        return OnnxPipeline(folder, threads=threads)
    spec = read_pipeline(folder)
    generator = load_generator(_source(folder, spec, "generator"))
    tokenizer = Tokenizer1D.from_checkpoint(_source(folder, spec, "tokenizer"))
    encoder = build_text_encoder("minilm", None, max_tokens=spec["text"]["max_tokens"])
    if encoder.weights_hash() != spec["text"]["weights_sha256"]:
        raise PipelineError(f"the installed MiniLM weights ({encoder.weights_hash()}) are not the ones {folder} "
                            f"was exported with ({spec['text']['weights_sha256']})")
    return OnnxPipeline(folder, backend=torch_backend(generator, tokenizer, encoder))


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt ("empty" for an empty one)."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "empty"


def write_images(pipeline: OnnxPipeline, prompts: list[str], out: Path, batch_size: int = 16,
                 **options) -> tuple[list[Path], Path | None]:
    """PNG files `<index>_<prompt>.png` in `out` for each prompt (as given, repeats included), and a
    captioned contact sheet when there is more than one image. Options: steps, guidance, seed."""
    out.mkdir(parents=True, exist_ok=True)
    paths, sheet_images = [], []
    with tqdm(total=len(prompts), desc="generate", unit="img", disable=len(prompts) <= batch_size) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            for offset, (pixels, prompt) in enumerate(zip(pipeline.generate(chunk, first_index=start, **options), chunk)):
                image = Image.fromarray(pixels)
                path = out / f"{start + offset:04d}_{slug(prompt)}.png"
                image.save(path)
                paths.append(path)
                sheet_images.append((image, prompt or "(empty prompt)"))
            bar.update(len(chunk))
    if len(paths) < 2:
        return paths, None
    sheet = contact_sheet([image for image, _ in sheet_images], cell=96, captions=[c for _, c in sheet_images])
    sheet.save(out / SHEET)
    return paths, out / SHEET
