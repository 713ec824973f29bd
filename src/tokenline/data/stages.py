"""The data stages of the lineage: raw → validate → shards → captions."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd
from PIL import Image
from tqdm import tqdm

from tokenline.artifacts import atomic_write_json
from tokenline.data.caption_policy import decode_caption, normalize_caption
from tokenline.data.captioners import build_captioner
from tokenline.data.image_policy import inspect_image, square_resize
from tokenline.data.sources import build_source
from tokenline.data.validation import FEATURE_COLUMNS, run_suite
from tokenline.pipeline import StageContext, StageResult

RECORDS = "records.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file written by a stage."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


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
    _write_jsonl(out / RECORDS, rows)
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
    _write_jsonl(validated / RECORDS, accepted_rows)
    _write_jsonl(rejects / "reasons.jsonl", rejected_rows)

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


def split_of(key: str, val_fraction: float) -> str:
    """`val` or `train`, from a hash of the key: stable across runs and machines."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x100000000
    return "val" if bucket < val_fraction else "train"


def split_of_row(row: dict, val_fraction: float) -> str:
    """The split of a validated row: a twin (metadata `twin_of`) goes where its original goes.

    Otherwise a val scene's swapped twin would be a training image, and val would test captions
    whose layouts the generator had been shown.
    """
    return split_of(row["metadata"].get("twin_of") or row["key"], val_fraction)


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


class DamagedShardError(ValueError):
    """A shard that does not read back whole (cut short, a member missing or undecodable); names the file."""


def _damaged(shard: Path, what: str) -> DamagedShardError:
    """The one-line error for a damaged shard, with the command that rebuilds it."""
    dataset = shard.parent.parent.name  # data/<dataset>/shards/<name>.tar
    return DamagedShardError(f"{shard}: {what}; rebuild with 'tokenline run shards --dataset {dataset} --force'")


def _ends_whole(shard: Path) -> bool:
    """Whether the tar ends in its end-of-archive marker (two zero blocks), as a tar cut short does not."""
    with open(shard, "rb") as file:
        size = file.seek(0, io.SEEK_END)
        file.seek(max(size - 1024, 0))
        return size >= 1024 and file.read() == bytes(1024)


def _shard_samples(shard: Path) -> Iterator[dict]:
    """Yield one shard's samples undecoded; a tar that does not read to its end raises DamagedShardError."""
    import webdataset as wds

    samples = iter(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False, nodesplitter=None))
    key = None
    while True:
        where = f"after sample {key!r}" if key else "before its first sample"
        try:
            sample = next(samples)
        except StopIteration:
            break
        except (tarfile.TarError, OSError, ValueError) as error:
            # webdataset appends " @ <file object>" (and more args) to the message; the file is named already.
            reason = str(error.args[0] if error.args else error).split(" @ ")[0]
            raise _damaged(shard, f"unreadable {where} ({reason})") from None
        key = sample["__key__"]
        yield sample
    # A tar cut at a member boundary reads without error, just shorter: its missing end says so.
    if not _ends_whole(shard):
        raise _damaged(shard, f"ends {where} without its end-of-archive marker (truncated shard)")


def _decode_sample(shard: Path, split: str, sample: dict) -> dict:
    """A shard sample as (key, split, image, caption, metadata); a missing or undecodable member raises DamagedShardError."""
    key = sample["__key__"]
    missing = [member for member in ("png", "txt", "json") if member not in sample]
    if missing:
        raise _damaged(shard, f"sample {key!r} has no {missing[0]} member (truncated or damaged shard)")
    try:
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        caption, metadata = sample["txt"].decode("utf-8"), json.loads(sample["json"])
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises OSError (UnidentifiedImageError) or SyntaxError
        raise _damaged(shard, f"sample {key!r} does not decode ({type(error).__name__})") from None
    return {"key": key, "split": split, "image": image, "caption": caption, "metadata": metadata}


def iter_shard_samples(shard_dir: Path, split: str | None = None) -> Iterator[dict]:
    """Yield decoded samples (key, split, image, caption, metadata) from a shards folder."""
    index = json.loads((Path(shard_dir) / "index.json").read_text())
    for name in ("train", "val"):
        if split not in (None, name):
            continue
        # One shard at a time so an error can name the file; no node splitting in the reader:
        # training splits samples by rank itself (ShardImages), so a reader never sees a partial split.
        for shard in index[name]["shards"]:
            path = Path(shard_dir) / shard
            for sample in _shard_samples(path):
                yield _decode_sample(path, name, sample)


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
    _write_jsonl(out / "captions.jsonl", rows)
    atomic_write_json(out / "captioner.json", captioner.describe())
    empty = sum(not row["caption"] for row in rows)
    return StageResult(counts={"captions": len(rows), "empty": empty}, samples=samples)
