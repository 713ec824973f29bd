"""MLflow: a stage run logs its params, counts and a contact sheet of samples."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_stage

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def test_stage_run_is_logged(project, monkeypatch):
    uri = f"sqlite:///{project / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_stage(project, "validate", "shapes", tracking=True)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tokenline")
    runs = {run.data.tags["stage"]: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"raw", "validate"}
    validate = runs["validate"]
    assert validate.data.tags["dataset"] == "shapes" and validate.data.tags["profile"] == "tiny"
    assert validate.data.metrics["total"] == validate.data.metrics["accepted"] + validate.data.metrics["rejected"] == 48
    assert validate.data.params["validate.max_aspect"] == "4.0"
    artifacts = {item.path for item in client.list_artifacts(validate.info.run_id, "samples")}
    assert artifacts == {"samples/validate.png"}
    local = client.download_artifacts(validate.info.run_id, "samples/validate.png", str(project))
    from PIL import Image

    assert Image.open(local).size[0] >= 4 * 32  # a grid, not a single image
    assert {item.path for item in client.list_artifacts(validate.info.run_id, "reports")} == {"reports/validate.json"}
