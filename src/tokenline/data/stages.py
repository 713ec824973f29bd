"""The data stages of the lineage: raw → validate → shards → captions."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from typing import Iterator

import pandas as pd
from PIL import Image
from tqdm import tqdm

from tokenline.artifacts import atomic_write_json, read_jsonl, write_jsonl
from tokenline.data import checks as data_checks
from tokenline.data.caption_policy import decode_caption, normalize_caption
from tokenline.data.captioners import build_captioner
from tokenline.data.image_policy import inspect_image, square_resize
from tokenline.data.shards import iter_shard_samples, split_of_row
from tokenline.data.sources import build_source
from tokenline.data.validation import FEATURE_COLUMNS, run_suite
from tokenline.stage import AssetCheck, Stage, StageContext, StageResult

RECORDS = "records.jsonl"


def _preview(data: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(data))
        image.thumbnail((128, 128))
        return image.convert("RGB")
    except Exception:  # a preview is best effort; validation judges the file
        return None


# --------------------------------------------------------------------------------------
# raw
# --------------------------------------------------------------------------------------


class LicenseMissingError(ValueError):
    """A folder dataset names no license, so validation would reject every image it holds."""


def raw(ctx: StageContext) -> StageResult:
    """Copy the source's records, untouched, into data/<dataset>/raw."""
    source = build_source(ctx.spec, ctx.params.data.resolution)  # checks the folder exists; reads nothing
    # Folder images carry no license of their own (COCO and webdataset records may), so without
    # the dataset's every image would end up `license_missing`: say so before reading anything.
    if ctx.spec.source.startswith("imagefolder:") and not ctx.spec.license:
        name = ctx.dataset
        raise LicenseMissingError(
            f"dataset {name!r} is an image folder that names no license (datasets.{name}.license), so every image "
            f"would be rejected as license_missing: set it, e.g. --set datasets.{name}.license=CC-BY-4.0, "
            f"or --set datasets.{name}.license=unspecified to accept images without one"
        )
    out = ctx.outputs["raw"]
    files = out / "files"
    files.mkdir()
    rows, samples, keys = [], [], set()
    for record in tqdm(source.records(ctx.params.data.limit), desc=f"raw {ctx.dataset}", unit="rec"):
        if record.key in keys:
            raise ValueError(f"source of dataset {ctx.dataset!r} yielded key {record.key!r} twice")
        keys.add(record.key)
        row = {"key": record.key, "image": None, "caption": None, "metadata": record.metadata}
        if record.image is not None:
            row["image"] = f"files/{record.key}.{record.image_ext}"
            (out / row["image"]).write_bytes(record.image)
            if len(samples) < ctx.params.tracking.contact_sheet and (image := _preview(record.image)):
                samples.append((image, str(record.caption)))
        if record.caption is not None:
            row["caption"] = f"files/{record.key}.txt"
            caption = record.caption.encode("utf-8") if isinstance(record.caption, str) else record.caption
            (out / row["caption"]).write_bytes(caption)
        rows.append(row)
    write_jsonl(out / RECORDS, rows)
    atomic_write_json(out / "source.json", source.describe())
    images = sum(row["image"] is not None for row in rows)
    return StageResult(
        counts={"records": len(rows), "images": images, "orphan_captions": len(rows) - images},
        samples=samples,
    )


# --------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------


def _features(ctx: StageContext, rows: list[dict]) -> Iterator[tuple[dict, dict, object]]:
    """Yield (feature row, raw row, inspection) for every image record."""
    params = ctx.params.validate_
    first_by_hash: dict[str, str] = {}
    raw_dir = ctx.inputs["raw"]
    for row in tqdm(rows, desc=f"validate {ctx.dataset}", unit="rec"):
        inspection = inspect_image((raw_dir / row["image"]).read_bytes(), params.max_side)
        caption_bytes = (raw_dir / row["caption"]).read_bytes() if row["caption"] else None
        text, state = decode_caption(caption_bytes)
        caption = normalize_caption(text) if text is not None else None
        if caption is None and state == "missing" and not params.require_caption:
            caption = ""
        duplicate_of = None
        if inspection.pixel_hash:
            duplicate_of = first_by_hash.setdefault(inspection.pixel_hash, row["key"])
            duplicate_of = None if duplicate_of == row["key"] else duplicate_of
        features = {
            "key": row["key"],
            "outside_source": row["metadata"].get("outside_source"),
            "file_bytes": inspection.file_bytes,
            "header_ok": inspection.header_ok,
            "max_side": inspection.max_side,
            "decoded": inspection.decoded,
            "min_side": inspection.min_side,
            "aspect": inspection.aspect,
            "caption_present": state != "missing",
            "caption_utf8": None if state == "missing" else state == "ok",
            "caption": caption,
            "license": row["metadata"].get("license") or ctx.spec.license,
            "duplicate_of": duplicate_of,
        }
        yield features, row, inspection


def _detail(reason: str, features: dict, inspection) -> str:
    if reason == "outside_source":
        return f"{features['outside_source']} resolves outside the source's root; not read"
    if reason == "duplicate_image":
        return f"same pixels as {features['duplicate_of']}"
    if reason in ("empty_file", "not_an_image", "image_too_large", "undecodable"):
        return inspection.error or reason
    if reason in ("too_small", "extreme_aspect"):
        return f"{inspection.width}x{inspection.height}"
    if reason == "caption_too_long":
        return f"{len(features['caption'])} characters"
    return reason


def validate(ctx: StageContext) -> StageResult:
    """Accept (normalized) or quarantine every record, with a reason for each rejection."""
    raw_dir = ctx.inputs["raw"]
    rows = read_jsonl(raw_dir / RECORDS)
    image_rows = [row for row in rows if row["image"] is not None]
    orphans = [row for row in rows if row["image"] is None]
    resolution = ctx.params.data.resolution
    table, normalized, details = [], {}, {}
    for features, row, inspection in _features(ctx, image_rows):
        table.append(features)
        if inspection.image is not None:
            normalized[row["key"]] = square_resize(inspection.image, resolution)
        details[row["key"]] = (features, inspection)
    frame = pd.DataFrame(table, columns=list(FEATURE_COLUMNS))
    # Object dtype keeps None as None (not NaN) so Great Expectations skips it as null.
    reasons, suite = run_suite(frame.astype(object).where(frame.notna(), None), ctx.params.validate_)

    validated, rejects = ctx.outputs["validated"], ctx.outputs["rejects"]
    (validated / "images").mkdir()
    (rejects / "files").mkdir()
    accepted_rows, rejected_rows, samples = [], [], []
    for row in image_rows:
        key = row["key"]
        features, inspection = details[key]
        if key in reasons:
            reason = reasons[key]
            kept = [row[field] for field in ("image", "caption") if row[field]]
            for relative in kept:
                shutil.copy2(raw_dir / relative, rejects / relative)
            rejected_rows.append({"key": key, "reason": reason, "detail": _detail(reason, features, inspection), "files": kept})
            continue
        image = normalized[key]
        image.save(validated / "images" / f"{key}.png", format="PNG")
        accepted_rows.append({
            "key": key,
            "image": f"images/{key}.png",
            "caption": features["caption"],
            "metadata": {**row["metadata"], "license": features["license"], "original_size": [inspection.width, inspection.height], "original_format": inspection.format},
        })
        if len(samples) < ctx.params.tracking.contact_sheet:
            samples.append((image, features["caption"]))
    for row in orphans:
        shutil.copy2(raw_dir / row["caption"], rejects / row["caption"])
        rejected_rows.append({"key": row["key"], "reason": "caption_without_image", "detail": row["caption"], "files": [row["caption"]]})
    write_jsonl(validated / RECORDS, accepted_rows)
    write_jsonl(rejects / "reasons.jsonl", rejected_rows)

    image_rejects = [r for r in rejected_rows if r["reason"] != "caption_without_image"]
    report = {
        "total": len(image_rows),
        "accepted": len(accepted_rows),
        "rejected": len(image_rejects),
        "reasons": dict(sorted(Counter(r["reason"] for r in image_rejects).items())),
        "orphan_captions": len(orphans),
        "accept_rate": round(len(accepted_rows) / len(image_rows), 4) if image_rows else 0.0,
        "suite": suite,
    }
    counts = {key: report[key] for key in ("total", "accepted", "rejected", "orphan_captions")}
    return StageResult(counts=counts, metrics={"accept_rate": report["accept_rate"]}, report=report, samples=samples)


# --------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------


def shards(ctx: StageContext) -> StageResult:
    """Pack accepted records into webdataset tar shards, split train/val by key hash."""
    import webdataset as wds

    validated = ctx.inputs["validated"]
    rows = read_jsonl(validated / RECORDS)
    out = ctx.outputs["shards"]
    options = ctx.params.shards
    by_split = {"train": [], "val": []}
    for row in rows:
        by_split[split_of_row(row, options.val_fraction)].append(row)
    index, samples = {}, []
    for split, members in by_split.items():
        # mtime=0 makes tar bytes depend on content only, so hashes are reproducible.
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=options.samples_per_shard, verbose=0, mtime=0) as sink:
            for row in tqdm(members, desc=f"shards {ctx.dataset} {split}", unit="rec"):
                image_bytes = (validated / row["image"]).read_bytes()
                sink.write({
                    "__key__": row["key"],
                    "png": image_bytes,
                    "txt": row["caption"],
                    "json": json.dumps(row["metadata"], ensure_ascii=False, sort_keys=True),
                })
                if len(samples) < ctx.params.tracking.contact_sheet:
                    samples.append((Image.open(io.BytesIO(image_bytes)).convert("RGB"), row["caption"]))
        names = sorted(path.name for path in out.glob(f"{split}-*.tar"))
        index[split] = {"shards": names, "samples": len(members)}
    atomic_write_json(out / "index.json", index)
    counts = {
        "train": index["train"]["samples"],
        "val": index["val"]["samples"],
        "shards": len(index["train"]["shards"]) + len(index["val"]["shards"]),
    }
    return StageResult(counts=counts, samples=samples)


# --------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------


def captions(ctx: StageContext) -> StageResult:
    """Caption every sample with the configured captioner, keyed by sample key."""
    captioner = build_captioner(ctx.params.captions)
    rows, samples = [], []
    for sample in tqdm(iter_shard_samples(ctx.inputs["shards"]), desc=f"captions {ctx.dataset}", unit="rec"):
        text = captioner.caption(sample["key"], sample["image"], sample["caption"], sample["metadata"])
        rows.append({"key": sample["key"], "split": sample["split"], "caption": text, "captioner": captioner.name})
        if len(samples) < ctx.params.tracking.contact_sheet:
            samples.append((sample["image"], text))
    out = ctx.outputs["captions"]
    write_jsonl(out / "captions.jsonl", rows)
    atomic_write_json(out / "captioner.json", captioner.describe())
    empty = sum(not row["caption"] for row in rows)
    return StageResult(counts={"captions": len(rows), "empty": empty}, samples=samples)


# --------------------------------------------------------------------------------------
# The registry entries of this area (pipeline.py lists them)
# --------------------------------------------------------------------------------------

STAGES = (
    Stage(
        name="raw",
        func=raw,
        area="data",
        description="Pull the dataset's source into data/<dataset>/raw: image files exactly "
        "as offered, raw caption bytes and a record table.",
        outputs=("raw",),
        params=("data",),
    ),
    Stage(
        name="validate",
        func=validate,
        area="data",
        description="Great Expectations suite over the record table: each record accepted "
        "(normalized) or quarantined in data/<dataset>/rejects with its reason.",
        inputs=("raw",),
        outputs=("validated", "rejects"),
        params=("data", "validate"),
        report=True,
        checks=(
            AssetCheck("counts_add_up", "validated", "total = accepted + rejected", data_checks.counts_add_up),
            AssetCheck("accept_rate", "validated", "accepted / total >= validate.min_accept_rate", data_checks.accept_rate),
            AssetCheck("rejects_have_reasons", "rejects", "every quarantined record names a reason", data_checks.rejects_have_reasons),
        ),
    ),
    Stage(
        name="shards",
        func=shards,
        area="data",
        description="Webdataset tar shards (image + .txt + .json) with a deterministic "
        "train/val split by key hash.",
        inputs=("validated",),
        outputs=("shards",),
        params=("data", "shards"),
    ),
    Stage(
        name="captions",
        func=captions,
        area="data",
        description="Captions keyed by sample key from the configured captioner "
        "(metadata, template or model), with the captioner recorded.",
        inputs=("shards",),
        outputs=("captions",),
        params=("captions",),
    ),
)
