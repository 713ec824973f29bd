"""The distill stages of the lineage: `student` (distill the generator, `student.method`) and `student_eval` (score it beside its teacher)."""

from __future__ import annotations

import shutil

import torch

from tokenline.artifacts import atomic_write_json, read_manifest
from tokenline.distill import checks as student_checks
from tokenline.distill.checkpoint import StudentCard, load_student, save_student
from tokenline.distill.evaluation import compare, score, steps_sweep
from tokenline.distill.methods import RECIPES, Recipe
from tokenline.distill.straightness import straightness
from tokenline.distill.teacher import Teacher, load_teacher, student_from_teacher
from tokenline.distill.watch import FidWatch
from tokenline.generator.checkpoint import load_generator, save_generator
from tokenline.eval.gates import scalar_figures
from tokenline.eval.feature_cache import feature_cache_dir
from tokenline.eval.generation import GenerationMetrics
from tokenline.eval.stages import METRICS, Subject, reference_samples, save_prompt_sets
from tokenline.generator.generate import SamplingOptions, generate_images
from tokenline.generator.model import FlowTransformer, num_params
from tokenline.generator.stages import preview_prompts
from tokenline.generator.train import text_batch
from tokenline.layout import work_path
from tokenline.stage import AssetCheck, PlotSpec, Stage, StageContext, StageResult
from tokenline.text.captions import cached_text_encoder
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.training import seed_everything
from tokenline.training_loop import CHECKPOINT, train_with_loss

TRAINING = "training.json"
STRAIGHTNESS_SAMPLES = 64  # pairs whose trajectories are measured


def trajectory_straightness(teacher: Teacher, student: FlowTransformer, recipe: Recipe, cache: TokenCache) -> dict:
    """The teacher's (guided) and the student's straightness on the first pairs' noise and captions, at the teacher's steps."""
    pairs = recipe.pairs
    count = min(STRAIGHTNESS_SAMPLES, len(pairs["rows"]))
    text = text_batch(cache.rows(pairs["rows"][:count].tolist()))
    noise = pairs["noise"][:count]
    student.eval()
    steps = teacher.sampling.steps
    return {"teacher_straightness": straightness(teacher.velocity(text), noise, steps),
            "student_straightness": straightness(lambda x, t: student(x, t, text), noise, steps),
            "straightness_steps": steps, "straightness_samples": count}


def fid_watch(ctx: StageContext, tokenizer: Tokenizer1D, sampling: SamplingOptions, work) -> FidWatch | None:
    """The loop's FID reading of the student (None when `student.watch.every` is 0)."""
    w = ctx.params.student.watch
    if not w.every:
        return None
    samples = reference_samples(ctx.inputs["shards"], ctx.inputs["captions"], w.samples)
    real = samples_to_batch(samples, tokenizer.config.image_size)
    watch = FidWatch(w.every, tokenizer, cached_text_encoder(ctx.root, ctx.params), [s["caption"] for s in samples],
                     GenerationMetrics(real, kid_subset_size=len(samples), cache_dir=feature_cache_dir(ctx.root)), sampling, work / "watch.json")
    if ctx.resume:
        watch.resume()
    return watch


def student(ctx: StageContext) -> StageResult:
    """Train the student `student.method` names from the generator; write its checkpoint, card and sample previews."""
    p = ctx.params.student
    tokenizer_dir = ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    teacher = load_teacher(ctx.inputs["generator"], tokenizer_dir, ctx.params)
    cache = TokenCache(ctx.inputs["tokens"], "train", expect_tokenizer_hash=tokenizer_hash)
    work = work_path(ctx.root, ctx.dataset, "student")
    seed_everything(p.train.seed)  # a method's own modules (DMD2's critic head) draw their initial weights here
    recipe = RECIPES[teacher.method](teacher, p, cache, work, ctx.resume)
    model = student_from_teacher(teacher)
    card = StudentCard(method=teacher.method, sampler=recipe.sampler, steps=p.steps,
                       teacher=str(teacher.folder.relative_to(ctx.root)), teacher_hash=teacher.content_hash,
                       teacher_sampling=teacher.sampling.describe(), settings=recipe.settings)
    tokenizer = Tokenizer1D.from_checkpoint(tokenizer_dir)
    watch = fid_watch(ctx, tokenizer, card.sampling(seed=ctx.params.generator.sample.seed), work)
    summary = train_with_loss(model, recipe.batches_from, recipe.loss, work, p.train, save_generator, "student",
                              resume=ctx.resume, force=ctx.force, log_fn=ctx.tracker.log_metrics,
                              companion=recipe.companion, watch=watch)
    readings = {"fid_along_training": watch.readings} if watch is not None else {}

    out = ctx.outputs["student"]
    for file in sorted((work / CHECKPOINT).iterdir()):
        shutil.copy2(file, out / file.name)
    save_student(load_generator(out), out, card)
    trained, card = load_student(out)
    figures = {}
    if isinstance(trained, FlowTransformer) and recipe.pairs is not None:
        figures = trajectory_straightness(teacher, trained, recipe, cache)
    atomic_write_json(out / TRAINING, {**summary, "train": p.train.to_dict(), "method": teacher.method,
                                       "num_params": num_params(trained), "teacher": card.teacher,
                                       "teacher_hash": teacher.content_hash, **figures, **readings})

    prompts = preview_prompts(ctx, cache)
    encoder = cached_text_encoder(ctx.root, ctx.params)
    with torch.no_grad():
        images, nfe = generate_images(trained, tokenizer, prompts, encoder, card.sampling())
    samples = [(tensor_to_image(image), prompt) for image, prompt in zip(images, prompts)]
    metrics = {key: float(summary[key]) for key in ("final_loss", "samples_per_s", "wall_time_s")} | figures
    report = {"method": teacher.method, "steps": p.steps, "nfe": nfe, "teacher_hash": teacher.content_hash,
              "teacher_sampling": card.teacher_sampling, **metrics, **readings}
    if watch is not None and watch.readings:
        metrics["watch_fid"] = watch.readings[-1]["fid"]
    plots = {"fid_along_training": watch.readings if watch is not None else []}  # empty: student.watch.every 0
    return StageResult(counts={"steps": int(summary["steps"]), "params": num_params(trained)},
                       metrics=metrics, report=report, samples=samples, plots=plots)


def student_eval(ctx: StageContext) -> StageResult:
    """Score the student with gen_eval's protocol beside its teacher at the sampling it learned; FID vs NFE; grids."""
    g = ctx.params.gen_eval
    tokenizer_dir = ctx.inputs["tokenizer"]
    teacher = load_teacher(ctx.inputs["generator"], tokenizer_dir, ctx.params)
    student_model, card = load_student(ctx.inputs["student"])
    if card.teacher_hash != teacher.content_hash:
        raise ValueError(f"student {ctx.inputs['student']} was distilled from teacher {card.teacher_hash}, "
                         f"not from {ctx.inputs['generator']} ({teacher.content_hash}); run `tokenline run student`")
    tokenizer = Tokenizer1D.from_checkpoint(tokenizer_dir)
    samples = reference_samples(ctx.inputs["shards"], ctx.inputs["captions"], g.samples)
    encoder = cached_text_encoder(ctx.root, ctx.params)
    prompts = [s["caption"] for s in samples]
    real = samples_to_batch(samples, tokenizer.config.image_size)
    teacher_options = SamplingOptions(**{**card.teacher_sampling, "seed": ctx.params.generator.sample.seed})
    student_options = card.sampling(seed=ctx.params.generator.sample.seed)
    metrics = GenerationMetrics(real, kid_subset_size=g.kid_subset_size, cache_dir=feature_cache_dir(ctx.root))
    shapes = ctx.params.dataset(ctx.dataset).source == "shapes"
    group = min(g.probe_group, len(prompts))
    teacher_subject = Subject(teacher.model, tokenizer, encoder, prompts, real, teacher_options)
    student_subject = Subject(student_model, tokenizer, encoder, prompts, real, student_options)
    teacher_figures, teacher_images = score(teacher_subject, metrics, teacher_options, ctx.inputs["probe"], group, shapes)
    student_figures, student_images = score(student_subject, metrics, student_options, ctx.inputs["probe"], group, shapes)
    report: dict = {"method": card.method, "steps": card.steps, **compare(student_figures, teacher_figures)}
    sweep = steps_sweep(student_subject, metrics, student_options, ctx.params.student.eval_steps, student_figures)
    report["sweep"] = sweep
    report["protocol"] = {"samples": len(samples), "reference": "gen_eval's: val split first, then train",
                          "student_sampling": student_options.describe(), "teacher_sampling": teacher_options.describe(),
                          "fid": metrics.protocol(), "probe": f"R@1 among groups of {group}",
                          "speed": f"images/s of prompt encoding, sampling and decoding in batches of 64, "
                                   f"{torch.get_num_threads()} threads, teacher then student in one process"}
    report["grids"] = save_prompt_sets(ctx.outputs["student_eval"], {
        "teacher": (prompts[: g.grid_images], teacher_images[: g.grid_images]),
        "student": (prompts[: g.grid_images], student_images[: g.grid_images])})
    atomic_write_json(ctx.outputs["student_eval"] / METRICS, report)
    curve = [{"model": "teacher", "nfe": teacher_figures["nfe"], "fid": teacher_figures["fid"]}]
    curve += [{"model": f"student ({card.method})", "nfe": row["nfe"], "fid": row["fid"]} for row in sweep]
    previews = [(tensor_to_image(image), prompt) for image, prompt in zip(student_images[: ctx.params.tracking.contact_sheet], prompts)]
    return StageResult(counts={"samples": len(samples)}, metrics=scalar_figures(report), report=report,
                       samples=previews, plots={"fid_vs_nfe": curve})


# --------------------------------------------------------------------------------------
# The registry entries of this area (pipeline.py lists them)
# --------------------------------------------------------------------------------------

STAGES = (
    Stage(
        name="student",
        func=student,
        area="distill",
        description="Distill the generator into a one- or few-step student (student.method: reflow, "
        "consistency or dmd for a flow generator, mask_distill for a masked one); a generator checkpoint "
        "plus student.json in models/<dataset>/student, sample grid at the student's steps.",
        inputs=("generator", "tokenizer", "tokens", "shards", "captions"),
        outputs=("student",),
        models=("student",),
        code=("generator", "tokenizer", "text"),
        params=("student", "generator"),
        report=True,
        plots=(PlotSpec("fid_along_training", x="step", y="fid",
                        title="The student's FID along training (student.watch: EMA weights, fixed prompts and noise)"),),
        checks=(
            AssetCheck("finite_weights", "student", "every student weight is finite", student_checks.finite_weights),
        ),
    ),
)

# Listed after gen_eval and the probe it reads.
EVAL_STAGES = (
    Stage(
        name="student_eval",
        func=student_eval,
        area="distill",
        description="Score the student with gen_eval's protocol beside its teacher at the sampling it learned: "
        "FID/KID, probe R@1, shapes accuracy, NFE, images/s, fid_ratio and speedup; FID vs the student's steps; "
        "teacher and student grids for the same prompts and seed.",
        inputs=("student", "generator", "tokenizer", "probe", "shards", "captions"),
        outputs=("student_eval",),
        code=("eval", "generator", "tokenizer", "text"),
        params=("student", "generator", "gen_eval"),
        report=True,
        plots=(PlotSpec("fid_vs_nfe", x="nfe", y="fid", title="FID vs network evaluations: teacher and student"),),
    ),
)
