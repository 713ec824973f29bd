"""Data hardening: sources read nothing outside their root, malformed COCO files and damaged
shards fail in one line naming the file, and a folder without a license fails before work."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from conftest import REPO, run_stage
from tokenline.data.coco import CocoSource
from tokenline.data.records import SourceFormatError
from tokenline.data.shards import DamagedShardError, iter_shard_samples
from tokenline.data.stages import LicenseMissingError

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def _png(color: str, size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_report(root: Path, dataset: str) -> dict:
    return json.loads((root / "data/reports" / dataset / "validate.json").read_text())


def _rejects(root: Path, dataset: str) -> dict[str, dict]:
    lines = (root / "data" / dataset / "rejects/reasons.jsonl").read_text().splitlines()
    return {row["key"]: row for row in map(json.loads, lines)}


def _assert_nowhere_under(folder: Path, secrets: list[bytes]) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), path


# --------------------------------------------------------------------------------------
# Nothing is read from outside a source's root
# --------------------------------------------------------------------------------------


def test_imagefolder_reads_nothing_outside_the_folder(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"root:x:0:0:TOP-SECRET-PASSWD-LINE\n"
    (outside / "passwd").write_bytes(secret)
    (outside / "caption.txt").write_bytes(b"a SECRET caption from outside")
    outside_png = _png("orange")
    (outside / "orange.png").write_bytes(outside_png)

    folder = tmp_path / "mine"
    (folder / "store").mkdir(parents=True)
    for color in ("red", "yellow", "blue"):
        (folder / f"{color}.png").write_bytes(_png(color))
    (folder / "red.txt").write_text("a red square")
    (folder / "yellow.txt").write_text("a yellow square")
    (folder / "blue.txt").symlink_to(outside / "caption.txt")  # caption outside: treated as missing
    (folder / "store/green.bin").write_bytes(_png("green"))
    (folder / "green.png").symlink_to(folder / "store/green.bin")  # a link that stays inside is fine
    (folder / "green.txt").write_text("a green square")
    (folder / "passwd.jpg").symlink_to(outside / "passwd")
    (folder / "passwd.txt").write_text("not a picture")
    (folder / "orange.png").symlink_to(outside / "orange.png")
    (folder / "orange.txt").write_text("an orange square")

    run_stage(project, "shards", "mine", f"datasets.mine.source=imagefolder:{folder}", "datasets.mine.license=CC0-1.0")
    report = _read_report(project, "mine")
    assert report["total"] == 6 == report["accepted"] + report["rejected"]
    assert report["reasons"] == {"caption_missing": 1, "outside_source": 2}
    rejects = _rejects(project, "mine")
    assert rejects["passwd"]["reason"] == rejects["orange"]["reason"] == "outside_source"
    assert "passwd.jpg" in rejects["passwd"]["detail"]
    assert rejects["blue"]["reason"] == "caption_missing"
    accepted = {json.loads(line)["key"] for line in (project / "data/mine/validated/records.jsonl").read_text().splitlines()}
    assert accepted == {"red", "yellow", "green"}
    _assert_nowhere_under(project / "data", [secret, outside_png, b"SECRET caption"])


def test_coco_reads_nothing_outside_the_image_dir(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"root:x:0:0:TOP-SECRET-PASSWD-LINE\n"
    (outside / "passwd").write_bytes(secret)
    outside_png = _png("orange")
    (outside / "x.png").write_bytes(outside_png)
    images = tmp_path / "coco/images"
    images.mkdir(parents=True)
    (images / "1.png").write_bytes(_png("red"))
    (images / "link.png").symlink_to(outside / "x.png")
    names = {1: "1.png", 2: "../../outside/x.png", 3: str(outside / "passwd"), 4: "link.png"}
    annotations = {
        "images": [{"id": number, "file_name": name} for number, name in names.items()],
        "annotations": [{"id": number, "image_id": number, "caption": f"picture {number}"} for number in names],
    }
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    run_stage(project, "validate", "coco", f"datasets.coco.source=coco:{tmp_path / 'captions.json'},{images}", "datasets.coco.license=CC0-1.0")
    report = _read_report(project, "coco")
    assert report["total"] == 4 and report["accepted"] == 1 and report["reasons"] == {"outside_source": 3}
    rejects = _rejects(project, "coco")
    assert "../../outside/x.png" in rejects["coco_2"]["detail"]
    _assert_nowhere_under(project / "data", [secret, outside_png])


# --------------------------------------------------------------------------------------
# COCO annotations with missing fields or wrong types
# --------------------------------------------------------------------------------------

GOOD_IMAGE = {"id": 1, "file_name": "1.png"}
GOOD_ANNOTATION = {"id": 1, "image_id": 1, "caption": "a red square"}


@pytest.mark.parametrize("document,expected", [
    ({"images": [GOOD_IMAGE], "annotations": [GOOD_ANNOTATION, {"id": 2, "caption": "x"}]}, "annotations[1] has no 'image_id'"),
    ({"images": [GOOD_IMAGE], "annotations": [{**GOOD_ANNOTATION, "caption": 7}]}, "annotations[0].caption is 7, not str"),
    ({"images": [{"file_name": "1.png"}], "annotations": []}, "images[0] has no 'id'"),
    ({"images": [{"id": "1", "file_name": "1.png"}], "annotations": []}, "images[0].id is '1', not int"),
    ({"images": [{"id": 1, "file_name": ["1.png"]}], "annotations": []}, "images[0].file_name is ['1.png'], not str"),
    ({"images": [GOOD_IMAGE, "2.png"], "annotations": []}, "images[1] is '2.png', not an object"),
    ({"images": {"1": GOOD_IMAGE}, "annotations": []}, "images is {'1': {"),
    ({"images": [{**GOOD_IMAGE, "license": [4]}], "licenses": [{"id": 4, "name": "CC"}]}, "images[0].license is [4], not int or str"),
    ([GOOD_IMAGE], "the top level is [{"),
])
def test_malformed_coco_annotations_fail_in_one_line(tmp_path, document, expected):
    (tmp_path / "captions.json").write_text(json.dumps(document))
    with pytest.raises(SourceFormatError) as raised:
        list(CocoSource(tmp_path / "captions.json", tmp_path).records())
    message = str(raised.value)
    assert expected in message and "captions.json: " in message and "\n" not in message


def test_coco_annotations_that_are_not_json_fail_in_one_line(project, tmp_path):
    (tmp_path / "captions.json").write_text('{"images": [')
    with pytest.raises(SourceFormatError, match=r"captions\.json: not valid JSON") as raised:
        run_stage(project, "raw", "coco", f"datasets.coco.source=coco:{tmp_path / 'captions.json'},{tmp_path}")
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------
# Damaged shards fail naming the file and the sample
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_shards(tmp_path_factory) -> Path:
    """The shards folder of a tiny shapes lineage, built once for the module."""
    root = tmp_path_factory.mktemp("shards_project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:  # _isolated_mlflow is per test
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        run_stage(root, "shards", "shapes")
    return root / "data/shapes/shards"


@pytest.fixture
def shard_copy(built_shards, tmp_path) -> Path:
    """A copy of the built shards folder, at data/shapes/shards, free to damage."""
    copy = tmp_path / "data/shapes/shards"
    shutil.copytree(built_shards, copy)
    return copy


def _read_all(shard_dir: Path) -> list[str]:
    """The error messages of both shard readers (sample iterator, tokenizer training) on a damaged shard."""
    from tokenline.tokenizer.train import ShardImages

    messages = []
    for read in (lambda: list(iter_shard_samples(shard_dir)), lambda: ShardImages(shard_dir)):
        with pytest.raises(DamagedShardError) as raised:
            read()
        message = str(raised.value)
        assert str(shard_dir / "train-000000.tar") in message and "\n" not in message
        assert "tokenline run shards --dataset shapes --force" in message
        messages.append(message)
    return messages


def test_truncated_shard_names_file_and_sample(shard_copy):
    shard = shard_copy / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    for message in _read_all(shard_copy):
        assert "sample '" in message


def test_shard_cut_between_samples_is_not_read_as_shorter(shard_copy):
    shard = shard_copy / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = [member.name.split(".")[0] for member in members]
    # Cut at the header of the first member of a sample near the middle: every sample before
    # is whole, so only the missing end-of-archive marker tells the shard is short.
    cut = next(m for i, m in enumerate(members) if i >= len(members) // 2 and keys[i] != keys[i - 1])
    last_whole = keys[members.index(cut) - 1]
    shard.write_bytes(shard.read_bytes()[: cut.offset])
    for message in _read_all(shard_copy):
        assert f"after sample {last_whole!r}" in message and "truncated" in message


def test_corrupt_png_in_shard_names_file_and_sample(shard_copy):
    shard = shard_copy / "train-000000.tar"
    samples = [dict(s) for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
    victim = samples[len(samples) // 2]["__key__"]
    with wds.TarWriter(str(shard), encoder=False, mtime=0) as sink:
        for sample in samples:
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            if sample["__key__"] == victim:
                sample["png"] = sample["png"][:16] + bytes(reversed(sample["png"][16:]))
            sink.write(sample)
    for message in _read_all(shard_copy):
        assert f"sample {victim!r} does not decode" in message


# --------------------------------------------------------------------------------------
# A folder without a license fails before work, not with every image rejected
# --------------------------------------------------------------------------------------


def _one_image_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "red.png").write_bytes(_png("red"))
    (folder / "red.txt").write_text("a red square")
    return folder


def test_imagefolder_without_license_fails_before_work(project, tmp_path):
    folder = _one_image_folder(tmp_path / "mine")
    with pytest.raises(LicenseMissingError) as raised:
        run_stage(project, "shards", "mine", f"datasets.mine.source=imagefolder:{folder}")
    message = str(raised.value)
    assert "datasets.mine.license" in message and "--set datasets.mine.license=CC-BY-4.0" in message
    assert "unspecified" in message and "\n" not in message
    assert not (project / "data/mine/raw/manifest.json").exists()
    assert not (project / "data/reports/mine").exists()


def test_imagefolder_license_unspecified_accepts_images(project, tmp_path):
    folder = _one_image_folder(tmp_path / "mine")
    run_stage(project, "validate", "mine", f"datasets.mine.source=imagefolder:{folder}", "datasets.mine.license=unspecified")
    report = _read_report(project, "mine")
    assert report["accepted"] == 1 and report["reasons"] == {}
