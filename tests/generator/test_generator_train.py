"""Generator training on the token cache: the stage end to end, bit-exact resume, config guard, NaN stop, rank shares."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from tokenline.artifacts import read_manifest
from tokenline.generator.checkpoint import load_generator
from tokenline.generator.generate import SamplingOptions, generate_images
from tokenline.generator.model import FlowTransformer, GeneratorConfig
from tokenline.generator.train import cache_batches, train_generator
from tokenline.layout import output_path, samples_path
from tokenline.text.encoder import MiniLMEncoder
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.train_config import GeneratorTrainConfig
from tokenline.training import ResumeRefusedError

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


@pytest.fixture(scope="module")
def built(generator_project):
    """The shared tiny shapes project, run through the generator stage."""
    return generator_project


def flow_model(cache: TokenCache) -> FlowTransformer:
    torch.manual_seed(0)
    meta = cache.meta
    mean, std = cache.latent_statistics()
    return FlowTransformer(GeneratorConfig(
        num_tokens=meta["num_tokens"], token_dim=meta["token_dim"], width=32, depth=1, heads=2,
        text_dim=meta["text_dim"], text_pooled_dim=meta["text_pooled_dim"], text_tokens=meta["text_tokens"],
        latent_mean=mean, latent_std=std,
    ))


def train_config(**overrides) -> GeneratorTrainConfig:
    return GeneratorTrainConfig(**(dict(steps=8, batch_size=4, warmup_steps=2, checkpoint_every=4, log_every=1) | overrides))


def test_stage_writes_a_masked_generator_paired_with_its_tokenizer(built):
    folder = output_path(built, "shapes", "generator")
    manifest = read_manifest(folder)
    assert set(manifest["inputs"]) == {"tokens", "tokenizer"} and manifest["counts"]["steps"] == 12
    model = load_generator(folder)
    tokenizer_folder = output_path(built, "shapes", "tokenizer")
    tokenizer = Tokenizer1D.from_checkpoint(tokenizer_folder)
    assert model.config.objective == "masked"  # tiny's tokenizer is vq
    assert model.config.num_tokens == tokenizer.config.num_tokens == 16
    assert model.config.codebook_size == tokenizer.config.codebook_size == 64
    assert model.config.tokenizer_hash == read_manifest(tokenizer_folder)["content_hash"]
    training = json.loads((folder / "training.json").read_text())
    assert training["steps"] == 12 and training["token_cache_samples"] == len(TokenCache(output_path(built, "shapes", "tokens")))
    assert samples_path(built, "shapes", "generator").is_file()


def test_hostile_prompts_generate_finite_images(built):
    model = load_generator(output_path(built, "shapes", "generator"))
    tokenizer = Tokenizer1D.from_checkpoint(output_path(built, "shapes", "tokenizer"))
    prompts = ["", "a large red circle " * 120, "一只红色的圆形", "a red\x00 circle\x1b[31m\u202e", " \t\n"]
    encoder = MiniLMEncoder(max_tokens=model.config.text_tokens)
    images, calls = generate_images(model, tokenizer, prompts, encoder, SamplingOptions(steps=3, guidance=2.0))
    assert images.shape == (5, 3, 32, 32) and torch.isfinite(images).all()
    assert images.abs().max() <= 1.0 and calls == 6


def test_resume_is_bit_exact(built, tmp_path):
    cache = TokenCache(output_path(built, "shapes", "tokens"))
    straight = train_generator(flow_model(cache), cache, tmp_path / "straight", train_config())

    def crash(step, metrics):  # after the state folder of step 4
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_generator(flow_model(cache), cache, tmp_path / "resumed", train_config(), log_fn=crash)
    assert json.loads((tmp_path / "resumed" / "state" / "progress.json").read_text())["step"] == 4
    resumed = train_generator(flow_model(cache), cache, tmp_path / "resumed", train_config(), resume=True)
    assert straight["steps"] == resumed["steps"] == 8
    for folder in ("state/model.safetensors", "state/ema.safetensors", "checkpoint/model.safetensors"):
        a = safetensors.torch.load_file(tmp_path / "straight" / folder)
        b = safetensors.torch.load_file(tmp_path / "resumed" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    # And the run really moved: the raw weights are not the initial ones.
    initial = flow_model(cache).state_dict()
    trained = safetensors.torch.load_file(tmp_path / "straight" / "state/model.safetensors")
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)


def test_changed_config_is_refused_unless_forced(built, tmp_path):
    cache = TokenCache(output_path(built, "shapes", "tokens"))
    train_generator(flow_model(cache), cache, tmp_path, train_config(steps=4))
    with pytest.raises(ResumeRefusedError, match=r"train\.lr"):
        train_generator(flow_model(cache), cache, tmp_path, train_config(lr=1e-2), resume=True)
    summary = train_generator(flow_model(cache), cache, tmp_path, train_config(lr=1e-2), resume=True, force=True)
    assert summary["steps"] == 8
    # The resumed run follows the new config's schedule from step 4, not the saved lr.
    optimizer = torch.load(tmp_path / "state" / "optimizer.pt", weights_only=True)
    scheduler = torch.load(tmp_path / "state" / "scheduler.pt", weights_only=True)
    assert scheduler["base_lrs"] == [1e-2] and optimizer["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_a_state_saved_before_a_train_field_existed_resumes_at_its_default(built, tmp_path):
    cache = TokenCache(output_path(built, "shapes", "tokens"))
    train_generator(flow_model(cache), cache, tmp_path, train_config(steps=4))
    saved_path = tmp_path / "state" / "train_config.json"
    saved = json.loads(saved_path.read_text())
    del saved["replace_prob"]  # as if the state folder predates the field
    saved_path.write_text(json.dumps(saved))
    with pytest.raises(ResumeRefusedError, match=r"train\.replace_prob"):
        train_generator(flow_model(cache), cache, tmp_path, train_config(replace_prob=0.5), resume=True)
    assert train_generator(flow_model(cache), cache, tmp_path, train_config(), resume=True)["steps"] == 8


def test_nan_loss_stops_with_the_last_good_state(built, tmp_path):
    cache = TokenCache(output_path(built, "shapes", "tokens"))
    model = flow_model(cache)

    def poison(step, metrics):
        if step == 5:  # after the state folder of step 4
            with torch.no_grad():
                model.embed.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="step 6"):
        train_generator(model, cache, tmp_path, train_config(), log_fn=poison)
    progress = json.loads((tmp_path / "state" / "progress.json").read_text())
    assert progress["step"] == 4
    weights = safetensors.torch.load_file(tmp_path / "state" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_ranks_read_disjoint_rows_and_run_equal_steps(built):
    cache = TokenCache(output_path(built, "shapes", "tokens"))
    n = len(cache)  # 45 on tiny: odd, so an even split is impossible per epoch
    steps = n // 6 + 3
    shares = [cache_batches(cache, batch_size=3, seed=7, rank=r, world_size=2) for r in (0, 1)]
    seen = [[], []]
    for _ in range(steps):  # every rank yields a batch every step, whatever n is
        for rank, stream in enumerate(shares):
            rows = next(stream)["index"].tolist()
            assert len(rows) == 3
            seen[rank] += rows
    first_epoch = [rows[: n // 2] for rows in seen]
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert len(set(seen[0]) | set(seen[1])) == n
