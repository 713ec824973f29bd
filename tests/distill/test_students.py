"""Distilled students: each method's exact property, losses that fall, bit-exact resume, and the refusals users rely on."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import safetensors.torch
import torch

from conftest import REPO, run_stage
from tokenline.config import ConfigError
from tokenline.distill.checkpoint import load_student
from tokenline.distill.dmd import distribution_matching_loss, dmd_direction
from tokenline.distill.methods import RECIPES
from tokenline.distill.objectives import (
    consistency_function,
    curriculum_levels,
    pseudo_huber,
    u_shaped_times,
)
from tokenline.distill.pairs import PairCacheMismatch, draw_pairs, ensure_pairs, expected_meta, read_pairs
from tokenline.distill.teacher import load_teacher, student_from_teacher
from tokenline.generator.checkpoint import PairingError, save_generator
from tokenline.generator.generate import flow_endpoint, generate_images, sample_tokens
from tokenline.generator.samplers import build_sampler
from tokenline.generator.train import text_batch
from tokenline.layout import output_path, work_path
from tokenline.params_loading import load_params
from tokenline.text.captions import cached_text_encoder
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.training_loop import train_with_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KL = ("tokenizer.quantizer=kl",)


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory):
    """A tiny shapes project through the generator stage with kl latents (a flow teacher)."""
    root = tmp_path_factory.mktemp("flow_project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        run_stage(root, "generator", "shapes", *KL)
    return root


def params_for(root, *overrides):
    """The tiny profile's params of a test project."""
    return load_params(root / "params.yaml", profile="tiny", overrides=["tracking.enabled=false", *overrides],
                       dataset="shapes")


def teacher_of(root, *overrides):
    """(teacher, train cache, params) of a test project."""
    params = params_for(root, *overrides)
    teacher = load_teacher(output_path(root, "shapes", "generator"), output_path(root, "shapes", "tokenizer"), params)
    return teacher, TokenCache(output_path(root, "shapes", "tokens"), "train"), params


# --------------------------------------------------------------------------------------
# each method's exact property
# --------------------------------------------------------------------------------------


def test_reflow_pairs_are_the_teachers_ode_endpoints(flow_project):
    teacher, cache, _ = teacher_of(flow_project, *KL, "generator.sample.guidance=2.0")
    pairs = draw_pairs(teacher, cache, count=5, seed=3, batch_size=3)
    assert pairs["noise"].shape == pairs["endpoint"].shape == (5, teacher.model.config.num_tokens,
                                                               teacher.model.config.token_dim)
    for start in (0, 3):
        rows = pairs["rows"][start : start + 3]
        text = text_batch(cache.rows(rows.tolist()))
        options = replace(teacher.sampling, seed=3 * 1_000_003 + start)
        # What generation draws for these captions and this seed, with the teacher's CFG ...
        latents, _ = sample_tokens(teacher.model, text, options)
        assert torch.equal(teacher.model.denormalize(pairs["endpoint"][start : start + 3]), latents)
        # ... and the endpoint of the teacher's ODE from the stored noise.
        endpoint, nfe = flow_endpoint(teacher.model, text, options, noise=pairs["noise"][start : start + 3])
        assert torch.equal(endpoint, pairs["endpoint"][start : start + 3]) and nfe == 2 * options.steps


def test_mask_distill_pairs_are_the_teachers_decoded_codes(generator_project):
    teacher, cache, _ = teacher_of(generator_project)
    pairs = draw_pairs(teacher, cache, count=4, seed=0, batch_size=4)
    text = text_batch(cache.rows(pairs["rows"].tolist()))
    codes, _ = sample_tokens(teacher.model, text, replace(teacher.sampling, seed=0))
    assert torch.equal(pairs["codes"], codes)


def test_the_consistency_function_is_the_identity_at_time_zero(flow_project):
    teacher, cache, _ = teacher_of(flow_project, *KL)
    x = torch.randn(3, teacher.model.config.num_tokens, teacher.model.config.token_dim)
    text = text_batch(cache.rows([0, 1, 2]))
    assert torch.equal(consistency_function(teacher.model, x, torch.zeros(3), text), x)
    assert not torch.equal(consistency_function(teacher.model, x, torch.full((3,), 0.5), text), x)


def test_the_dmd_direction_is_zero_where_the_fake_score_is_the_real_one():
    x = torch.randn(3, 5, 4)
    x_t, t = 0.5 * x + 0.5 * torch.randn(3, 5, 4), torch.full((3,), 0.5)

    def score(y, s):
        return torch.tanh(y) * s[:, None, None]

    assert torch.equal(dmd_direction(x, x_t, t, score, score), torch.zeros_like(x))
    moved = dmd_direction(x, x_t, t, score, lambda y, s: score(y, s) + 0.1)
    # x0_fake - x0_real = -t * 0.1, over the mean |x - x0_real|: a sample is pushed against the fake score's excess.
    assert (moved < 0).all()
    assert torch.allclose(distribution_matching_loss(x, moved), 0.5 * moved.pow(2).mean())


def test_one_consistency_step_is_one_euler_step():
    noise = torch.randn(4, 6, 3)

    def velocity(x, t):
        return torch.sin(x) * t[:, None, None] + 0.3

    euler = build_sampler("euler").sample(velocity, noise, 1).x
    consistency = build_sampler("consistency").sample(velocity, noise, 1).x
    assert torch.allclose(euler, consistency, atol=1e-6)
    two = build_sampler("consistency").sample(velocity, noise, 2, generator=torch.Generator().manual_seed(0))
    assert two.nfe == 2 and not torch.allclose(two.x, consistency)


def test_u_shaped_times_put_their_mass_at_both_ends():
    generator = torch.Generator().manual_seed(0)
    t = u_shaped_times(200_000, 4.0, generator)
    middle = ((t > 0.25) & (t < 0.75)).float().mean()
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    # The density ∝ e^{4t} + e^{4(1-t)} holds (e^3 - e^1) / (e^4 - 1) = 0.324 of its mass in the middle half.
    assert abs(float(middle) - 0.3240) < 0.01
    assert abs(float(t.mean()) - 0.5) < 0.01
    uniform = u_shaped_times(200_000, 0.0, generator)
    assert abs(float(((uniform > 0.25) & (uniform < 0.75)).float().mean()) - 0.5) < 0.01


def test_pseudo_huber_is_zero_at_the_target_and_the_l2_norm_far_from_it():
    target = torch.randn(2, 4, 3)
    assert torch.equal(pseudo_huber(target, target, 0.01), torch.zeros(2))
    far = target + 10.0
    norm = (far - target).flatten(1).norm(dim=1)
    assert torch.allclose(pseudo_huber(far, target, 0.01), norm - 0.01, atol=1e-5)


def test_the_discretization_curriculum_doubles_up_to_its_cap():
    levels = [curriculum_levels(step, 800, 10, 1280) for step in (0, 99, 100, 200, 799)]
    assert levels == [11, 11, 21, 41, 1281]


# --------------------------------------------------------------------------------------
# training: losses fall, resume is bit-exact
# --------------------------------------------------------------------------------------


class NoisyWatch:
    """A watch that draws from torch's global RNG, as sampling with fresh noise would."""

    every = 4  # a reading at step 4, right after the state folder a resume starts from (tiny: checkpoint_every 4)

    def __call__(self, step, model):
        return {"noisy": float(torch.randn(4).sum())}


def _train(root, method, out, overrides=(), steps=40, log=None, resume=False, watch=None):
    teacher, cache, params = teacher_of(root, *overrides, f"student.method={method}", f"student.train.steps={steps}",
                                        "student.train.log_every=1", "student.pairs=24", "student.train.lr=1e-3")
    torch.manual_seed(0)
    recipe = RECIPES[method](teacher, params.student, cache, out, resume)
    model = student_from_teacher(teacher)
    return train_with_loss(model, recipe.batches_from, recipe.loss, out, params.student.train, save_generator,
                           "student", resume=resume, log_fn=log, companion=recipe.companion, watch=watch)


@pytest.mark.parametrize("method", ["reflow", "consistency", "dmd", "mask_distill"])
def test_each_methods_loss_is_finite_and_falls(method, flow_project, generator_project, tmp_path):
    root, overrides = (generator_project, ()) if method == "mask_distill" else (flow_project, KL)
    losses = []
    # reflow's last 30 % trains at t = 1 only, another loss: compare within its 2-RF phase. DMD2's
    # student loss follows a moving critic; its critic's flow loss on the student's samples falls.
    key = "critic_flow_loss" if method == "dmd" else "loss"
    _train(root, method, tmp_path, overrides, log=lambda step, m: losses.append(m[key]))
    assert all(torch.isfinite(torch.tensor(losses)))
    span = 28 if method == "reflow" else 40
    first, last = sum(losses[:6]) / 6, sum(losses[span - 6 : span]) / 6
    assert last < first, (method, losses)


@pytest.mark.parametrize("method", ["reflow", "consistency", "dmd", "mask_distill"])
def test_resume_is_bit_exact(method, flow_project, generator_project, tmp_path):
    root, overrides = (generator_project, ()) if method == "mask_distill" else (flow_project, KL)
    # Readings along training (student.watch) must not move the training RNG streams.
    _train(root, method, tmp_path / "straight", overrides, steps=8, watch=NoisyWatch())

    def crash(step, metrics):
        if step == 5:  # after the state folder of step 4 (tiny: checkpoint_every 4)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(root, method, tmp_path / "resumed", overrides, steps=8, log=crash, watch=NoisyWatch())
    _train(root, method, tmp_path / "resumed", overrides, steps=8, resume=True, watch=NoisyWatch())
    files = ["state/model.safetensors", "state/ema.safetensors", "checkpoint/model.safetensors"]
    for file in files + (["state/critic.safetensors"] if method == "dmd" else []):
        a = safetensors.torch.load_file(tmp_path / "straight" / file)
        b = safetensors.torch.load_file(tmp_path / "resumed" / file)
        assert all(torch.equal(a[k], b[k]) for k in a), (method, file)


# --------------------------------------------------------------------------------------
# the stage: a student a generator reader can sample, and the refusals
# --------------------------------------------------------------------------------------


def test_the_student_stage_writes_a_generator_checkpoint_sampled_in_its_steps(flow_project):
    runs = run_stage(flow_project, "student", "shapes", *KL, "student.method=reflow")
    assert runs[-1].stage == "student" and not runs[-1].skipped
    folder = output_path(flow_project, "shapes", "student")
    student, card = load_student(folder)
    assert card.method == "reflow" and card.steps == 1 and card.sampler == "euler"
    assert card.teacher_hash == json.loads((output_path(flow_project, "shapes", "generator") / "manifest.json")
                                           .read_text())["content_hash"]
    params = params_for(flow_project, *KL)
    images, nfe = generate_images(student, Tokenizer1D.from_checkpoint(output_path(flow_project, "shapes", "tokenizer")),
                                  ["a red circle", ""], cached_text_encoder(flow_project, params), card.sampling())
    assert images.shape == (2, 3, 32, 32) and nfe == 1 and torch.isfinite(images).all()
    report = json.loads((flow_project / "data" / "reports" / "shapes" / "student.json").read_text())
    assert report["nfe"] == 1 and report["teacher_straightness"] >= 0 and report["student_straightness"] >= 0
    # The FID along training (tiny: student.watch every 4 of 8 steps), in training.json and as a DVC plot.
    readings = json.loads((folder / "training.json").read_text())["fid_along_training"]
    assert [r["step"] for r in readings] == [4, 8] and all(r["fid"] > 0 for r in readings)
    plot = json.loads((flow_project / "data" / "reports" / "shapes" / "student_fid_along_training.json").read_text())
    assert plot == readings


def test_a_changed_teacher_makes_the_student_stale(flow_project):
    run_stage(flow_project, "student", "shapes", *KL, "student.method=reflow")
    again = run_stage(flow_project, "student", "shapes", *KL, "student.method=reflow")
    assert again[-1].skipped
    retrained = run_stage(flow_project, "student", "shapes", *KL, "student.method=reflow", "generator.train.lr=1e-3")
    ran = {run.stage for run in retrained if not run.skipped}
    assert {"generator", "student"} <= ran


def test_an_unknown_method_fails_at_params_validation(project):
    with pytest.raises(ConfigError, match=r"student\.method"):
        load_params(project / "params.yaml", profile="tiny", overrides=["student.method=dmd9"])


def test_a_method_for_the_other_objective_fails_before_any_stage_runs(project):
    with pytest.raises(ConfigError, match=r"student\.method 'reflow' cannot distill the masked generator"):
        run_stage(project, "student", "shapes", "student.method=reflow")
    assert not (project / "data").exists()


def test_a_student_paired_with_another_tokenizer_is_refused_naming_both(flow_project, generator_project):
    generator = output_path(flow_project, "shapes", "generator")
    tokenizer = output_path(generator_project, "shapes", "tokenizer")
    with pytest.raises(PairingError) as refused:
        load_teacher(generator, tokenizer, params_for(flow_project, *KL))
    assert str(generator) in str(refused.value) and str(tokenizer) in str(refused.value)


def test_a_pair_cache_from_another_teacher_is_refused_naming_both_hashes(flow_project, tmp_path):
    teacher, cache, _ = teacher_of(flow_project, *KL)
    ensure_pairs(tmp_path / "pairs", teacher, cache, 4, 0)
    other = replace(teacher, content_hash="f" * 64)
    with pytest.raises(PairCacheMismatch) as refused:
        read_pairs(tmp_path / "pairs", expected_meta(other, 4, 0))
    assert teacher.content_hash in str(refused.value) and "f" * 64 in str(refused.value)
    with pytest.raises(PairCacheMismatch):  # a resumed student trained on it: no silent redraw
        ensure_pairs(tmp_path / "pairs", other, cache, 4, 0, resume=True)
    ensure_pairs(tmp_path / "pairs", other, cache, 4, 0)  # a fresh run draws it again
    assert json.loads((tmp_path / "pairs" / "meta.json").read_text())["teacher_hash"] == "f" * 64


def test_the_pair_cache_lives_in_the_students_work_folder(flow_project):
    run_stage(flow_project, "student", "shapes", *KL, "student.method=reflow")
    meta = json.loads((work_path(flow_project, "shapes", "student") / "pairs" / "meta.json").read_text())
    assert meta["objective"] == "flow" and meta["count"] == params_for(flow_project, *KL).student.pairs


def test_student_eval_scores_the_student_beside_its_teacher(flow_project):
    overrides = (*KL, "student.method=reflow", "generator.sample.guidance=2.0")
    run_stage(flow_project, "student_eval", "shapes", *overrides)
    report = json.loads((flow_project / "data" / "reports" / "shapes" / "student_eval.json").read_text())
    params = params_for(flow_project, *overrides)
    # The teacher at the sampling the student learned: its steps, guided (two evaluations a step).
    assert report["nfe"] == 1 and report["teacher_nfe"] == 2 * params.generator.sample.steps
    assert report["fid_ratio"] == pytest.approx(report["fid"] / report["teacher_fid"])
    assert report["speedup"] == pytest.approx(report["images_per_s"] / report["teacher_images_per_s"])
    assert [row["steps"] for row in report["sweep"]] == params.student.eval_steps
    assert [row["nfe"] for row in report["sweep"]] == params.student.eval_steps
    assert report["shapes_color_acc"] >= 0 and report["teacher_shapes_color_acc"] >= 0
    grids = report["grids"]
    assert [item["prompt"] for item in grids["student"]] == [item["prompt"] for item in grids["teacher"]]
    assert all((output_path(flow_project, "shapes", "student_eval") / item["file"]).is_file() for item in grids["student"])


@pytest.mark.integration  # exports ONNX graphs
def test_a_one_step_student_exports_and_runs_in_onnxruntime_at_parity(flow_project, tmp_path):
    from tokenline.export.build import export_pipeline, measure_parity, torch_backend
    from tokenline.text.captions import params_text_encoder

    run_stage(flow_project, "student", "shapes", *KL, "student.method=reflow")
    student, card = load_student(output_path(flow_project, "shapes", "student"))
    tokenizer = Tokenizer1D.from_checkpoint(output_path(flow_project, "shapes", "tokenizer"))
    encoder = params_text_encoder(params_for(flow_project, *KL))
    spec = export_pipeline(tmp_path / "onnx", student, tokenizer, encoder, card.sampling(), {"generator": card.teacher_hash}, 18)
    assert spec["generator"]["steps"] == 1 and spec["generator"]["sampler"] == "euler"
    prompts = ["a red circle", "", "two blue squares"]
    figures, images, _ = measure_parity(tmp_path / "onnx", torch_backend(student, tokenizer, encoder), prompts, [1, 3],
                                        threads=1)
    assert figures["max_abs_diff"] <= 1e-3 and images.shape[0] == 3
