"""The export stage and its runtime end to end on tiny: three checked graphs, parity with torch at several
batch sizes, a runtime that imports no torch, `tokenline generate`, and refused folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import run_stage
from tokenline.artifacts import read_manifest
from tokenline.cli import app
from tokenline.export.build import export_pipeline, measure_parity, torch_backend
from tokenline.export.runtime import GRAPH_FILES, OnnxPipeline, read_pipeline
from tokenline.generator.generate import SamplingOptions
from tokenline.generator.model import GeneratorConfig, build_generator
from tokenline.layout import output_path, report_path
from tokenline.text.encoder import build_text_encoder
from tokenline.tokenizer.model import Tokenizer1D, TokenizerConfig

pytestmark = pytest.mark.integration  # runs stages, exports graphs, starts processes


@pytest.fixture(scope="module")
def exported(generator_project) -> Path:
    """The shared tiny shapes project (vq tokenizer, masked generator), run on through export."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{generator_project / 'mlflow.db'}")
        run_stage(generator_project, "export", "shapes")
    return output_path(generator_project, "shapes", "onnx")


def test_export_writes_checked_graphs_and_a_pipeline_naming_its_sources(exported):
    root = exported.parents[2]
    spec = read_pipeline(exported)
    for file in GRAPH_FILES.values():
        onnx.checker.check_model(str(exported / file), full_check=True)
    assert spec["generator"]["objective"] == "masked" and spec["opset"] == 18
    for name in ("generator", "tokenizer", "gen_eval"):
        assert spec["sources"][name] == read_manifest(output_path(root, "shapes", name))["content_hash"]
    assert (exported / spec["source_dirs"]["generator"]).resolve() == output_path(root, "shapes", "generator").resolve()
    parity = spec["parity"]
    assert parity["max_abs_diff"] <= 1e-3
    assert [run["batch_size"] for run in parity["runs"]] == [1, 3]
    assert parity["shapes_checker"]["agree"] == parity["shapes_checker"]["checked"] > 0
    report = json.loads(report_path(root, "shapes", "export").read_text())
    assert report["max_abs_diff"] == parity["max_abs_diff"]


def test_the_runtime_generates_in_a_process_where_torch_cannot_be_imported(exported, tmp_path):
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import numpy as np\n"
        "from tokenline.export.runtime import OnnxPipeline\n"
        f"pipeline = OnnxPipeline({str(exported)!r}, threads=1)\n"
        "images = pipeline.render(['a red circle', '', 'a small blue square'], seed=3)\n"
        f"np.save({str(tmp_path / 'images.npy')!r}, images)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    spec = read_pipeline(exported)
    root = exported.parents[2]
    from tokenline.generator.checkpoint import load_generator

    reference = OnnxPipeline(exported, backend=torch_backend(
        load_generator(output_path(root, "shapes", "generator")),
        Tokenizer1D.from_checkpoint(output_path(root, "shapes", "tokenizer")),
        build_text_encoder("minilm", None, max_tokens=spec["text"]["max_tokens"])))
    expected = reference.render(["a red circle", "", "a small blue square"], seed=3)
    assert np.abs(images - expected).max() <= 1e-3


def test_generate_writes_pngs_and_a_sheet_and_both_runtimes_agree(exported, tmp_path):
    runner = CliRunner()
    for runtime in ("onnx", "torch"):
        result = runner.invoke(app, ["generate", "--model", str(exported), "--prompt", "a large red circle",
                                     "--prompt", "", "--n", "2", "--out", str(tmp_path / runtime), "--runtime", runtime])
        assert result.exit_code == 0, result.output
        assert f"wrote 4 images to {tmp_path / runtime}/" in result.output
    names = sorted(p.name for p in (tmp_path / "onnx").glob("0*.png"))
    assert names == ["0000_a-large-red-circle.png", "0001_a-large-red-circle.png", "0002_empty.png", "0003_empty.png"]
    assert (tmp_path / "onnx" / "sheet.png").is_file()
    for name in names:
        a = np.asarray(Image.open(tmp_path / "onnx" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "torch" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # equal up to 8-bit rounding of a <= 1e-3 difference
    first, second = (np.asarray(Image.open(tmp_path / "onnx" / n)) for n in names[:2])
    assert not np.array_equal(first, second)  # each image has its own noise


@pytest.mark.parametrize("damage,named", [
    ("pipeline", "has no pipeline.json"),
    ("truncate", "generator.onnx does not match the sha256"),
    ("delete", "decoder.onnx is missing"),
])
def test_a_damaged_folder_is_refused_in_one_line_naming_the_file(exported, tmp_path, damage, named):
    folder = tmp_path / "onnx"
    shutil.copytree(exported, folder)
    if damage == "pipeline":
        (folder / "pipeline.json").unlink()
    elif damage == "truncate":
        data = (folder / "generator.onnx").read_bytes()
        (folder / "generator.onnx").write_bytes(data[: len(data) // 2])
    else:
        (folder / "decoder.onnx").unlink()
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a red circle", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert named in result.output and len(result.output.strip().splitlines()) == 1


def test_a_model_uri_or_a_missing_folder_is_one_line(tmp_path):
    for model in ("models:/tokenline-openmoji@production", str(tmp_path / "nowhere")):
        result = CliRunner().invoke(app, ["generate", "--model", model, "--prompt", "x", "--out", str(tmp_path / "o")])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


TINY_KL = dict(image_size=32, width=32, depth=1, heads=2, num_tokens=16, token_dim=4, quantizer="kl")
# The cpu profile's tokenizer layout (K tokens by fixed mixing, two-stage, so its pixels come from a grid teacher's
# decoder), here with kl latents for the flow pipeline (the profile itself uses vq codes and a masked generator).
TWO_STAGE_MIX = dict(TINY_KL, layout="1d-mix",
                     teacher=TokenizerConfig(**dict(TINY_KL, layout="grid", token_dim=6)).to_dict())


@pytest.mark.parametrize("tokenizer_options", [TINY_KL, TWO_STAGE_MIX], ids=["1d", "1d-mix-two-stage"])
def test_a_flow_pipeline_has_a_dynamic_batch(tmp_path, one_torch_thread, tokenizer_options):
    """A flow generator over kl latents: parity at batch 1 and at an odd batch (a batch baked in at export
    time fails exactly there), for the plain 1D tokenizer and for a two-stage 1d-mix one (the demo's layout)."""
    torch.manual_seed(0)
    tokenizer = Tokenizer1D(TokenizerConfig(**tokenizer_options)).eval()
    generator = build_generator(GeneratorConfig(objective="flow", num_tokens=16, token_dim=4, width=32, depth=1,
                                                heads=2, text_tokens=8, latent_mean=[0.1] * 4, latent_std=[2.0] * 4)).eval()
    with torch.no_grad():  # the zero-initialised heads would make every image the same
        for parameter in generator.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0, 0.05)
    encoder = build_text_encoder("minilm", None, max_tokens=8)
    folder = tmp_path / "onnx"
    spec = export_pipeline(folder, generator, tokenizer, encoder, SamplingOptions(sampler="heun", steps=3, guidance=2.5),
                           {"generator": "g"}, 18)
    assert spec["generator"]["latent_std"] == [2.0] * 4
    prompts = ["a red heart", "", "a cat", "a small blue square above a large red circle", "x " * 200, "日本", "a rocket"]
    figures, images, _ = measure_parity(folder, torch_backend(generator, tokenizer, encoder), prompts, [1, 7], threads=1)
    assert figures["max_abs_diff"] <= 1e-3
    assert images.std(axis=0).mean() > 1e-3  # the prompts and noise give different images
