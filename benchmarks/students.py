"""Distilled students against their teacher: train time, NFE, images/s, FID/KID, probe R@1, shapes accuracy.

For each dataset, two teachers through the real pipeline (by default the cpu profile):

* `flow`:   the flow generator over kl latents (`--flow-set`, default tokenizer.quantizer=kl);
* `masked`: the profile's own generator (the demo's: masked decoding over vq codes).

Each method in `--methods` is the `student` stage in a scratch root of its own, seeded from its
teacher's root (`--set student.method=<m>`), then `student_eval`: gen_eval's protocol (reference
set, probe, shapes checker, seed), the teacher at the sampling the student learned (its steps,
guidance `--guidance`, fixed beforehand: 2 evaluations per step), the student at its steps and at
`student.eval_steps`. The teacher is also scored here at `--teacher-steps` (1, 2, 4, 25) with the
same functions and reference set, so every row of the table shares one protocol.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks students [--root DIR] [--profile cpu]
       [--datasets openmoji,shapes] [--methods reflow,consistency,mask_distill] [--guidance 2.0]
       [--teacher-steps 1,2,4,25] [--flow-set KEY=VALUE ...] [--threads 1] [--set KEY=VALUE ...]
       [--seed-from DIR ...] [--no-seed]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import (
    WORK,
    add_common_arguments,
    bench_params,
    fmt,
    markdown_table,
    prepare_root,
    run_stages,
    seed_sources,
    setup_threads,
    stage_inputs,
    write_json,
)
from tokenline.layout import output_path, report_path

TEACHER_STAGES = ["generator", "gen_eval"]
STUDENT_STAGES = ["student", "student_eval"]
OBJECTIVE_OF = {"reflow": "flow", "consistency": "flow", "dmd": "flow", "mask_distill": "masked"}


def teacher_rows(root: Path, params, dataset: str, steps: list[int]) -> list[dict]:
    """The teacher scored at each step count with student_eval's functions and reference set."""
    from tokenline.distill.evaluation import score
    from tokenline.distill.teacher import load_teacher
    from tokenline.eval.generation import GenerationMetrics
    from tokenline.eval.stages import Subject, reference_samples
    from tokenline.text.captions import cached_text_encoder
    from tokenline.tokenizer.model import Tokenizer1D
    from tokenline.tokenizer.pixels import samples_to_batch

    inputs = stage_inputs(root, dataset, "generator", "tokenizer", "shards", "captions", "probe")
    teacher = load_teacher(inputs["generator"], inputs["tokenizer"], params)
    tokenizer = Tokenizer1D.from_checkpoint(inputs["tokenizer"])
    samples = reference_samples(inputs["shards"], inputs["captions"], params.gen_eval.samples)
    prompts = [s["caption"] for s in samples]
    real = samples_to_batch(samples, tokenizer.config.image_size)
    subject = Subject(teacher.model, tokenizer, cached_text_encoder(root, params), prompts, real, teacher.sampling)
    metrics = GenerationMetrics(real, kid_subset_size=params.gen_eval.kid_subset_size)
    group = min(params.gen_eval.probe_group, len(prompts))
    shapes = params.dataset(dataset).source == "shapes"
    rows = []
    for count in steps:
        figures, _ = score(subject, metrics, replace(teacher.sampling, steps=count), inputs["probe"], group, shapes)
        rows.append({"model": f"teacher, {count} steps", "steps": count, **figures})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def student_row(root: Path, dataset: str, method: str, wall_s: float) -> dict:
    """One method's figures: student_eval's report and the student's training time."""
    report = json.loads(report_path(root, dataset, "student_eval").read_text())
    training = json.loads((output_path(root, dataset, "student") / "training.json").read_text())
    student = json.loads(report_path(root, dataset, "student").read_text())
    return {"model": f"student {method}", **{k: v for k, v in report.items() if not isinstance(v, (dict, list))},
            # train_s leaves out the FID readings along training (student.watch), timed apart as watch_s
            "train_s": training["wall_time_s"] - training.get("watch_s", 0.0), "watch_s": training.get("watch_s"),
            "fid_along_training": training.get("fid_along_training"), "stage_s": wall_s, "sweep": report["sweep"],
            **{k: student[k] for k in ("teacher_straightness", "student_straightness") if k in student}}


def main() -> None:
    """Train each teacher and each student through the pipeline, score them on one protocol, print one table per dataset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "students", "openmoji")
    parser.add_argument("--datasets", default="openmoji,shapes")
    parser.add_argument("--methods", default="reflow,consistency,mask_distill")
    parser.add_argument("--guidance", type=float, default=2.0, help="the teacher's CFG scale the students learn")
    parser.add_argument("--teacher-steps", default="1,2,4,25", help="step counts the teacher is scored at")
    parser.add_argument("--flow-set", action="append", default=None, metavar="KEY=VALUE",
                        help="overrides of the flow teacher's lineage (default: tokenizer.quantizer=kl)")
    args = parser.parse_args()
    setup_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    kinds = {"flow": args.flow_set or ["tokenizer.quantizer=kl"], "masked": []}
    common = [f"student.guidance={args.guidance}", *args.overrides]
    results: dict[str, dict] = {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        rows = []
        for kind, kind_sets in kinds.items():
            kind_methods = [m for m in methods if OBJECTIVE_OF[m] == kind]
            if not kind_methods:
                continue
            teacher_root = args.root / dataset / f"teacher-{kind}"
            prepare_root(teacher_root, seed_sources(args), dataset, TEACHER_STAGES)
            teacher_params = bench_params(teacher_root, args.profile, dataset, [*kind_sets, *common])
            ran = run_stages(teacher_root, teacher_params, dataset, [*TEACHER_STAGES, "probe"])
            print(f"{dataset} {kind} teacher: ran {ran['ran'] or 'nothing'} in {ran['wall_s']:.0f} s", flush=True)
            rows += [{"teacher": kind, **row} for row in teacher_rows(
                teacher_root, teacher_params, dataset, [int(s) for s in args.teacher_steps.split(",") if s])]
            for method in kind_methods:
                root = args.root / dataset / method
                prepare_root(root, [teacher_root], dataset, STUDENT_STAGES)
                params = bench_params(root, args.profile, dataset, [*kind_sets, *common, f"student.method={method}"])
                started = time.perf_counter()
                ran = run_stages(root, params, dataset, STUDENT_STAGES)
                print(f"{dataset} {method}: ran {ran['ran'] or 'nothing'}", flush=True)
                rows.append({"teacher": kind, **student_row(root, dataset, method, time.perf_counter() - started)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("sweep", "fid_along_training")}), flush=True)
                print(f"{method} FID along training: {rows[-1]['fid_along_training']}", flush=True)
        results[dataset] = {"rows": rows}
        write_json(args.root / "students.json", {"profile": args.profile, "guidance": args.guidance,
                                                 "overrides": args.overrides, "datasets": results})
        print(f"\n{dataset} ({args.profile} profile), teacher guidance {args.guidance:g}; FID/KID on "
              f"{teacher_params.gen_eval.samples} generated vs real images; {args.threads} thread(s); "
              f"figures: {args.root / 'students.json'}\n")
        columns = [("model", "model", "s"), ("teacher", "teacher", "s"), ("train s", "train_s", ".0f"),
                   ("NFE", "nfe", "d"), ("images/s", "images_per_s", ".1f"), ("speedup", "speedup", ".1f"),
                   ("FID", "fid", ".1f"), ("FID / teacher", "fid_ratio", ".3f"), ("KID", "kid", ".4f"),
                   ("probe R@1", "probe_r1", ".3f"), ("color", "shapes_color_acc", ".3f"),
                   ("count", "shapes_count_acc", ".3f")]
        print(markdown_table([title for title, _, _ in columns],
                             [[fmt(row.get(key), spec) if row.get(key) is not None else "" for _, key, spec in columns]
                              for row in rows]))


if __name__ == "__main__":
    main()
