"""Two-stage training of a 1D tokenizer against a grid teacher (TiTok): the model, both phases, the stage, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import REPO, run_stage
from tokenline.config import ConfigError
from tokenline.params_loading import load_params
from tokenline.runner import check_params
from tokenline.tokenizer.model import TOKENIZER_SIZES, Tokenizer1D, TokenizerConfig, on_decoder_side
from tokenline.tokenizer.train import LossConfig, TrainConfig, train_tokenizer
from tokenline.tokenizer.two_stage import proxy_loss, teacher_targets

# 32 px, patch 8: a 4 x 4 grid teacher (16 latents) and a 1D tokenizer of 16 tokens.
SIZE = dict(image_size=32, patch_size=8)


def grid_teacher(quantizer: str = "kl", seed: int = 0, **overrides) -> Tokenizer1D:
    torch.manual_seed(seed)
    return TOKENIZER_SIZES["T"](**(SIZE | dict(layout="grid", num_tokens=16, quantizer=quantizer, token_dim=6,
                                               codebook_size=32) | overrides))


def student(teacher: Tokenizer1D, seed: int = 1, **overrides) -> Tokenizer1D:
    torch.manual_seed(seed)
    model = TOKENIZER_SIZES["T"](**(SIZE | dict(num_tokens=16, quantizer="kl", teacher=teacher.config.to_dict())
                                     | overrides))
    model.pixel_decoder.load_teacher(teacher)
    return model


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_pixel_decoder_paints_teacher_latents_as_the_teacher_does():
    teacher = grid_teacher().eval()
    model = student(teacher).eval()
    latents = teacher.encode(images()).latents
    with torch.no_grad():
        assert torch.equal(model.pixel_decoder(latents), teacher.decode(latents))
    # The exported model decodes through its own copy: pixels -> K tokens -> pixels, no teacher needed.
    with torch.no_grad():
        reconstruction, quantized = model(images())
    assert reconstruction.shape == (4, 3, 32, 32) and quantized.latents.shape == (4, 16, model.config.token_dim)
    assert model.predict_teacher(quantized.latents).shape == (4, 16, teacher.config.token_dim)
    assert all(on_decoder_side(name) for name, _ in model.named_parameters() if name.startswith("pixel_decoder"))


def test_a_two_stage_checkpoint_loads_without_its_teacher(tmp_path):
    from tokenline.tokenizer.checkpoint import save_checkpoint

    model = student(grid_teacher()).eval()
    save_checkpoint(model, tmp_path)
    loaded = Tokenizer1D.from_checkpoint(tmp_path)
    assert loaded.config.teacher == model.config.teacher
    with torch.no_grad():
        assert torch.equal(loaded(images())[0], model(images())[0])
    # A plain 1D config keeps its old fields (so its hash): no teacher key when there is none.
    assert "teacher" not in TokenizerConfig(**SIZE, num_tokens=16).to_dict()


@pytest.mark.parametrize("change, named", [
    (dict(layout="1d"), "layout 'grid'"),
    (dict(patch_size=4, num_tokens=64), "patch_size"),
    (dict(image_size=64, num_tokens=64), "image_size"),
])
def test_a_teacher_that_does_not_fit_is_refused(change, named):
    teacher = grid_teacher(**change) if change.get("layout") != "1d" else grid_teacher(layout="1d")
    with pytest.raises(ValueError, match=named):
        TokenizerConfig(**SIZE, num_tokens=16, teacher=teacher.config.to_dict())


def test_proxy_loss_is_regression_for_kl_and_cross_entropy_over_codes_for_vq():
    kl = grid_teacher("kl").eval()
    targets = teacher_targets(kl, images())
    assert proxy_loss(targets, targets, kl).item() == 0.0
    assert proxy_loss(targets + 1.0, targets, kl).item() == pytest.approx(1.0)

    vq = grid_teacher("vq").eval()
    codes = teacher_targets(vq, images())
    assert codes.dtype == torch.long and codes.shape == (4, 16)
    exact = vq.quantizer.decode_codes(codes)
    wrong = vq.quantizer.decode_codes((codes + 1) % vq.config.codebook_size)
    assert proxy_loss(exact, codes, vq) < proxy_loss(wrong, codes, vq)


def _config(**overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, checkpoint_every=6, seed=0,
                  log_every=1, proxy_steps=6, loss=LossConfig(adversarial=0.0))
    return TrainConfig(**(values | overrides))


@pytest.mark.integration
def test_stage_one_learns_teacher_latents_and_stage_two_keeps_them(shard_dir, tmp_path):
    teacher = grid_teacher()
    logged = {}
    model = student(teacher)
    train_tokenizer(model, shard_dir, tmp_path, _config(steps=6), teacher=teacher,
                    log_fn=lambda step, metrics: logged.__setitem__(step, metrics))
    assert all("proxy" in logged[step] and "l1" not in logged[step] for step in range(1, 7))
    after_proxy = Tokenizer1D.from_checkpoint(tmp_path / "checkpoint")
    # Stage 1 leaves the teacher's pixel decoder as it was.
    for name, tensor in teacher.state_dict().items():
        if on_decoder_side(name):
            assert torch.equal(after_proxy.pixel_decoder.state_dict()[name], tensor), name

    # Stage 2 (the same run, resumed to 12 steps) trains on pixels; every latent stays bit-identical.
    train_tokenizer(student(teacher), shard_dir, tmp_path, _config(), resume=True, teacher=teacher,
                    log_fn=lambda step, metrics: logged.__setitem__(step, metrics))
    assert all("l1" in logged[step] and "proxy" not in logged[step] for step in range(7, 13))
    final = Tokenizer1D.from_checkpoint(tmp_path / "checkpoint")
    with torch.no_grad():
        assert torch.equal(final.encode(images()).latents, after_proxy.encode(images()).latents)
    changed = [name for name, t in final.pixel_decoder.state_dict().items()
               if not torch.equal(t, after_proxy.pixel_decoder.state_dict()[name])]
    assert changed, "stage 2 trains the pixel decoder"


@pytest.mark.integration
def test_proxy_training_lowers_the_loss_in_the_teachers_latent_space(shard_dir, tmp_path):
    teacher = grid_teacher()
    logged = {}
    train_tokenizer(student(teacher), shard_dir, tmp_path, _config(steps=30, proxy_steps=30), teacher=teacher,
                    log_fn=lambda step, metrics: logged.__setitem__(step, metrics["proxy"]))
    first, last = sum(logged[s] for s in range(1, 6)) / 5, sum(logged[s] for s in range(26, 31)) / 5
    assert last < 0.7 * first, (first, last)


def test_training_a_two_stage_model_without_its_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass its grid teacher"):
        train_tokenizer(student(grid_teacher()), tmp_path, tmp_path / "out", _config())
    with pytest.raises(ValueError, match="not the one"):
        train_tokenizer(student(grid_teacher()), tmp_path, tmp_path / "out", _config(),
                        teacher=grid_teacher(token_dim=4))


@pytest.mark.parametrize("override, named", [
    ("teacher_tokenizer.model.layout=1d", "teacher_tokenizer.model.layout: must be 'grid'"),
    ("teacher_tokenizer.model.num_tokens=16", "num_tokens is set by the grid"),
    ("teacher_tokenizer.train.proxy_steps=3", "proxy_steps"),
])
def test_bad_teacher_params_fail_at_load(override, named):
    with pytest.raises(ConfigError, match=named):
        load_params(REPO / "params.yaml", profile="tiny", overrides=[override])


def test_a_teacher_of_another_patch_size_fails_before_any_work():
    params = load_params(REPO / "params.yaml", profile="tiny", overrides=["teacher_tokenizer.model.patch_size=4"])
    with pytest.raises(ConfigError, match="patch_size"):
        check_params(params)


@pytest.mark.integration
def test_a_changed_teacher_makes_the_tokenizer_stale_and_its_decoder_is_the_teachers(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run_stage(tmp_path, "tokenizer", "shapes")
    tokenizer = tmp_path / "models" / "shapes" / "tokenizer"
    trained = Tokenizer1D.from_checkpoint(tokenizer)
    teacher = Tokenizer1D.from_checkpoint(tmp_path / "models" / "shapes" / "teacher_tokenizer")
    assert trained.config.teacher == teacher.config.to_dict()
    before = (tokenizer / "model.safetensors").read_bytes()

    runs = {run.stage: run for run in run_stage(tmp_path, "tokenizer", "shapes", "teacher_tokenizer.train.seed=1")}
    assert runs["shards"].skipped and not runs["teacher_tokenizer"].skipped
    assert not runs["tokenizer"].skipped, "a retrained teacher must make the 1D tokenizer stale"
    assert (tokenizer / "model.safetensors").read_bytes() != before
