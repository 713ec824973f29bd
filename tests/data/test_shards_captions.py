"""Shards are real webdataset tars with a stable split; captions are keyed and attributed."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from conftest import run_stage
from tokenline.data.shards import iter_shard_samples, split_of

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def test_shards_readable_by_webdataset(project):
    run_stage(project, "shards", "openmoji")
    shard_dir = project / "data/openmoji/shards"
    index = json.loads((shard_dir / "index.json").read_text())
    urls = [str(shard_dir / name) for split in ("train", "val") for name in index[split]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == index["train"]["samples"] + index["val"]["samples"] == 48
    for sample in samples:
        assert sample["png"].size == (32, 32)
        assert sample["txt"].startswith("an emoji of ")
        assert sample["json"]["license"] == "CC BY-SA 4.0"


def test_split_is_deterministic_and_near_the_fraction():
    keys = [f"k{i}" for i in range(4000)]
    first = [split_of(key, 0.1) for key in keys]
    assert first == [split_of(key, 0.1) for key in keys]
    assert 0.08 < first.count("val") / len(keys) < 0.12


def test_shards_are_reproducible(project, tmp_path):
    run_stage(project, "shards", "shapes")
    first = json.loads((project / "data/shapes/shards/manifest.json").read_text())["content_hash"]
    run_stage(project, "shards", "shapes", force=True)
    assert json.loads((project / "data/shapes/shards/manifest.json").read_text())["content_hash"] == first


def test_metadata_captions_keyed_by_sample(project):
    run_stage(project, "captions", "shapes")
    rows = [json.loads(line) for line in (project / "data/shapes/captions/captions.jsonl").read_text().splitlines()]
    samples = {s["key"]: s for s in iter_shard_samples(project / "data/shapes/shards")}
    assert {row["key"] for row in rows} == set(samples)
    for row in rows:
        assert row["caption"] == samples[row["key"]]["caption"] and row["captioner"] == "metadata"
    assert json.loads((project / "data/shapes/captions/captioner.json").read_text()) == {"captioner": "metadata"}


def test_template_captioner_composes_metadata(project):
    run_stage(project, "captions", "shapes", "captions.captioner=template", "captions.template=a picture with {count} shapes")
    rows = [json.loads(line) for line in (project / "data/shapes/captions/captions.jsonl").read_text().splitlines()]
    samples = {s["key"]: s for s in iter_shard_samples(project / "data/shapes/shards")}
    for row in rows:
        assert row["caption"] == f"a picture with {samples[row['key']]['metadata']['count']} shapes"


def test_template_with_unknown_field_names_it(project):
    with pytest.raises(ValueError, match="colour"):
        run_stage(project, "captions", "shapes", "captions.captioner=template", "captions.template={colour}")


def test_twins_share_their_originals_split(project):
    run_stage(project, "shards", "shapes", "datasets.shapes.source=shapes:twins", "shards.val_fraction=0.3")
    samples = list(iter_shard_samples(project / "data/shapes/shards"))
    split = {sample["key"]: sample["split"] for sample in samples}
    twins = [sample for sample in samples if "twin_of" in sample["metadata"]]
    assert twins and len(twins) < len(samples) / 2
    for twin in twins:
        assert twin["key"] == twin["metadata"]["twin_of"] + "_twin"
        assert split[twin["key"]] == split[twin["metadata"]["twin_of"]]
    assert {split[twin["key"]] for twin in twins} == {"train", "val"}
    # The originals keep the split their key hash gives, as without twins.
    assert all(split[s["key"]] == split_of(s["key"], 0.3) for s in samples if "twin_of" not in s["metadata"])
