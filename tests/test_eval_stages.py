"""The eval stages end to end on tiny: the probe checkpoint, the gen_eval report and its protocol, the FID check, pairing."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_stage
from tokenline.artifacts import read_manifest
from tokenline.config import load_params
from tokenline.eval import checks
from tokenline.eval.probe import load_probe
from tokenline.generator.checkpoint import PairingError
from tokenline.pipeline import output_path, report_path, samples_path


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
    with pytest.raises(PairingError) as error:
        run_stage(project, "gen_eval", "shapes", upstream=False, force=True)
    assert str(config.parent) in str(error.value) and str(output_path(project, "shapes", "tokenizer")) in str(error.value)
