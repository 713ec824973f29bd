"""Tests for tokenline.eval.clip_score: CLIPScore from a tiny open_clip model saved to a local file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clip_fixtures import make_tiny_clip
from tokenline.artifacts import hash_file
from tokenline.eval.clip_score import DEFINITION, ClipScorer, _tag_preprocess
from tokenline.tokenizer.pixels import tensor_to_image

CAPTIONS = ["a red circle", "a blue square", "two green dots", "a yellow star on black", "stripes", "white"]
COLOR_CAPTIONS = ["a red image", "a blue image", "a green image", "a yellow image"]
COLORS = [(1, -1, -1), (-1, -1, 1), (-1, 1, -1), (1, 1, -1)]  # in [-1, 1], one per COLOR_CAPTIONS entry


def color_images(size: int = 32) -> torch.Tensor:
    """Flat colour images [4, 3, size, size] in [-1, 1], one per COLOR_CAPTIONS entry."""
    return torch.tensor(COLORS, dtype=torch.float32).view(4, 3, 1, 1).expand(4, 3, size, size).clone()


def noise_images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_image(height: int, width: int) -> torch.Tensor:
    """One low-frequency image [1, 3, H, W] in [-1, 1]: resampling differences stay near uint8 rounding."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return 0.9 * torch.stack([torch.sin(6 * xx), torch.cos(5 * yy), torch.sin(3 * (xx + yy))]).unsqueeze(0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    """(model_name, weights) of a seeded random tiny CLIP."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def scorer(tiny) -> ClipScorer:
    return ClipScorer(*tiny)


@pytest.fixture(scope="module")
def matched(tmp_path_factory, one_torch_thread) -> ClipScorer:
    """A tiny CLIP trained so that colour image i matches COLOR_CAPTIONS[i]."""
    name, weights = make_tiny_clip(tmp_path_factory.mktemp("matched_clip"), match=(color_images(), COLOR_CAPTIONS))
    return ClipScorer(name, weights)


def direct_clip_score(model_name, weights, images, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image scores, cosines) straight from open_clip, with its own preprocessing constants."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=str(weights)).eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        image_features = model.encode_image(((images + 1) / 2 - mean) / std)
        text_features = model.encode_text(open_clip.get_tokenizer(model_name)(captions))
    cos = F.cosine_similarity(image_features, text_features, dim=-1).double()
    return 100 * cos.clamp_min(0), cos


def test_score_equals_direct_open_clip(tiny, scorer):
    images = noise_images(len(CAPTIONS))
    per_image, _ = direct_clip_score(*tiny, images, CAPTIONS)
    result = scorer.score(images, CAPTIONS)
    assert set(result) == {"clip_score", "clip_score_std"}
    assert result["clip_score"] == pytest.approx(float(per_image.mean()), abs=1e-4)
    assert result["clip_score_std"] == pytest.approx(float(per_image.std(correction=0)), abs=1e-4)
    assert 0 < result["clip_score"] < 100


def test_matched_pairs_score_higher_and_negative_cosines_clip_per_image(matched):
    images = color_images()
    right = matched.score(images, COLOR_CAPTIONS)
    rolled = COLOR_CAPTIONS[1:] + COLOR_CAPTIONS[:1]
    wrong = matched.score(images, rolled)
    assert 0 <= wrong["clip_score"] < right["clip_score"] <= 100
    assert right["clip_score"] - wrong["clip_score"] > 30

    # Every image is closer to its own caption than to any other.
    cos = torch.stack([matched.cosines(images, [c] * 4) for c in COLOR_CAPTIONS], dim=1)  # [image, caption]
    assert (cos.argmax(dim=1) == torch.arange(4)).all()

    # Mismatched pairs of a trained model have negative cosines: each one counts as 0, not below.
    per_image, direct_cos = direct_clip_score(matched.model_name, matched.weights_file, images, rolled)
    assert (direct_cos < 0).any()
    assert wrong["clip_score"] == pytest.approx(float(per_image.mean()), abs=1e-4)
    assert wrong["clip_score"] > 100 * float(direct_cos.mean())


def test_deterministic_and_caption_sensitive(scorer):
    images = noise_images(len(CAPTIONS), seed=1)
    first, second = scorer.score(images, CAPTIONS), scorer.score(images.clone(), list(CAPTIONS))
    assert first == second
    shuffled = CAPTIONS[2:] + CAPTIONS[:2]
    assert scorer.score(images, shuffled)["clip_score"] != first["clip_score"]
    assert scorer.score(images, ["same caption"] * len(CAPTIONS)) == scorer.score(images, ["same caption"] * 6)


def test_batch_size_does_not_change_the_result(tiny, scorer):
    images = noise_images(len(CAPTIONS), seed=2)
    reference = scorer.cosines(images, CAPTIONS)
    for batch_size in (1, 4):
        other = ClipScorer(*tiny, batch_size=batch_size)
        torch.testing.assert_close(other.cosines(images, CAPTIONS), reference, atol=1e-6, rtol=0)
        expected = scorer.score(images, CAPTIONS)["clip_score"]
        assert other.score(images, CAPTIONS)["clip_score"] == pytest.approx(expected, abs=1e-4)


def test_frozen_eval_mode_and_no_progress_bar_for_small_inputs(scorer, capfd):
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    capfd.readouterr()
    scorer.score(noise_images(3), CAPTIONS[:3])
    assert capfd.readouterr().err == ""


def test_preprocess_matches_open_clip_pil_transform(scorer):
    """Resize, crop and normalisation agree with open_clip's own eval transform up to uint8 rounding."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip.get_model_preprocess_cfg(scorer.model)
    for mode in ("shortest", "squash", "longest"):
        transform = image_transform_v2(PreprocessCfg(**{**cfg, "resize_mode": mode}), is_train=False)
        scorer.resize_mode = mode
        try:
            for height, width in ((40, 56), (56, 40), (32, 32), (20, 24)):
                image = smooth_image(height, width)
                ours = scorer.preprocess(image)[0]
                reference = transform(tensor_to_image(image[0]))
                assert ours.shape == reference.shape == (3, 32, 32)
                # One uint8 step is 1/255 / std ~= 0.015 in normalised units.
                assert (ours - reference).abs().max() < 0.03, (mode, height, width)
        finally:
            scorer.resize_mode = cfg["resize_mode"]


def test_other_image_sizes_are_resized(scorer):
    images = F.interpolate(noise_images(2), size=(64, 48), mode="nearest")
    result = scorer.score(images, CAPTIONS[:2])
    assert 0 <= result["clip_score"] <= 100


def test_describe_and_protocol(tiny, scorer):
    info = scorer.describe()
    json.dumps(info)
    assert info["definition"] == DEFINITION == "100 * max(cos(image, caption), 0), mean over images"
    assert info["model"] == tiny[0]
    assert info["weights"] == tiny[1].name
    assert info["weights_sha256"] == hash_file(tiny[1])[:16]
    assert info["image_size"] == [32, 32]
    assert info["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert tiny[1].name in scorer.protocol() and info["weights_sha256"] in scorer.protocol()


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipScorer("ViT-B-32", missing)
    with pytest.raises(FileNotFoundError, match="laion2b_s34b_b79k"):
        ClipScorer("ViT-B-32", "laion2b_s34b_b79k")  # a download tag is not a file
    with pytest.raises(ValueError, match="weights file"):
        ClipScorer("ViT-B-32", None)


def test_weights_of_another_config_name_the_file(tmp_path, tiny):
    name = tiny[0]
    _, wider = make_tiny_clip(tmp_path, width=48)  # every tower tensor has another shape
    with pytest.raises(ValueError, match=f"{wider.name}.*{name}"):
        ClipScorer(name, wider)
    # Same widths, other image size: open_clip would silently interpolate the positional embedding.
    _, bigger = make_tiny_clip(tmp_path, image_size=64)
    with pytest.raises(ValueError, match=f"{bigger.name}.*positional_embedding"):
        ClipScorer(name, bigger)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        ClipScorer(name, garbage)


def test_bad_inputs(scorer):
    images = noise_images(2)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.score(images, ["one"])
    with pytest.raises(TypeError, match="single str"):
        scorer.score(images[:1], "a cat")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        scorer.score(images[0], ["a", "b", "c"])
    with pytest.raises(TypeError, match="float"):
        scorer.score(((images + 1) * 127.5).to(torch.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="zero images"):
        scorer.score(images[:0], [])
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(torch.full_like(images, float("nan")), ["a", "b"])
    # Out-of-range pixels are clipped as a saved image would be, not an error.
    assert scorer.score(images * 3, ["a", "b"]) == scorer.score((images * 3).clamp(-1, 1), ["a", "b"])


def test_preprocess_tag_constants_come_from_the_bundled_table(tiny):
    import open_clip

    laion = _tag_preprocess(open_clip, "ViT-B-32", "laion2b_s34b_b79k")
    assert laion["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN) and "size" not in laion
    mobile = _tag_preprocess(open_clip, "MobileCLIP-S1", "datacompdr")
    assert mobile["mean"] == (0.0, 0.0, 0.0) and mobile["std"] == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown open_clip pretrained tag"):
        ClipScorer(*tiny, preprocess_tag="openai")
