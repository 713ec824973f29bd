"""Tokenizer training: loss falls, EMA export, bit-exact resume, config guard, NaN stop, schedule."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from tokenline.tokenizer.model import TOKENIZER_SIZES, Tokenizer1D
from tokenline.tokenizer.train import (
    DISC_WEIGHTS,
    EMA,
    LossConfig,
    ResumeRefusedError,
    ShardImages,
    TrainConfig,
    cosine_with_warmup,
    foreground_mask,
    pixel_losses,
    train_tokenizer,
)
from tokenline.training import EMA_WEIGHTS, MODEL_WEIGHTS, PROGRESS

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def tiny_model(seed: int = 0, **overrides) -> Tokenizer1D:
    torch.manual_seed(seed)
    return TOKENIZER_SIZES["T"](**(dict(image_size=32, num_tokens=16) | overrides))


# Frequent dead-code restarts draw from the torch RNG, so resuming must restore it too.
RESTARTS = dict(quantizer_options={"restart_every": 3, "dead_after": 2})
# The discriminator switches on before the crash point, so its weights and optimizer must resume too.
EARLY_GAN = LossConfig(adversarial=0.5, adversarial_start=5)


def config(**overrides) -> TrainConfig:
    values = dict(steps=20, batch_size=8, lr=1e-3, weight_decay=1e-4, warmup_steps=4, min_lr_ratio=0.1,
                  grad_clip=1.0, ema_decay=0.9, checkpoint_every=10, seed=0, log_every=1)
    return TrainConfig(**(values | overrides))


def test_loss_falls_and_checkpoint_is_the_ema(shard_dir, tmp_path):
    losses = {}
    result = train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=40),
                             log_fn=lambda step, metrics: losses.__setitem__(step, metrics))
    assert result["steps"] == 40 and result["images_per_s"] > 0 and result["wall_time_s"] > 0
    assert set(losses) == set(range(1, 41))
    assert {"loss", "l1", "l2", "quantizer", "lr", "images_per_s"} <= set(losses[1])
    first = sum(losses[s]["loss"] for s in range(1, 6)) / 5
    last = sum(losses[s]["loss"] for s in range(36, 41)) / 5
    assert last < 0.6 * first, (first, last)
    assert result["final_loss"] == pytest.approx(losses[40]["loss"])

    exported = Tokenizer1D.from_checkpoint(tmp_path / "checkpoint")
    shadow = safetensors.torch.load_file(tmp_path / "state" / EMA_WEIGHTS)
    params = dict(exported.named_parameters())
    assert shadow.keys() == params.keys()
    for name, tensor in shadow.items():
        assert torch.equal(params[name].detach(), tensor), name
    # The EMA lags the raw weights, so the export really is the shadow and not the model.
    raw = safetensors.torch.load_file(tmp_path / "state" / MODEL_WEIGHTS)
    assert any(not torch.equal(raw[name], shadow[name]) for name in shadow)
    assert json.loads((tmp_path / "state" / PROGRESS).read_text())["step"] == 40


def test_resume_matches_a_straight_run(shard_dir, tmp_path):
    # latent_noise draws from the torch RNG every step too
    straight = tiny_model(**RESTARTS)
    train_tokenizer(straight, shard_dir, tmp_path / "straight", config(loss=EARLY_GAN, latent_noise=0.5))

    # Crash the second run at step 13: the state folder holds step 10, the run goes on from there.
    def crash(step, metrics):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(tiny_model(**RESTARTS), shard_dir, tmp_path / "resumed", config(loss=EARLY_GAN, latent_noise=0.5),
                        log_fn=crash)
    assert json.loads((tmp_path / "resumed" / "state" / PROGRESS).read_text())["step"] == 10
    assert (tmp_path / "resumed" / "state" / DISC_WEIGHTS).is_file()
    # A fresh, differently initialized model: everything must come from the state folder.
    resumed = tiny_model(seed=123, **RESTARTS)
    result = train_tokenizer(resumed, shard_dir, tmp_path / "resumed", config(loss=EARLY_GAN, latent_noise=0.5),
                             resume=True)
    assert result["steps"] == 20
    disc_a = safetensors.torch.load_file(tmp_path / "straight" / "state" / DISC_WEIGHTS)
    disc_b = safetensors.torch.load_file(tmp_path / "resumed" / "state" / DISC_WEIGHTS)
    for key in disc_a:
        assert torch.allclose(disc_a[key], disc_b[key], rtol=0, atol=1e-6), key

    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=0, atol=1e-6), name
    for folder in ("state", "checkpoint"):
        name = EMA_WEIGHTS if folder == "state" else "model.safetensors"
        ema_a = safetensors.torch.load_file(tmp_path / "straight" / folder / name)
        ema_b = safetensors.torch.load_file(tmp_path / "resumed" / folder / name)
        for key in ema_a:
            assert torch.allclose(ema_a[key].float(), ema_b[key].float(), rtol=0, atol=1e-6), key


def test_latent_noise_noises_each_image_by_its_own_share_of_the_latent_std():
    from tokenline.tokenizer.model import noised

    latents = torch.randn(4000, 32, 24) * 3.0
    assert noised(latents, 0.0) is latents
    torch.manual_seed(0)
    noise = noised(latents, 0.5) - latents
    per_image = noise.std(dim=(1, 2))
    # u ~ U(0, 1) per image: strengths spread from ~0 to 0.5 * 3.0, mean square 0.5² * 3² / 3
    assert per_image.min() < 0.05 and 1.4 < per_image.max() < 1.5 * 1.15  # a 768-value std wobbles a few %
    assert abs(noise.square().mean().item() - 0.25 * 9 / 3) < 0.05


def test_latent_noise_is_checked_and_left_out_of_configs_that_do_not_use_it():
    assert "latent_noise" not in config().to_dict()  # older tokenizers' configs and hashes stay as they were
    assert config(latent_noise=0.5).to_dict()["latent_noise"] == 0.5
    with pytest.raises(ValueError, match="latent_noise must be in"):
        config(latent_noise=-1.0)


def test_resume_refuses_a_changed_config(shard_dir, tmp_path):
    train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=4, checkpoint_every=4))
    with pytest.raises(ResumeRefusedError, match=r"train\.lr") as error:
        train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=6, lr=5e-4), resume=True)
    assert "train.steps" not in str(error.value)
    result = train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=6, lr=5e-4), resume=True, force=True)
    assert result["steps"] == 6
    # Extending `steps` alone is what resuming is for: no force needed.
    assert train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=8, lr=5e-4), resume=True)["steps"] == 8


@pytest.mark.parametrize("quantizer", ["kl", "vq"])
def test_decoder_fine_tuning_keeps_every_latent(shard_dir, tmp_path, quantizer):
    """freeze_encoder on resume: the exported encoder side is unchanged, so a token cache stays valid."""
    options = dict(quantizer=quantizer, **(RESTARTS if quantizer == "vq" else {}))
    train_tokenizer(tiny_model(**options), shard_dir, tmp_path, config(steps=10))
    before = Tokenizer1D.from_checkpoint(tmp_path / "checkpoint")
    images = ShardImages(shard_dir).images[:8].float() / 127.5 - 1.0
    with torch.no_grad():
        latents = before.encode(images).latents

    result = train_tokenizer(tiny_model(seed=5, **options), shard_dir, tmp_path,
                             config(steps=20, freeze_encoder=True), resume=True, force=True)
    assert result["steps"] == 20
    after = Tokenizer1D.from_checkpoint(tmp_path / "checkpoint")
    changed = set()
    for (name, old), new in zip(before.state_dict().items(), after.state_dict().values()):
        if not torch.equal(old, new):
            changed.add(name.split(".")[0])
    # Only the decoder side trained (codebook usage buffers included: the quantizer ran in eval mode).
    assert changed and changed <= {"from_latent", "latent_pos", "decoder", "to_pixels", "mask_token", "mask_pos"}
    assert {"decoder", "to_pixels"} <= changed
    with torch.no_grad():
        assert torch.equal(after.encode(images).latents, latents)
        assert not torch.equal(after.decode(latents), before.decode(latents))


def test_nan_loss_stops_and_keeps_the_last_good_state(shard_dir, tmp_path):
    model = tiny_model()
    calls = {"n": 0}

    def poison(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 7:  # the 7th training forward is step 7
                return output * float("nan")
        return None

    model.to_pixels.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"step 7\b"):
        train_tokenizer(model, shard_dir, tmp_path, config(steps=20, checkpoint_every=5))
    progress = json.loads((tmp_path / "state" / PROGRESS).read_text())
    assert progress["step"] == 5
    loaded = Tokenizer1D.from_checkpoint(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    # The good state resumes cleanly (the poison hook is not on this fresh model).
    assert train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=8, checkpoint_every=5), resume=True)["steps"] == 8


def test_cosine_schedule_warmup_and_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, warmup=4, total=20, min_ratio=0.1)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[20] == pytest.approx(0.1)


def test_ema_with_decay_zero_equals_the_model():
    model = tiny_model()
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    copy = tiny_model(seed=5)
    ema.copy_to(copy)
    for (name, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), name
    ema.load_state_dict({k: torch.zeros_like(v) for k, v in ema.state_dict().items()})
    assert all((v == 0).all() for v in ema.state_dict().values())


def test_shard_images_order_is_deterministic_and_skippable(shard_dir):
    data = ShardImages(shard_dir, seed=3)
    n = len(data)
    stream = iter(data)
    keys = [next(stream)[1] for _ in range(2 * n + 5)]
    assert sorted(keys[:n]) == sorted(data.keys) and keys[:n] != keys[n : 2 * n]  # a new order per epoch
    image, _ = next(iter(data))
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert -1.0 <= image.min() and image.max() <= 1.0
    skipped = iter(ShardImages(shard_dir, seed=3, start=n + 2))
    assert [next(skipped)[1] for _ in range(n)] == keys[n + 2 : 2 * n + 2]


def test_adversarial_terms_switch_on_after_the_warmup(shard_dir, tmp_path):
    logged = {}
    loss = LossConfig(adversarial=0.5, adversarial_start=3)
    train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=6, loss=loss),
                    log_fn=lambda step, metrics: logged.__setitem__(step, metrics))
    for step in (1, 2, 3):  # step s logs the s-th update, which ran at step index s - 1 < 3
        assert "generator" not in logged[step] and "discriminator" not in logged[step]
    for step in (4, 5, 6):
        assert {"generator", "discriminator", "adaptive_weight"} <= set(logged[step])
        assert logged[step]["adaptive_weight"] > 0
    assert (tmp_path / "state" / DISC_WEIGHTS).is_file()


def test_no_discriminator_when_its_weight_is_zero(shard_dir, tmp_path):
    train_tokenizer(tiny_model(), shard_dir, tmp_path, config(steps=2, loss=LossConfig(adversarial=0.0, adversarial_start=0)))
    assert not (tmp_path / "state" / DISC_WEIGHTS).exists()


def test_processes_read_disjoint_halves_of_each_epoch(shard_dir):
    whole = ShardImages(shard_dir, seed=1)
    n = len(whole)
    stream = iter(whole)
    epoch = [next(stream)[1] for _ in range(n)]
    halves = []
    for rank in (0, 1):
        part = iter(ShardImages(shard_dir, seed=1, rank=rank, world_size=2))
        halves.append([next(part)[1] for _ in range((n - rank + 1) // 2)])
    assert halves[0] == epoch[0::2] and halves[1] == epoch[1::2]
    assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == set(epoch)
    with pytest.raises(ValueError, match="rank 2"):
        ShardImages(shard_dir, rank=2, world_size=2)


def test_text_conditioned_training_needs_and_uses_captions(shard_dir, tmp_path):
    model = tiny_model(text_dim=6, text_tokens=4)
    with pytest.raises(ValueError, match="text_fn"):
        train_tokenizer(model, shard_dir, tmp_path, config(steps=2))
    seen = []

    def text_fn(keys):
        seen.extend(keys)
        return torch.randn(len(keys), 4, 6), torch.ones(len(keys), 4, dtype=torch.bool)

    train_tokenizer(model, shard_dir, tmp_path, config(steps=2), text_fn=text_fn)
    assert len(seen) == 2 * 8


def test_ema_warms_up_so_short_runs_forget_the_random_init():
    ema = EMA(tiny_model(), decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10**6) == 0.999
    # After 1,000 warmed-up updates the init keeps a negligible weight, not 0.999**1000 = 37 %.
    init_weight = 1.0
    for step in range(1000):
        init_weight *= ema.decay_at(step)
    assert init_weight < 1e-3 < 0.999**1000


def test_foreground_weighting_counts_the_shape_and_is_off_at_zero():
    # A white 8x8 image with a red 2x2 square: 4 of 64 pixels are foreground.
    images = torch.ones(2, 3, 8, 8)
    images[:, 1:, 3:5, 3:5] = -1.0
    # A black backdrop works too: the background is the border's median colour, not white.
    images[1] = -images[1]
    mask = foreground_mask(images, threshold=0.1)
    assert mask.shape == (2, 1, 8, 8) and mask.sum() == 2 * 4
    assert mask[:, 0, 3:5, 3:5].eq(1).all()

    # Painting the whole image as background: only the 4 square pixels are wrong, by 2 in two channels.
    background = images.clone()
    background[:, 1:, 3:5, 3:5] = images[:, 1:, :1, :1]
    plain = pixel_losses(background, images, LossConfig(foreground=0.0))
    assert plain["l1"] == pytest.approx(2 * 2 * 4 / (3 * 64))
    assert torch.equal(plain["l1"], torch.nn.functional.l1_loss(background, images))
    assert torch.equal(plain["l2"], torch.nn.functional.mse_loss(background, images))
    # Weight 4: the square's pixels count 5 times, and the mean is over the weights (64 + 4 * 4).
    weighted = pixel_losses(background, images, LossConfig(foreground=4.0))
    assert weighted["l1"] == pytest.approx(5 * 2 * 2 * 4 / (3 * (64 + 16)))
    assert weighted["l2"] == pytest.approx(5 * 4 * 2 * 4 / (3 * (64 + 16)))
    assert weighted["l1"] > 3 * plain["l1"]
    # An image without foreground keeps the plain mean.
    blank = torch.ones(1, 3, 8, 8)
    assert torch.allclose(pixel_losses(blank * 0.5, blank, LossConfig(foreground=4.0))["l1"], torch.tensor(0.5))
    # The boost stops where the foreground would outweigh the background: with a quarter of the
    # pixels foreground the weight is 1 + (1 - 2/4) / (1/4) = 3, not 1 + 16, and at half it is plain.
    quarter = torch.ones(1, 3, 8, 8)
    quarter[:, 1:, 2:6, 2:6] = -1.0  # 16 of 64 pixels
    capped = pixel_losses(torch.ones_like(quarter), quarter, LossConfig(foreground=16.0))
    assert capped["l1"] == pytest.approx(3 * 2 * 2 * 16 / (3 * (3 * 16 + 48)))
    half = torch.ones(1, 3, 8, 8)
    half[:, 1:, 1:7, 1:7] = -1.0  # 36 of 64 pixels: more than half
    assert torch.allclose(pixel_losses(torch.ones_like(half), half, LossConfig(foreground=16.0))["l1"],
                          torch.nn.functional.l1_loss(torch.ones_like(half), half))
    with pytest.raises(ValueError, match="foreground"):
        LossConfig(foreground=-1.0)


def test_bf16_on_cpu_trains_after_an_fp32_run_in_the_same_process(shard_dir, tmp_path):
    """`tokenline run all` trains several stages in one process; each may pick its own precision."""
    plain = train_tokenizer(tiny_model(), shard_dir, tmp_path / "fp32", config(steps=4))
    losses = []
    bf16 = train_tokenizer(tiny_model(), shard_dir, tmp_path / "bf16", config(steps=4, mixed_precision="bf16"),
                           log_fn=lambda step, metrics: losses.append(metrics["loss"]))
    assert bf16["steps"] == 4 and all(math.isfinite(loss) for loss in losses)
    # Close to fp32 but not identical: the steps really ran under bf16 autocast.
    assert bf16["final_loss"] == pytest.approx(plain["final_loss"], rel=0.1) and bf16["final_loss"] != plain["final_loss"]
    assert train_tokenizer(tiny_model(), shard_dir, tmp_path / "again", config(steps=4))["final_loss"] == plain["final_loss"]
