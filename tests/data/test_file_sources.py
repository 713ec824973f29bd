"""The file-based sources: webdataset shards and COCO captions flow through validation."""

from __future__ import annotations

import io
import json

import pytest
import webdataset as wds
from PIL import Image

from conftest import run_stage

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def _png(color: str, size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_source_reads_local_shards(project, tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    colors = ["red", "green", "blue", "yellow", "purple"]
    for shard in range(2):
        with wds.TarWriter(str(folder / f"part-{shard}.tar")) as sink:
            for index, color in enumerate(colors[shard * 3 : shard * 3 + 3]):
                sample = {"__key__": f"s{shard}_{index}", "png": _png(color), "txt": f"a {color} square", "json": json.dumps({"color": color})}
                if color == "yellow":
                    sample["png"] = b"not an image"  # a broken member must be rejected, not crash
                sink.write(sample)
    run_stage(project, "captions", "web", f"datasets.web.source=webdataset:{folder}/part-*.tar", "datasets.web.license=CC0-1.0")
    report = json.loads((project / "data/reports/web/validate.json").read_text())
    assert report["total"] == 5 and report["accepted"] == 4 and report["reasons"] == {"not_an_image": 1}
    rows = [json.loads(line) for line in (project / "data/web/validated/records.jsonl").read_text().splitlines()]
    assert sorted(row["caption"] for row in rows) == ["a blue square", "a green square", "a purple square", "a red square"]
    assert all(row["metadata"]["sample"]["color"] in row["caption"] for row in rows)


def test_coco_source_takes_first_caption_and_counts_missing_files(project, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "1.png").write_bytes(_png("red"))
    (images / "2.png").write_bytes(_png("blue"))
    annotations = {
        "licenses": [{"id": 4, "name": "CC BY 2.0"}],
        "images": [
            {"id": 2, "file_name": "2.png", "license": 4},
            {"id": 1, "file_name": "1.png", "license": 4},
            {"id": 3, "file_name": "3.png", "license": 4},  # listed, but not in the folder
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "a red tile"},
            {"id": 10, "image_id": 1, "caption": "a red square"},
            {"id": 12, "image_id": 2, "caption": "a blue square"},
            {"id": 13, "image_id": 3, "caption": "a missing picture"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    run_stage(project, "validate", "coco", f"datasets.coco.source=coco:{tmp_path / 'captions.json'},{images}")
    report = json.loads((project / "data/reports/coco/validate.json").read_text())
    assert report["total"] == 3 and report["accepted"] == 2 and report["reasons"] == {"empty_file": 1}
    rows = {row["key"]: row for row in map(json.loads, (project / "data/coco/validated/records.jsonl").read_text().splitlines())}
    assert rows["coco_1"]["caption"] == "a red square"  # lowest annotation id first
    assert rows["coco_1"]["metadata"]["all_captions"] == ["a red square", "a red tile"]
    assert rows["coco_1"]["metadata"]["license"] == "CC BY 2.0"


def test_model_captioner_refuses_a_missing_local_model(project):
    import pytest

    with pytest.raises(FileNotFoundError, match="/nonexistent/no-such-captioner does not exist"):
        run_stage(project, "captions", "shapes", "captions.captioner=model", "captions.model=/nonexistent/no-such-captioner")
