"""The teacher of a student: the trained generator, frozen, with the sampling the student learns from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from tokenline.artifacts import read_manifest
from tokenline.config import Params
from tokenline.generator.checkpoint import PairingError, check_pairing, load_generator
from tokenline.generator.generate import SamplingOptions
from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch
from tokenline.generator.samplers import VelocityFn, guided_velocity
from tokenline.generator.spec import objective_for

# Which methods distill which generator objective; `auto` takes the first.
METHODS_BY_OBJECTIVE = {"flow": ("reflow", "consistency", "dmd"), "masked": ("mask_distill",)}


@dataclass
class Teacher:
    """A frozen teacher generator, its folder and content hash, the sampling its targets come from, the method distilling it."""

    model: FlowTransformer | MaskedTransformer
    folder: Path
    content_hash: str
    sampling: SamplingOptions
    method: str  # student.method resolved for this teacher's objective

    def velocity(self, text: TextBatch, drop: Tensor | None = None) -> VelocityFn:
        """The teacher's velocity for these captions with the guidance its students learn (CFG as at sampling)."""
        return guided_velocity(lambda x, t: self.model(x, t, text, drop), lambda x, t: self.model(x, t, None),
                               self.sampling.guidance)


def teacher_sampling(params: Params) -> SamplingOptions:
    """The teacher's sampling for pairs and targets: generator.sample, with student.teacher_steps and student.guidance."""
    values = params.generator.sample.model_dump()
    student = params.student
    if student.teacher_steps is not None:
        values["steps"] = student.teacher_steps
    if student.guidance is not None:
        values["guidance"] = student.guidance
    return SamplingOptions(**values)


def resolve_method(method: str, objective: str, teacher: str) -> str:
    """The method that distills a generator of `objective` (`auto`: its default); ValueError naming the teacher otherwise."""
    choices = METHODS_BY_OBJECTIVE[objective]
    if method == "auto":
        return choices[0]
    if method not in choices:
        raise ValueError(f"student.method {method!r} cannot distill the {objective} generator {teacher}; "
                         f"for a {objective} generator use one of: auto, {', '.join(choices)}")
    return method


def load_teacher(generator_dir: Path, tokenizer_dir: Path, params: Params) -> Teacher:
    """The teacher in `generator_dir`, checked against the tokenizer it decodes with and the method; frozen, eval mode."""
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    check_pairing(generator_dir, tokenizer_dir, tokenizer_hash)
    model = load_generator(generator_dir)
    if model.config.tokenizer_hash != tokenizer_hash:
        # gen_eval only warns (the shapes fit); a student learns the teacher's tokens, so another tokenizer's are refused.
        raise PairingError(f"generator {generator_dir} was trained on tokenizer {model.config.tokenizer_hash}, not on "
                           f"{tokenizer_dir} ({tokenizer_hash}): a student distils a teacher with its own tokenizer")
    method = resolve_method(params.student.method, model.config.objective, str(generator_dir))
    model.requires_grad_(False)
    model.eval()
    return Teacher(model, Path(generator_dir), read_manifest(generator_dir)["content_hash"], teacher_sampling(params),
                   method)


def student_from_teacher(teacher: Teacher) -> FlowTransformer | MaskedTransformer:
    """A trainable copy of the teacher's weights: every student method starts from them."""
    model = load_generator(teacher.folder)
    model.requires_grad_(True)
    return model



def check_student_params(params: Params) -> None:
    """ValueError unless student.method distills the generator params describe (checked before any stage runs)."""
    objective = objective_for(params, params.tokenizer.quantizer)
    resolve_method(params.student.method, objective, f"that generator.objective {params.generator.objective!r} "
                   f"and tokenizer.quantizer {params.tokenizer.quantizer!r} train")
