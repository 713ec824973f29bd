"""Tests for tokenline.text: the offline MiniLM encoder, the OpenCLIP text tower and the embedding cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenline import artifacts as artifacts_module
from tokenline.text import (
    ENCODER_KINDS,
    MiniLMEncoder,
    OpenCLIPTextEncoder,
    TextEmbeddingCache,
    TextEncoder,
    TextEncoding,
    build_text_encoder,
    default_minilm_path,
)

LONG = "a much longer caption about many things, with a dog, a cat and a red bicycle in the park"
ODD_CAPTIONS = [
    "",
    " ".join(f"word{i} and another long phrase" for i in range(70))[:2000],
    "赤い丸と青い四角がある絵文字のイラスト",
    "دائرة حمراء على خلفية بيضاء",
    "\x00\x01\x07\t\n\x1b[31mred\x1b[0m\x7f",
    "emoji 🐱🔴 and a lone surrogate \ud800",
]
OPENCLIP_SMALL = "ViT-S-32-alt"  # the smallest built-in CLIP-tokenizer text tower: width 256, 10 layers


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def openclip_random() -> OpenCLIPTextEncoder:
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(OPENCLIP_SMALL, pretrained=None)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


class FakeEncoder(TextEncoder):
    """A deterministic stand-in that counts the captions it really encodes."""

    name = "fake"
    dim = token_dim = 8
    device = torch.device("cpu")

    def __init__(self, max_tokens: int = 6, salt: str = "v1") -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.salt = salt
        self.seen: list[str] = []
        self._module = torch.nn.Linear(2, 2)

    @property
    def path(self) -> str | None:
        return None

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def _hash_weights(self) -> str:
        return self.salt * 16

    def _encode_batch(self, captions: list[str]) -> TextEncoding:
        self.seen.extend(captions)
        rows = []
        for c in captions:
            g = torch.Generator().manual_seed(len(c) * 7919 + sum(map(ord, c)) % 100003)
            rows.append(torch.randn(self.max_tokens, self.dim, generator=g))
        tokens = torch.stack(rows)
        lengths = torch.tensor([min(len(c.split()) + 1, self.max_tokens) for c in captions])
        mask = torch.arange(self.max_tokens) < lengths[:, None]
        tokens = tokens * mask[..., None]
        return TextEncoding(F.normalize(tokens.sum(1), dim=-1), tokens, mask)


# --- MiniLM -----------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_unit_norm(minilm):
    enc = minilm.encode(["a cat", LONG, "x"])
    assert enc.pooled.shape == (3, 384) and enc.pooled.dtype == torch.float32
    assert enc.tokens.shape == (3, 64, 384) and enc.tokens.dtype == torch.float32
    assert enc.mask.shape == (3, 64) and enc.mask.dtype == torch.bool
    assert torch.allclose(enc.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    # [CLS] a cat [SEP]; padding positions are False and zero.
    assert enc.mask[0].sum() == 4 and enc.mask[0, :4].all()
    assert (enc.tokens[~enc.mask] == 0).all()
    assert minilm.dim == minilm.token_dim == 384 and minilm.max_tokens == 64


def test_frozen(minilm):
    assert not minilm.module.training
    assert not any(p.requires_grad for p in minilm.module.parameters())
    assert not minilm.encode(["a cat"]).pooled.requires_grad


def test_describe(minilm):
    info = minilm.describe()
    assert info["name"] == "minilm" and info["dim"] == 384 and info["max_tokens"] == 64
    assert Path(info["path"]) == default_minilm_path().resolve()
    assert 22_500_000 < info["parameters"] < 22_800_000
    assert len(info["weights_sha256"]) == 16
    json.dumps(info)  # usable as-is in run metadata


def test_same_caption_same_vector_and_padding_does_not_leak(minilm):
    alone = minilm.encode(["a cat"])
    again = minilm.encode(["a cat"])
    assert torch.equal(alone.pooled, again.pooled) and torch.equal(alone.tokens, again.tokens)
    first = minilm.encode(["a cat", LONG])
    last = minilm.encode([LONG, "a much longer caption", "a cat"])
    for batch, row in ((first, 0), (last, 2)):
        assert torch.allclose(batch.pooled[row], alone.pooled[0], atol=1e-5)
        assert torch.allclose(batch.tokens[row], alone.tokens[0], atol=1e-4)
        assert torch.equal(batch.mask[row], alone.mask[0])


def test_semantics_show_pretrained_weights(minilm):
    circle, disc, noodles = minilm.encode(["a red circle", "a red round disc", "a bowl of noodles"]).pooled
    assert cosine(circle, disc) > cosine(circle, noodles) + 0.2


def test_matches_sentence_transformers(minilm):
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(default_minilm_path()), device="cpu", local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to load offline means "cannot compare"
        pytest.skip(f"sentence-transformers cannot load the bundled model offline: {err}")
    st.max_seq_length = minilm.max_tokens  # same truncation, so LONG-ish captions compare too
    captions = ["a cat", "a red circle", LONG, "", ODD_CAPTIONS[1]]
    reference = torch.as_tensor(st.encode(captions, convert_to_numpy=True, normalize_embeddings=False))
    assert torch.allclose(minilm.encode(captions).pooled, reference, atol=1e-5)


def test_odd_captions_encode_to_finite_vectors(minilm):
    enc = minilm.encode(ODD_CAPTIONS)
    assert enc.pooled.shape == (len(ODD_CAPTIONS), 384)
    assert torch.isfinite(enc.pooled).all() and torch.isfinite(enc.tokens).all()
    assert torch.allclose(enc.pooled.norm(dim=-1), torch.ones(len(ODD_CAPTIONS)), atol=1e-5)
    assert enc.mask[0].sum() == 2  # empty: [CLS] [SEP]
    assert enc.mask[1].all()  # 2,000 characters: truncated to exactly max_tokens


def test_bad_arguments(minilm):
    with pytest.raises(TypeError, match="list of captions"):
        minilm.encode("a cat")
    with pytest.raises(TypeError, match="caption 1"):
        minilm.encode(["a cat", None])
    empty = minilm.encode([])
    assert empty.pooled.shape == (0, 384) and empty.tokens.shape == (0, 64, 384)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MiniLMEncoder(path="/nonexistent/minilm")
    with pytest.raises(ValueError, match="max_tokens"):
        MiniLMEncoder(max_tokens=1)


def test_factory():
    with pytest.raises(ValueError, match="minilm, openclip"):
        build_text_encoder("bert")
    with pytest.raises(ValueError, match="needs path"):
        build_text_encoder("openclip")
    assert ENCODER_KINDS == ("minilm", "openclip")


# --- cache ------------------------------------------------------------------------------------------------


def test_cache_hits_misses_and_identical_results(tmp_path):
    fake = FakeEncoder()
    cache = TextEmbeddingCache(tmp_path, fake, shard_size=1)  # one shard per caption: rows span shards
    direct = fake.encode(["a", "b c", "a"])
    fake.seen.clear()

    first = cache.encode(["a", "b c", "a"])
    assert (cache.hits, cache.misses) == (0, 3)
    assert fake.seen == ["a", "b c"]  # the repeated caption is computed once
    second = cache.encode(["b c", "new one", "a"])
    assert (cache.hits, cache.misses) == (2, 4)
    assert fake.seen == ["a", "b c", "new one"]
    for got, want in ((first, direct), (second, fake.encode(["b c", "new one", "a"]))):
        assert torch.equal(got.pooled, want.pooled)
        assert torch.equal(got.tokens, want.tokens)  # trimmed on disk, padded back on load
        assert torch.equal(got.mask, want.mask)
    assert len(cache.encode([])) == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == len(cache) == 3


def test_cache_key_follows_encoder(tmp_path):
    TextEmbeddingCache(tmp_path, FakeEncoder()).encode(["a", "b"])
    for changed in (FakeEncoder(max_tokens=5), FakeEncoder(salt="v2")):
        cache = TextEmbeddingCache(tmp_path, changed)
        cache.encode(["a", "b"])
        assert (cache.hits, cache.misses) == (0, 2)
    same = TextEmbeddingCache(tmp_path, FakeEncoder())
    same.encode(["a", "b"])
    assert (same.hits, same.misses) == (2, 0)


def test_cache_crash_while_writing_leaves_no_half_cache(tmp_path, monkeypatch):
    TextEmbeddingCache(tmp_path, FakeEncoder()).encode(["kept"])

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(artifacts_module.os, "replace", crash)  # the cache writes through artifacts
    with pytest.raises(OSError, match="simulated crash"):
        TextEmbeddingCache(tmp_path, FakeEncoder()).encode(["lost"])
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp"))
    # A process killed mid-write leaves only a temporary file, which the cache never reads.
    (tmp_path / ".deadbeef.safetensors.0123.tmp").write_bytes(b"half a shard")

    cache = TextEmbeddingCache(tmp_path, FakeEncoder())
    assert "kept" in cache and "lost" not in cache and len(cache) == 1
    cache.encode(["kept", "lost"])
    assert (cache.hits, cache.misses) == (1, 1)


@pytest.mark.integration  # starts a process that loads MiniLM
def test_cache_with_minilm_survives_a_new_process(tmp_path, minilm):
    captions = ["a red circle", "a cat", "", LONG]
    cache = TextEmbeddingCache(tmp_path, minilm)
    first = cache.encode(captions)
    direct = minilm.encode(captions)
    assert torch.allclose(first.pooled, direct.pooled, atol=1e-5) and torch.equal(first.mask, direct.mask)
    torch.save({"pooled": first.pooled, "tokens": first.tokens, "mask": first.mask}, tmp_path / "want.pt")

    # A fresh interpreter, with the hub offline switches removed and the hub pointed at a dead address:
    # the encoder must stay offline on its own.
    script = textwrap.dedent(
        f"""
        import sys, torch
        from tokenline.text import MiniLMEncoder, TextEmbeddingCache
        cache = TextEmbeddingCache({str(tmp_path)!r}, MiniLMEncoder())
        got = cache.encode({captions!r})
        want = torch.load({str(tmp_path / "want.pt")!r})
        same = all(torch.equal(getattr(got, k), want[k]) for k in ("pooled", "tokens", "mask"))
        print("RESULT", cache.hits, cache.misses, same)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RESULT {len(captions)} 0 True" in proc.stdout

    shorter = TextEmbeddingCache(tmp_path, MiniLMEncoder(max_tokens=32))
    assert shorter.encode(captions).tokens.shape == (4, 32, 384)
    assert (shorter.hits, shorter.misses) == (0, 4)


# --- OpenCLIP ---------------------------------------------------------------------------------------------


def test_openclip_random_weights_shapes_and_mask(openclip_random):
    enc = openclip_random.encode(["a cat", "", LONG * 5])
    assert openclip_random.dim == 256 and openclip_random.token_dim == 256 and openclip_random.max_tokens == 77
    assert enc.pooled.shape == (3, 256) and enc.tokens.shape == (3, 77, 256) and enc.mask.shape == (3, 77)
    assert enc.pooled.dtype == enc.tokens.dtype == torch.float32 and enc.mask.dtype == torch.bool
    assert torch.allclose(enc.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    # <start> a cat <end>; <start> <end>; a truncated caption fills the context.
    assert enc.mask.sum(dim=1).tolist() == [4, 2, 77]
    assert enc.mask[0, :4].all() and (enc.tokens[~enc.mask] == 0).all()
    assert not any(p.requires_grad for p in openclip_random.module.parameters())
    assert openclip_random.module.visual is None
    assert openclip_random.describe()["path"] is None
    assert torch.isfinite(openclip_random.encode(ODD_CAPTIONS).pooled).all()


def test_openclip_shorter_max_tokens_is_a_prefix(openclip_random):
    torch.manual_seed(0)  # same random weights as the fixture
    short = OpenCLIPTextEncoder(OPENCLIP_SMALL, pretrained=None, max_tokens=16)
    assert short.weights_hash() == openclip_random.weights_hash()
    full, cut = openclip_random.encode(["a cat"]), short.encode(["a cat"])
    assert cut.tokens.shape == (1, 16, 256)
    assert torch.allclose(cut.tokens, full.tokens[:, :16], atol=1e-5)
    assert torch.allclose(cut.pooled, full.pooled, atol=1e-5)


def test_openclip_refuses_missing_weights_and_tags(tmp_path):
    missing = tmp_path / "nope" / "open_clip_model.safetensors"
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        OpenCLIPTextEncoder("ViT-B-32", pretrained=missing)
    with pytest.raises(FileNotFoundError, match="laion2b_s34b_b79k"):
        build_text_encoder("openclip", path="laion2b_s34b_b79k", model_name="ViT-B-32")  # a tag, not a file
    with pytest.raises(ValueError, match="Hugging Face"):
        OpenCLIPTextEncoder("ViT-B-16-SigLIP", pretrained=None)
