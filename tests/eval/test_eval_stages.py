"""The eval stages end to end on tiny: the probe checkpoint, the gen_eval report, its plots and protocol, the FID check,
pairing, and the HTML report over every dataset."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

from conftest import REPO, run_stage
from tokenline.artifacts import read_manifest, write_manifest
from tokenline.params_loading import load_params
from tokenline.eval import checks
from tokenline.eval.probe import load_probe
from tokenline.generator.checkpoint import PairingError
from tokenline.layout import output_path, plot_relpath, report_path, samples_path
from tokenline.pipeline import get_stage
from tokenline.runner import MissingInputError, run_project, staleness

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


@pytest.fixture(scope="module")
def evaluated(generator_project):
    """The shared tiny shapes project, run on through probe and gen_eval."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{generator_project / 'mlflow.db'}")
        run_stage(generator_project, "gen_eval", "shapes")
    return generator_project


def test_probe_checkpoint_and_its_real_image_scores(evaluated):
    folder = output_path(evaluated, "shapes", "probe")
    assert set(read_manifest(folder)["inputs"]) == {"shards", "captions"}
    probe = load_probe(folder)
    assert probe.config.image_size == 32 and probe.config.text_dim == 384
    training = json.loads((folder / "training.json").read_text())
    assert training["steps"] == 6 and 0.0 <= training["real_scores"]["probe_r1"] <= 1.0
    assert samples_path(evaluated, "shapes", "probe").is_file()  # DVC tracks every stage's contact sheet


def test_gen_eval_report_carries_every_number_and_its_protocol(evaluated):
    report = json.loads(report_path(evaluated, "shapes", "gen_eval").read_text())
    for key in ("fid", "kid", "probe_score", "probe_r1", "probe_score_real", "probe_r1_real",
                "shapes_color_acc", "shapes_shape_acc", "shapes_count_acc", "shapes_position_acc", "ms_per_image"):
        assert key in report, key
    protocol = report["protocol"]
    assert report["samples"] == protocol["samples"] == 12
    assert protocol["objective"] == "masked" and protocol["steps"] == 4 and protocol["guidance"] == 1.0
    assert "12 real images" in protocol["fid"] and "groups of 4" in protocol["probe"]
    # Masked decoding: one evaluation per round, two with guidance; no ODE samplers to sweep.
    assert [(row["steps"], row["nfe"]) for row in report["sweeps"]["steps"]] == [(1, 1), (4, 4)]
    assert [(row["guidance"], row["nfe"]) for row in report["sweeps"]["guidance"]] == [(1.0, 4), (2.0, 8)]
    assert report["sweeps"]["samplers"] == []
    assert sum(group["images"] for group in report["shapes_by_count"].values()) == 12
    objects = sum(group["objects"] for group in report["shapes_by_count"].values())
    assert sum(group["objects"] for group in report["shapes_by_object"].values()) == objects
    assert report["generator_hash"] == read_manifest(output_path(evaluated, "shapes", "generator"))["content_hash"]


def test_fid_check_reads_the_report(evaluated):
    manifest = read_manifest(output_path(evaluated, "shapes", "gen_eval"))
    loose = load_params(evaluated / "params.yaml", profile="tiny")
    strict = load_params(evaluated / "params.yaml", profile="tiny", overrides=["gen_eval.max_fid=0.001"])
    passed, metadata = checks.fid_below_threshold(evaluated, manifest, loose)
    assert passed and metadata["samples"] == 12
    assert not checks.fid_below_threshold(evaluated, manifest, strict)[0]


def test_gen_eval_refuses_a_generator_of_another_tokenizer(evaluated, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(evaluated, project)
    config = output_path(project, "shapes", "generator") / "config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps(values | {"num_tokens": 32}))
    # Committed as such (its manifest rewritten), so input verification lets it through to the pairing check.
    manifest = read_manifest(config.parent)
    write_manifest(config.parent, **{key: value for key, value in manifest.items()
                                     if key not in ("content_hash", "files", "package_version", "written_at")})
    with pytest.raises(PairingError) as error:
        run_stage(project, "gen_eval", "shapes", upstream=False, force=True)
    assert str(config.parent) in str(error.value) and str(output_path(project, "shapes", "tokenizer")) in str(error.value)


def test_gen_eval_writes_the_plot_series_dvc_reads(evaluated):
    report = json.loads(report_path(evaluated, "shapes", "gen_eval").read_text())
    for plot, sweep in (("fid_vs_steps", "steps"), ("fid_vs_guidance", "guidance"), ("ms_vs_steps", "steps")):
        rows = json.loads((evaluated / plot_relpath("shapes", "gen_eval", plot)).read_text())
        assert rows == report["sweeps"][sweep] and rows
    # The sweep point at the base setting (4 rounds, guidance 1) is the base measurement itself.
    at_base = next(row for row in report["sweeps"]["steps"] if row["steps"] == 4)
    assert at_base["fid"] == report["fid"]


def test_gen_eval_draws_each_prompt_set(evaluated):
    report = json.loads(report_path(evaluated, "shapes", "gen_eval").read_text())
    params = load_params(evaluated / "params.yaml", profile="tiny")
    expected = {"eval captions": min(params.gen_eval.grid_images, 12)} | {
        name: len(prompts) for name, prompts in params.gen_eval.prompt_sets.items()}
    assert {name: len(items) for name, items in report["prompt_sets"].items()} == expected
    folder = output_path(evaluated, "shapes", "gen_eval")
    for items in report["prompt_sets"].values():
        for item in items:
            with Image.open(folder / item["file"]) as image:
                assert image.size == (32, 32)
    assert report["prompt_sets"]["compositional"][0]["prompt"] == params.gen_eval.prompt_sets["compositional"][0]


def _run_report(root, *overrides, tracking=False, **kwargs):
    sets = [*overrides] + ([] if tracking else ["tracking.enabled=false"])
    params = load_params(root / "params.yaml", profile="tiny", overrides=sets, dataset="shapes")
    return run_project(get_stage("report"), params, root, **kwargs)


def test_report_is_one_html_file_naming_its_checkpoints(evaluated, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    project = tmp_path / "p"
    shutil.copytree(evaluated, project)
    store = f"sqlite:///{tmp_path / 'ml.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    *upstream, outcome = _run_report(project, tracking=True)
    # gen_eval's chain is fresh; recon_eval and the student's stages (not upstream of gen_eval) run first.
    assert {run.stage for run in upstream if not run.skipped} == {"recon_eval", "student", "student_eval"}
    assert outcome.stage == "report" and outcome.dataset is None and not outcome.skipped
    html = (project / "data" / "reports" / "report.html").read_text()
    gen = json.loads(report_path(project, "shapes", "gen_eval").read_text())
    assert f"{gen['generator']} @ {gen['generator_hash'][:12]}" in html
    assert f"{gen['tokenizer']} @ {gen['tokenizer_hash'][:12]}" in html
    assert html.count("<svg") == 4  # FID vs steps, FID vs guidance, ms/image vs steps, FID vs NFE
    student = json.loads(report_path(project, "shapes", "student_eval").read_text())
    images = sum(len(items) for items in gen["prompt_sets"].values())
    images += sum(len(items) for items in student["grids"].values())  # the student's and its teacher's grids
    assert images == outcome.manifests["report"]["counts"]["images"]
    # Every generated image, plus the dataset's real images above their reconstructions (recon_eval's grid).
    assert html.count('src="data:image/png;base64,') == images + 1 and "their reconstructions" in html
    assert not re.search(r"""(src|href)=["']?https?:""", html)  # self-contained: nothing is fetched
    manifest = read_manifest(project / "data" / "report")
    assert set(manifest["inputs"]) == {"shapes/gen_eval", "shapes/recon_eval", "shapes/student_eval"}
    artifacts = [a.path for a in MlflowClient(tracking_uri=store).list_artifacts(outcome.mlflow_run_id, "reports")]
    assert artifacts == ["reports/report.html"]
    # Fresh until an input changes.
    assert _run_report(project)[-1].skipped
    params = load_params(project / "params.yaml", profile="tiny", overrides=["tracking.enabled=false"], dataset="shapes")
    (output_path(project, "shapes", "gen_eval") / "metrics.json").write_text("{}")
    from tokenline.artifacts import write_manifest

    old = read_manifest(output_path(project, "shapes", "gen_eval"))
    write_manifest(output_path(project, "shapes", "gen_eval"), **{k: v for k, v in old.items()
                                                                  if k not in ("content_hash", "package_version", "written_at")})
    assert staleness(get_stage("report"), params, None, project) == "inputs changed"


def test_report_names_the_missing_eval(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(MissingInputError, match="run `tokenline run gen_eval --dataset shapes` first"):
        _run_report(tmp_path, upstream=False)


def test_gen_eval_adds_clip_score_when_weights_are_named(evaluated, tmp_path):
    from clip_fixtures import make_tiny_clip

    project = tmp_path / "p"
    shutil.copytree(evaluated, project)
    name, weights = make_tiny_clip(tmp_path / "clip")
    run_stage(project, "gen_eval", "shapes", f"gen_eval.clip_model={name}", f"gen_eval.clip_weights={weights}",
              upstream=False, force=True)
    report = json.loads(report_path(project, "shapes", "gen_eval").read_text())
    assert 0.0 <= report["clip_score"] <= 100.0 and 0.0 <= report["clip_score_real"] <= 100.0
    assert weights.name in report["protocol"]["clip_score"] and name in report["protocol"]["clip_score"]
    # Without weights there is no clip_score at all, not a made-up one.
    assert "clip_score" not in json.loads(report_path(evaluated, "shapes", "gen_eval").read_text())
