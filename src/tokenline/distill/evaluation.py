"""student_eval: a student scored with gen_eval's protocol beside its teacher, and what its speed buys.

Same reference set, probe, shapes checker and seed as gen_eval. The teacher is generated here
too, at the sampling the student learned (the card's `teacher_sampling`, e.g. 25 Euler steps with
guidance: 50 network evaluations), so `speedup` compares two timings taken in one process on one
machine state, and `fid_ratio` two FIDs on one reference set.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from tokenline.eval.generation import GenerationMetrics
from tokenline.eval.stages import Subject, probe_alignment, shapes_accuracy
from tokenline.generator.generate import SamplingOptions

# Figures of the teacher repeated in the student's report with a `teacher_` prefix.
TEACHER_FIGURES = ("fid", "kid", "probe_r1", "nfe", "images_per_s", "shapes_color_acc", "shapes_count_acc")


def score(subject: Subject, metrics: GenerationMetrics, options: SamplingOptions, probe_dir, group: int,
          shapes: bool) -> tuple[dict[str, Any], Tensor]:
    """FID/KID, probe, shapes (when `shapes`), NFE and speed of one model at one sampling setup; and its images."""
    images, ms, nfe = subject.generate(options)
    figures = {**metrics.score(images), "nfe": nfe, "ms_per_image": ms, "images_per_s": 1000.0 / ms if ms else None}
    figures |= probe_alignment(subject, images, probe_dir, group)[0]
    if shapes:
        figures |= {k: v for k, v in shapes_accuracy(images, subject.prompts).items() if k.endswith("_acc")}
    return figures, images


def compare(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """The student's figures with the teacher's beside them (`teacher_*`), `fid_ratio` and `speedup`."""
    beside = {f"teacher_{key}": teacher[key] for key in TEACHER_FIGURES if key in teacher}
    ratio = student["fid"] / teacher["fid"] if teacher.get("fid") else None
    speedup = student["images_per_s"] / teacher["images_per_s"] if teacher.get("images_per_s") else None
    return {**student, **beside, "fid_ratio": ratio, "speedup": speedup}


def steps_sweep(subject: Subject, metrics: GenerationMetrics, base: SamplingOptions, steps: list[int],
                measured: dict[str, Any]) -> list[dict]:
    """FID, NFE and ms/image of the student at each step count; `measured` (the figures at `base`) is reused, not resampled."""
    rows = []
    for count in steps:
        if count == base.steps:
            rows.append({"steps": count, **{key: measured[key] for key in ("nfe", "fid", "ms_per_image")}})
            continue
        images, ms, nfe = subject.generate(replace(base, steps=count))
        rows.append({"steps": count, "nfe": nfe, "fid": metrics.score(images)["fid"], "ms_per_image": ms})
    return rows
