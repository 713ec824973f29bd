"""The MLflow pyfunc of an exported pipeline, logged as MLflow "models from code": MLflow stores this
file with the model and runs it on load, so nothing is pickled into the model and nothing is
unpickled from it. Input: prompts (a `prompt` column, or a list of strings) and optional params
`steps`, `guidance`, `seed`; output: one row per prompt with the PNG image base64-encoded.

    model = mlflow.pyfunc.load_model("models:/tokenline-openmoji@production")
    rows = model.predict(["a red heart"], params={"seed": 1})
    png = base64.b64decode(rows["png_base64"][0])
"""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
from PIL import Image

from tokenline.export.runtime import MODEL_ARTIFACT, OnnxPipeline


def prompts_of(model_input) -> list[str]:
    """The prompts of a pyfunc input: a DataFrame's `prompt` (or only) column, a Series, or a list."""
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(value) for value in model_input[column]]
    if isinstance(model_input, pd.Series):
        return [str(value) for value in model_input]
    if isinstance(model_input, str):
        return [model_input]
    return [str(value) for value in model_input]


def png_base64(pixels) -> str:
    """uint8 [H, W, 3] -> a base64 PNG string (JSON-safe for the served endpoint)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class TokenlinePipelineModel(mlflow.pyfunc.PythonModel):
    """Prompts -> PNG images through the exported ONNX pipeline (numpy + onnxruntime)."""

    def load_context(self, context) -> None:
        """Open the pipeline folder shipped as the model's artifact (its file hashes are checked)."""
        self.pipeline = OnnxPipeline(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One row per prompt: the prompt and its image as base64 PNG."""
        params = params or {}
        prompts = prompts_of(model_input)
        images = self.pipeline.generate(prompts, steps=params.get("steps"), guidance=params.get("guidance"),
                                        seed=int(params.get("seed") or 0))
        return pd.DataFrame({"prompt": prompts, "png_base64": [png_base64(image) for image in images]})


mlflow.models.set_model(TokenlinePipelineModel())
