"""Alignment probe: a small ViT trained contrastively against frozen MiniLM caption embeddings.

Real images and captions come from the synthetic shapes source; the scoring protocol is checked on
hand-built embeddings, where the right answers are known exactly.
"""

from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tokenline.data.shapes import ShapesSource
from tokenline.eval.probe import (
    SAME_CAPTION_COSINE,
    AlignmentProbe,
    ProbeConfig,
    ProbeTrainConfig,
    clip_loss,
    load_probe,
    probe_scores,
    random_resized_crop,
    retrieval_groups,
    save_probe,
    train_probe,
)
from tokenline.model_checkpoint import CONFIG, WEIGHTS, CheckpointError
from tokenline.text.encoder import MiniLMEncoder

# 32 px with 8 px patches: 16 patch tokens, so a few hundred steps take seconds on one thread.
SMALL = ProbeConfig(image_size=32, width=64, layers=2, heads=4, patch_size=8, embed_dim=64)
SHAPES = 300
TRAIN = ProbeTrainConfig(steps=150, batch_size=100, warmup_steps=10, seed=0)


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]  # trains probes


@pytest.fixture(scope="module")
def encoder(one_torch_thread) -> MiniLMEncoder:
    """The project's frozen text encoder, loaded once."""
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def shapes(encoder) -> SimpleNamespace:
    """SHAPES shapes scenes at 32 px: uint8 images [N, 3, 32, 32], captions, pooled MiniLM embeddings."""
    source = ShapesSource(resolution=32, size=SHAPES, seed=0)
    records = [source.record(i) for i in range(SHAPES)]
    images = torch.stack([_decode(r.image) for r in records])
    captions = [r.caption for r in records]
    return SimpleNamespace(images=images, captions=captions, pooled=encoder.encode(captions).pooled)


@pytest.fixture(scope="module")
def trained(shapes) -> SimpleNamespace:
    """SMALL trained on the shapes for TRAIN.steps steps, with what log_fn saw."""
    logs: list[tuple[int, dict]] = []
    probe, summary = train_probe(shapes.images, shapes.pooled, SMALL, TRAIN, log_fn=lambda s, m: logs.append((s, m)))
    return SimpleNamespace(probe=probe, summary=summary, logs=logs)


def _decode(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1).contiguous()


class IdentityProbe(nn.Module):
    """A stand-in probe whose joint space is the flattened pixels: image i and caption i are chosen by the test."""

    def __init__(self, dim: int):
        super().__init__()
        self.config = SimpleNamespace(text_dim=dim)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.float().flatten(1), dim=-1)

    def encode_texts(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled.float(), dim=-1)


def _as_images(vectors: torch.Tensor) -> torch.Tensor:
    """Vectors [N, 48] in [-1, 1] as [N, 3, 4, 4] 'images' for IdentityProbe."""
    return vectors.reshape(-1, 3, 4, 4)


def _unit_rows(count: int, seed: int, dim: int = 48) -> torch.Tensor:
    rows = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(rows, dim=-1)  # |x| <= 1 per entry, so they pass as [-1, 1] images


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------

def test_embeddings_are_unit_vectors_of_embed_dim():
    """Float and uint8 images (resized from 48 px) and pooled vectors map to unit vectors [B, embed_dim]."""
    torch.manual_seed(0)
    probe = AlignmentProbe(SMALL).eval()
    floats = torch.rand(5, 3, 32, 32) * 2 - 1
    uint8 = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    pooled = torch.randn(5, SMALL.text_dim)
    with torch.no_grad():
        for emb in (probe.encode_images(floats), probe.encode_images(uint8), probe.encode_texts(pooled)):
            assert emb.shape == (5, SMALL.embed_dim)
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
        loss = probe(floats, pooled)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_text_side_is_locked(encoder):
    """Only a linear projection (and the temperature) trains on the text side; no encoder weight is inside."""
    probe = AlignmentProbe(SMALL)
    names = dict(probe.named_parameters())
    text_side = {name for name in names if not name.startswith("visual.")}
    assert text_side == {"text_projection.weight", "logit_scale"}
    assert names["text_projection.weight"].shape == (SMALL.embed_dim, SMALL.text_dim)
    encoder_tensors = {p.data_ptr() for p in encoder.module.parameters()}
    assert not encoder_tensors & {p.data_ptr() for p in probe.parameters()}
    assert probe.num_params() < 1_000_000 < encoder.num_parameters()


def test_temperature_starts_at_clip_init_and_is_clamped():
    """exp(logit_scale) starts at 1/0.07 and never exceeds 100."""
    probe = AlignmentProbe(SMALL)
    assert probe.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        probe.logit_scale.fill_(10.0)
    assert probe.scale().item() == 100.0


def test_clip_loss_limits():
    """Identical embeddings everywhere give log(B); well separated matching pairs give about 0."""
    same = F.normalize(torch.ones(4, 8), dim=-1)
    assert float(clip_loss(same, same, 10.0)) == pytest.approx(math.log(4), rel=1e-5)
    distinct = torch.eye(4, 8)
    assert float(clip_loss(distinct, distinct, 100.0)) < 1e-6


def test_config_round_trip_and_validation():
    """to_dict/from_dict round-trip; unknown fields and impossible shapes are ValueErrors naming the field."""
    assert ProbeConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="unknown probe config fields: \\['depth'\\]"):
        ProbeConfig.from_dict({**SMALL.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="patch_size"):
        ProbeConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="heads"):
        ProbeConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="batch_size"):
        ProbeTrainConfig(batch_size=1)


def test_crop_augmentation_keeps_left_and_right():
    """Crops change the pixels, are seeded, keep the shape and never mirror: left stays left."""
    images = torch.full((64, 3, 32, 32), -1.0)
    images[..., 16:] = 1.0  # dark left half, bright right half
    cropped = random_resized_crop(images, torch.Generator().manual_seed(0))
    again = random_resized_crop(images, torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape and torch.equal(cropped, again)
    assert not torch.allclose(cropped, images)
    left, right = cropped[..., :8].mean(dim=(1, 2, 3)), cropped[..., -8:].mean(dim=(1, 2, 3))
    assert (left < right).all()


# -----------------------------------------------------------------------------
# Training on real images
# -----------------------------------------------------------------------------

def test_probe_learns_shapes_captions(trained, shapes):
    """On its 300 training scenes the probe retrieves captions far above chance and prefers true pairs.

    Measured with training seeds 0, 1, 2: probe_r1 0.71, 0.82, 0.78 with group 100 (chance 0.01; shuffled
    pairs 0.007-0.013), probe_score 0.86 for the true pairs against 0.012-0.015 for shuffled ones, final
    loss 0.89-1.03 (about log(100) = 4.6 at the start).
    """
    matched = probe_scores(trained.probe, shapes.images, shapes.pooled, group=100)
    shuffle = torch.randperm(SHAPES, generator=torch.Generator().manual_seed(1))
    shuffled = probe_scores(trained.probe, shapes.images, shapes.pooled[shuffle], group=100)
    assert matched["samples"] == SHAPES and matched["group"] == 100
    assert matched["probe_r1"] >= 0.4
    assert shuffled["probe_r1"] <= 0.05
    assert matched["probe_score"] - shuffled["probe_score"] >= 0.5
    assert not trained.probe.training


def test_training_summary_and_logs(trained):
    """The summary counts the steps and the loss fell; log_fn ran every log_every steps."""
    summary = trained.summary
    assert summary["steps"] == TRAIN.steps
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < 0.5 * math.log(TRAIN.batch_size)
    assert summary["wall_time_s"] > 0 and summary["steps_per_s"] > 0
    assert [step for step, _ in trained.logs] == [50, 100, 150]
    assert set(trained.logs[-1][1]) == {"loss", "lr", "logit_scale", "steps_per_s"}


def test_training_is_seeded_and_leaves_global_rng_alone(shapes):
    """Two runs with one seed give identical weights; another seed differs; torch's global RNG is untouched."""
    short = ProbeTrainConfig(steps=3, batch_size=8, warmup_steps=1, seed=5)
    images, pooled = shapes.images[:16], shapes.pooled[:16]
    before = torch.get_rng_state()
    first, _ = train_probe(images, pooled, SMALL, short)
    assert torch.equal(torch.get_rng_state(), before)
    second, _ = train_probe(images, pooled, SMALL, short)
    other, _ = train_probe(images, pooled, SMALL, ProbeTrainConfig(steps=3, batch_size=8, warmup_steps=1, seed=6))
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.text_projection.weight, other.text_projection.weight)


# -----------------------------------------------------------------------------
# Scores on known embeddings
# -----------------------------------------------------------------------------

def test_r1_is_one_when_every_image_is_its_caption():
    """Image embedding == caption embedding for every pair: R@1 is exactly 1 and the score is 1."""
    rows = _unit_rows(250, seed=0)
    scores = probe_scores(IdentityProbe(48), _as_images(rows), rows, group=100)
    assert scores["probe_r1"] == 1.0
    assert scores["probe_score"] == pytest.approx(1.0, abs=1e-5)
    assert scores["samples"] == 250 and scores["group"] == 100


def test_r1_is_chance_for_unrelated_embeddings():
    """Independent random images and captions: R@1 near 1/group (20 expected hits of 2000, std about 4.5)."""
    images, captions = _unit_rows(2000, seed=1), _unit_rows(2000, seed=2)
    scores = probe_scores(IdentityProbe(48), _as_images(images), captions, group=100, seed=0)
    assert 0.002 <= scores["probe_r1"] <= 0.025
    assert abs(scores["probe_score"]) < 0.02
    ten = probe_scores(IdentityProbe(48), _as_images(images), captions, group=10, seed=0)
    assert 0.07 <= ten["probe_r1"] <= 0.13


def test_duplicate_captions_count_as_hits():
    """A repeated caption is one caption: its copy ranking first is a hit; a merely similar caption is not."""
    c0, c2 = _unit_rows(2, seed=3)
    c3 = F.normalize(c2 + 0.1 * _unit_rows(1, seed=4)[0], dim=0)  # close to c2 (cosine about 0.99), not equal
    copy = c0 + 1e-7 * _unit_rows(1, seed=5)[0]  # the same caption encoded again, float noise only
    captions = torch.stack([c0, copy, c2, c3])
    images = torch.stack([c0, c0, c3, c3])  # image 1 ties between caption 0 and its own copy
    scores = probe_scores(IdentityProbe(48), _as_images(images), captions, group=4)
    assert scores["probe_r1"] == 0.75  # only image 2 misses: its best caption is c3, not c2


def test_same_prompt_encoded_in_different_batches_is_one_caption(encoder):
    """MiniLM vectors of one prompt, padded differently in two batches, fall within the duplicate threshold."""
    prompt = "a large red circle"
    alone = encoder.encode([prompt]).pooled[0]
    padded = encoder.encode([prompt, "a small blue square to the left of a large red circle"]).pooled[0]
    close = encoder.encode(["a small red circle"]).pooled[0]
    assert float(alone @ padded) >= SAME_CAPTION_COSINE
    assert float(alone @ close) < SAME_CAPTION_COSINE


def test_retrieval_groups_are_seeded_and_merge_the_tail():
    """250 rows, group 100: groups of 100 and 150 (the tail of 50 merged), every row once; seeded."""
    groups = retrieval_groups(250, 100, seed=0)
    assert [len(g) for g in groups] == [100, 150]
    assert sorted(torch.cat(groups).tolist()) == list(range(250))
    assert all(torch.equal(a, b) for a, b in zip(groups, retrieval_groups(250, 100, seed=0)))
    assert not torch.equal(groups[0], retrieval_groups(250, 100, seed=1)[0])
    assert [len(g) for g in retrieval_groups(300, 100, seed=0)] == [100, 100, 100]
    assert [len(g) for g in retrieval_groups(40, 100, seed=0)] == [40]


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

def test_save_load_round_trip(trained, shapes, tmp_path):
    """A saved and reloaded probe gives bit-identical embeddings; config.json is the ProbeConfig."""
    folder = save_probe(trained.probe, tmp_path / "probe")
    loaded = load_probe(folder)
    assert json.loads((folder / CONFIG).read_text()) == SMALL.to_dict()
    assert loaded.config == SMALL and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(shapes.images[:8]), trained.probe.encode_images(shapes.images[:8]))
        assert torch.equal(loaded.encode_texts(shapes.pooled[:8]), trained.probe.encode_texts(shapes.pooled[:8]))


def test_truncated_weights_name_the_file(tmp_path):
    """A weights file cut in half raises CheckpointError naming it."""
    folder = save_probe(AlignmentProbe(SMALL), tmp_path / "probe")
    weights = folder / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_probe(folder)
    assert str(weights) in str(error.value)


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------

def test_training_rejects_bad_pairs():
    """Too few pairs, lengths that disagree, a wrong text width or [0, 255] floats: ValueErrors saying which."""
    images, pooled = torch.zeros(4, 3, 32, 32), torch.zeros(4, SMALL.text_dim)
    cases = [
        (images[:1], pooled[:1], "at least 2"),
        (images, pooled[:3], "disagree in length: 4 images, 3 captions"),
        (images, torch.zeros(4, 512), "must be \\[N, 384\\]"),
        (torch.zeros(4, 32, 32), pooled, "must be \\[N, 3, H, W\\]"),
        (images + 255, pooled, "must lie in \\[-1, 1\\]"),
    ]
    for bad_images, bad_pooled, message in cases:
        with pytest.raises(ValueError, match=message):
            train_probe(bad_images, bad_pooled, SMALL, TRAIN)


def test_scores_reject_bad_pairs():
    """probe_scores checks its pairs and its group size the same way."""
    rows = _unit_rows(4, seed=0)
    with pytest.raises(ValueError, match="disagree in length"):
        probe_scores(IdentityProbe(48), _as_images(rows), rows[:3])
    with pytest.raises(ValueError, match="at least 2"):
        probe_scores(IdentityProbe(48), _as_images(rows[:1]), rows[:1])
    with pytest.raises(ValueError, match="group"):
        probe_scores(IdentityProbe(48), _as_images(rows), rows, group=1)
