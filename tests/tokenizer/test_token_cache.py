"""Token cache: shards encoded once, read back memory-mapped, refused when stale, split across ranks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, run_stage
from tokenline.artifacts import read_jsonl
from tokenline.data.shards import iter_shard_samples
from tokenline.text.embedding_cache import TextEmbeddingCache
from tokenline.text.encoder import MiniLMEncoder, TextEncoding
from tokenline.tokenizer.model import Tokenizer_T
from tokenline.tokenizer.token_cache import StaleTokenCacheError, TokenCache
from tokenline.tokenizer.token_cache_writer import write_token_cache

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny 32 px shapes shards and their captions, built once by the pipeline."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:  # conftest's MLflow isolation is per test
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        run_stage(root, "captions", "shapes")
    return root / "data" / "shapes"


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder()


def tokenizer(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return Tokenizer_T(**(dict(image_size=32, num_tokens=16) | overrides))


@pytest.fixture(scope="module")
def vq_cache(data, minilm, tmp_path_factory):
    """A vq cache written once: (folder, tokenizer, counts)."""
    model = tokenizer(codebook_size=64)
    out = tmp_path_factory.mktemp("vq")
    counts = write_token_cache(model, data / "shards", data / "captions", out, "hash-vq", minilm, batch_size=16)
    return out, model, counts


def test_vq_cache_matches_shards(vq_cache, data, minilm, tmp_path):
    out, model, counts = vq_cache
    index = json.loads((data / "shards/index.json").read_text())
    assert counts == {"train": index["train"]["samples"], "val": index["val"]["samples"],
                      "total": index["train"]["samples"] + index["val"]["samples"]}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": counts["train"], "val": counts["val"]}
    assert meta["has_codes"] and meta["codebook_size"] == 64 and meta["quantizer"] == "vq"
    assert meta["tokenizer_hash"] == "hash-vq" and meta["tokenizer_config"] == model.config.to_dict()
    assert meta["text_dim"] == 384 and meta["text_tokens"] == 32
    assert meta["text_encoder"]["name"] == "minilm"
    captions = {row["key"]: row["caption"] for row in read_jsonl(data / "captions/captions.jsonl")}
    for split in ("train", "val"):
        n = counts[split]
        folder = out / split
        keys = json.loads((folder / "keys.json").read_text())
        assert keys == [s["key"] for s in iter_shard_samples(data / "shards", split)]
        assert json.loads((folder / "captions.json").read_text()) == [captions[k] for k in keys]
        latents = np.load(folder / "latents.npy")
        codes = np.load(folder / "codes.npy")
        assert latents.shape == (n, 16, 12) and latents.dtype == np.float32
        assert codes.shape == (n, 16) and codes.dtype == np.int32
        assert np.load(folder / "text_pooled.npy").shape == (n, 384)
        assert np.load(folder / "text_pooled.npy").dtype == np.float16
        assert np.load(folder / "text_tokens.npy").shape == (n, 32, 384)
        assert np.load(folder / "text_mask.npy").shape == (n, 32)
        assert np.load(folder / "text_mask.npy").dtype == bool
        # vq latents are codebook rows: the codes alone give them back.
        decoded = model.quantizer.decode_codes(torch.from_numpy(codes).long()).detach().numpy()
        np.testing.assert_array_equal(decoded, latents)
    # The stored text is the encoder's, in float16.
    train_keys = json.loads((out / "train/keys.json").read_text())
    expected = minilm.encode([captions[k] for k in train_keys])
    pooled = np.load(out / "train/text_pooled.npy").astype(np.float32)
    np.testing.assert_allclose(pooled, expected.pooled.numpy(), atol=2e-3)
    np.testing.assert_array_equal(np.load(out / "train/text_mask.npy"), expected.mask[:, :32].numpy())
    tokens = np.load(out / "train/text_tokens.npy").astype(np.float32)
    np.testing.assert_allclose(tokens, expected.tokens[:, :32].numpy(), atol=5e-3)

    again = tmp_path / "again"
    write_token_cache(model, data / "shards", data / "captions", again, "hash-vq", minilm, batch_size=16)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path


def test_cache_is_memory_mapped_and_items_are_tensors(vq_cache):
    out, model, counts = vq_cache
    cache = TokenCache(out, "train", expect_tokenizer_hash="hash-vq")
    assert len(cache) == counts["train"] and cache.has_codes
    assert all(isinstance(array, np.memmap) for array in cache._arrays.values())
    item = cache[3]
    assert item["index"] == 3
    assert item["latents"].shape == (16, 12) and item["latents"].dtype == torch.float32
    assert item["codes"].shape == (16,) and item["codes"].dtype == torch.long
    assert item["text_pooled"].shape == (384,) and item["text_pooled"].dtype == torch.float32
    assert item["text_tokens"].shape == (32, 384) and item["text_mask"].dtype == torch.bool
    item["latents"] += 1  # a copy: writable, and the cache is untouched
    np.testing.assert_array_equal(cache[3]["latents"].numpy(), np.load(out / "train/latents.npy")[3])
    assert cache.keys[3] == json.loads((out / "train/keys.json").read_text())[3]
    assert cache[-1]["index"] == len(cache) - 1
    with pytest.raises(IndexError):
        cache[len(cache)]


class ShortEncoder:
    """Any object with encode() will do; this one keeps only 8 token positions, so the cache must pad."""

    def __init__(self, encoder):
        # Not `.encoder`: the cache would take that attribute's describe(), as it does for a TextEmbeddingCache.
        self.encoder_ = encoder

    def encode(self, captions):
        full = self.encoder_.encode(captions)
        return TextEncoding(full.pooled, full.tokens[:, :8], full.mask[:, :8])


def test_binary_and_kl_codes(data, minilm, tmp_path):
    write_token_cache(tokenizer(quantizer="binary"), data / "shards", data / "captions", tmp_path / "b", "hb", minilm)
    codes = np.load(tmp_path / "b/train/codes.npy")
    latents = np.load(tmp_path / "b/train/latents.npy")
    assert codes.dtype == np.uint8 and codes.shape == latents.shape == (len(latents), 16, 12)
    assert set(np.unique(codes)) == {0, 1}
    np.testing.assert_array_equal(latents, codes.astype(np.float32) * 2 - 1)
    binary = TokenCache(tmp_path / "b")
    assert binary.meta["codebook_size"] is None
    assert binary[0]["codes"].dtype == torch.long and set(binary[0]["codes"].unique().tolist()) <= {0, 1}

    write_token_cache(tokenizer(quantizer="kl"), data / "shards", data / "captions", tmp_path / "k", "hk",
                      ShortEncoder(minilm), text_tokens=12)
    assert not (tmp_path / "k/train/codes.npy").exists()
    kl = TokenCache(tmp_path / "k", "val")
    assert not kl.has_codes and "codes" not in kl[0] and kl.meta["codebook_size"] is None
    assert kl[0]["latents"].shape == (16, 12)
    assert kl.meta["text_encoder"] == "ShortEncoder" and kl.meta["text_tokens"] == 12
    tokens, mask = np.load(tmp_path / "k/train/text_tokens.npy"), np.load(tmp_path / "k/train/text_mask.npy")
    assert tokens.shape == (len(tokens), 12, 384) and mask.shape == (len(tokens), 12)
    assert not mask[:, 8:].any() and not tokens[:, 8:].any() and mask[:, 0].all()


def test_text_enters_the_conditioned_tokenizer(data, minilm, tmp_path):
    model = tokenizer(quantizer="kl", text_dim=384, text_tokens=32)
    write_token_cache(model, data / "shards", data / "captions", tmp_path / "a", "h", TextEmbeddingCache(tmp_path / "emb", minilm))
    # Other captions for the first few keys; the rest are absent, so they keep the shard caption.
    rows = read_jsonl(data / "captions/captions.jsonl")
    changed = {row["key"] for row in rows[:5]}
    other = tmp_path / "other"
    other.mkdir()
    lines = [json.dumps({**row, "caption": "a photograph of a tall red lighthouse at night"}) for row in rows[:5]]
    (other / "captions.jsonl").write_text("\n".join(lines) + "\n")
    write_token_cache(model, data / "shards", other, tmp_path / "b", "h", minilm)

    shard = {s["key"]: s["caption"] for s in iter_shard_samples(data / "shards")}
    a, b = TokenCache(tmp_path / "a"), TokenCache(tmp_path / "b")
    assert a.keys == b.keys
    for i, key in enumerate(b.keys):
        assert b.captions[i] == ("a photograph of a tall red lighthouse at night" if key in changed else shard[key])
        same = torch.equal(a[i]["latents"], b[i]["latents"])
        assert same == (key not in changed), key
    # The stored text is exactly what conditioned the stored latents.
    images = torch.stack([torch.from_numpy(np.asarray(s["image"]).copy()).permute(2, 0, 1)
                          for s in iter_shard_samples(data / "shards", "train")][:6]).float() / 127.5 - 1
    rows = [b[i] for i in range(6)]
    text = (torch.stack([r["text_tokens"] for r in rows]), torch.stack([r["text_mask"] for r in rows]))
    model.eval()
    with torch.no_grad():
        again = model.encode(images, text).latents
    torch.testing.assert_close(again, torch.stack([r["latents"] for r in rows]), atol=1e-5, rtol=1e-5)


def test_tokenizer_training_mode_is_restored(data, minilm, tmp_path):
    model = tokenizer(quantizer="kl")
    model.train()
    write_token_cache(model, data / "shards", None, tmp_path, "h", minilm)
    assert model.training
    # kl samples in training mode: eval (the mean) makes the cache deterministic.
    first = np.load(tmp_path / "train/latents.npy")
    write_token_cache(model, data / "shards", None, tmp_path, "h", minilm)
    np.testing.assert_array_equal(first, np.load(tmp_path / "train/latents.npy"))


def test_stale_and_missing_caches_are_refused(vq_cache, tmp_path):
    out, _, counts = vq_cache
    assert len(TokenCache(out, "val", expect_tokenizer_hash="hash-vq")) == counts["val"]
    with pytest.raises(StaleTokenCacheError) as error:
        TokenCache(out, expect_tokenizer_hash="hash-other")
    assert "hash-vq" in str(error.value) and "hash-other" in str(error.value) and str(out) in str(error.value)
    shutil.copytree(out / "train", tmp_path / "train")  # arrays without meta.json: an unfinished write
    with pytest.raises(FileNotFoundError, match="tokenline run tokens") as missing:
        TokenCache(tmp_path)
    assert str(tmp_path) in str(missing.value)


def test_empty_split_has_zero_rows_of_the_right_shape(data, minilm, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    index = json.loads((shards / "index.json").read_text())
    index["val"] = {"shards": [], "samples": 0}
    (shards / "index.json").write_text(json.dumps(index))
    counts = write_token_cache(tokenizer(quantizer="binary"), shards, data / "captions", tmp_path / "c", "h", minilm)
    assert counts["val"] == 0 and counts["total"] == counts["train"] > 0
    val = tmp_path / "c/val"
    assert np.load(val / "latents.npy").shape == (0, 16, 12)
    assert np.load(val / "codes.npy").shape == (0, 16, 12)
    assert np.load(val / "text_pooled.npy").shape == (0, 384)
    assert np.load(val / "text_tokens.npy").shape == (0, 32, 384)
    assert np.load(val / "text_mask.npy").shape == (0, 32)
    empty = TokenCache(tmp_path / "c", "val")
    assert len(empty) == 0 and empty.keys == [] and list(empty.loader(4)) == []


def test_loader_shapes_and_disjoint_ranks(vq_cache):
    out, _, counts = vq_cache
    cache = TokenCache(out)
    n = counts["train"]
    batch = next(iter(cache.loader(8, seed=1)))
    assert batch["latents"].shape == (8, 16, 12) and batch["codes"].shape == (8, 16)
    assert batch["text_tokens"].shape == (8, 32, 384) and batch["text_mask"].shape == (8, 32)
    assert batch["index"].shape == (8,)

    def indices(loader):
        return [i for b in loader for i in b["index"].tolist()]

    ranks = [indices(cache.loader(5, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(n))
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    assert ranks[0] == indices(cache.loader(5, seed=3, rank=0, world_size=2))  # seeded
    assert ranks[0] + ranks[1] != sorted(ranks[0] + ranks[1])  # shuffled
    assert indices(cache.loader(5, shuffle=False)) == list(range(n))
    loader = cache.loader(5, seed=3)
    assert sorted(indices(loader)) == sorted(indices(loader)) and indices(loader) != indices(cache.loader(5, seed=3))
    assert all(len(b["index"]) == 4 for b in cache.loader(4, drop_last=True))
