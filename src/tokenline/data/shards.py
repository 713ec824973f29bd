"""Reading webdataset shards back, and the deterministic train/val split they are written with.

Every reader of `data/<dataset>/shards` (training, token cache, evals) goes through
iter_shard_samples, so a damaged shard fails the same way everywhere: one line naming the
shard file and the sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

from PIL import Image


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
