"""The importer survives hostile input: every case is rejected with a reason or normalized."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bad_inputs import write_cases
from conftest import REPO, run_stage

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes

REJECTED = {
    "zero_byte": "empty_file",
    "truncated_png": "undecodable",
    "truncated_jpeg": "undecodable",
    "text_as_jpg": "not_an_image",
    "huge_header": "image_too_large",
    "few_pixels_wide": "too_small",
    "extreme_aspect": "extreme_aspect",
    "missing_caption": "caption_missing",
    "whitespace_caption": "caption_empty",
    "non_utf8_caption": "caption_not_utf8",
    "long_caption": "caption_too_long",
}
ACCEPTED = ["cmyk_jpeg", "png_16bit", "palette_transparency", "grayscale", "rgba", "webp", "messy_caption"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Run the data lineage once over the folder of hostile files."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    folder = tmp_path_factory.mktemp("hostile")
    cases = write_cases(folder)
    run_stage(root, "shards", "mine", f"datasets.mine.source=imagefolder:{folder}", "datasets.mine.license=CC0-1.0")
    data = root / "data" / "mine"
    report = json.loads((root / "data" / "reports" / "mine" / "validate.json").read_text())
    rejects = {row["key"]: row for row in map(json.loads, (data / "rejects" / "reasons.jsonl").read_text().splitlines())}
    accepted = {row["key"]: row for row in map(json.loads, (data / "validated" / "records.jsonl").read_text().splitlines())}
    return {"root": root, "folder": folder, "cases": cases, "report": report, "rejects": rejects, "accepted": accepted, "data": data}


@pytest.mark.parametrize("case,reason", sorted(REJECTED.items()))
def test_rejected_with_reason(imported, case, reason):
    assert imported["rejects"][case]["reason"] == reason
    assert case not in imported["accepted"]
    # The quarantined files are kept beside the reason for inspection.
    for relative in imported["rejects"][case]["files"]:
        assert (imported["data"] / "rejects" / relative).exists()


@pytest.mark.parametrize("case", ACCEPTED)
def test_accepted_after_normalization(imported, case):
    row = imported["accepted"][case]
    image = Image.open(imported["data"] / "validated" / row["image"])
    assert image.mode == "RGB" and image.size == (32, 32)  # tiny profile resolution


def test_transparency_composited_on_white(imported):
    for case in ("rgba", "palette_transparency"):
        pixels = np.asarray(Image.open(imported["data"] / "validated" / f"images/{case}.png"))
        right = pixels[:, 20:]  # the transparent half in both test images
        assert right.min() >= 250, case


def test_sixteen_bit_png_scaled_by_its_range(imported):
    pixels = np.asarray(Image.open(imported["data"] / "validated" / "images/png_16bit.png")).astype(int)
    # A 0..65535 left-to-right ramp must become a 0..255 ramp, not a white or black image.
    assert pixels[:, 0].mean() < 30 and pixels[:, -1].mean() > 225


def test_caption_normalization_policy(imported):
    # BOM dropped, NFC applied (e + combining acute -> é), control characters and runs of
    # white space collapse to single spaces.
    assert imported["accepted"]["messy_caption"]["caption"] == "Café on two lines"


def test_identical_images_keep_one(imported):
    first, second = imported["accepted"].get("identical_a"), imported["rejects"].get("identical_b")
    assert first is not None
    assert second["reason"] == "duplicate_image" and "identical_a" in second["detail"]


def test_caption_without_image_is_reported_not_counted(imported):
    assert imported["report"]["orphan_captions"] == 1
    assert imported["rejects"]["orphan_caption_without_image"]["reason"] == "caption_without_image"


def test_images_sharing_a_stem_both_kept(imported):
    assert {"shared_stem_png", "shared_stem_jpg"} <= set(imported["accepted"])
    captions = {imported["accepted"][key]["caption"] for key in ("shared_stem_png", "shared_stem_jpg")}
    assert captions == {"a perfectly fine caption"}


def test_counts_add_up(imported):
    report = imported["report"]
    image_files = sum(len(files) for files, _ in imported["cases"].values())
    assert report["total"] == image_files
    assert report["total"] == report["accepted"] + report["rejected"]
    assert report["rejected"] == sum(report["reasons"].values())
    assert report["accepted"] == len(imported["accepted"])
    shards_index = json.loads((imported["data"] / "shards" / "index.json").read_text())
    assert shards_index["train"]["samples"] + shards_index["val"]["samples"] == report["accepted"]


def test_folder_without_license_fails_before_work(project, tmp_path_factory):
    from tokenline.data.stages import LicenseMissingError

    folder = tmp_path_factory.mktemp("unlicensed")
    Image.new("RGB", (40, 40), "red").save(folder / "red.png")
    (folder / "red.txt").write_text("a red square")
    # Not one license_missing reject per image: the stage refuses the folder, naming the key to set.
    with pytest.raises(LicenseMissingError, match=r"datasets\.nolicense\.license"):
        run_stage(project, "validate", "nolicense", f"datasets.nolicense.source=imagefolder:{folder}")
    assert not (project / "data" / "reports" / "nolicense").exists()
