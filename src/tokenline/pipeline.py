"""THE stage registry: the list of stages. The CLI, dvc.yaml and the Dagster assets are all built from STAGES.

Each area declares its `Stage(...)` entries beside its stage functions; adding a stage is that
entry plus, for a new area, one line below. The order is the lineage's (topological) order.
"""

from __future__ import annotations

from tokenline.data import stages as data_stages
from tokenline.distill import stages as distill_stages
from tokenline.eval import stages as eval_stages
from tokenline.export import stages as export_stages
from tokenline.generator import stages as generator_stages
from tokenline.layout import MODEL_OUTPUTS
from tokenline.stage import ALWAYS_PARAMS, Stage
from tokenline.tokenizer import stages as tokenizer_stages

STAGES: list[Stage] = [
    *data_stages.STAGES,
    *tokenizer_stages.STAGES,
    *eval_stages.TOKENIZER_EVAL_STAGES,
    *generator_stages.STAGES,
    *distill_stages.STAGES,
    *eval_stages.STAGES,
    *distill_stages.EVAL_STAGES,
    *eval_stages.REPORT_STAGES,
    *export_stages.STAGES,
]

STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
PRODUCER = {output: stage for stage in STAGES for output in stage.outputs}


def _check_registry() -> None:
    # A dataset-scope stage reads one dataset's folders, so it cannot consume a project output.
    for stage in STAGES:
        for name in stage.inputs:
            if stage.per_dataset and not PRODUCER[name].per_dataset:
                raise ValueError(f"stage {stage.name!r} runs per dataset but reads the project output {name!r}")
    declared = {output for stage in STAGES for output in stage.models}
    if declared != MODEL_OUTPUTS:
        raise ValueError(f"the stages' model outputs {sorted(declared)} differ from layout.MODEL_OUTPUTS {sorted(MODEL_OUTPUTS)}")


_check_registry()


def get_stage(name: str) -> Stage:
    """The registered stage `name`, or an error listing the known stages."""
    if name not in STAGE_BY_NAME:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_BY_NAME)}")
    return STAGE_BY_NAME[name]


def upstream_stages(stage: Stage) -> list[Stage]:
    """The stages producing `stage`'s inputs, directly."""
    return list(dict.fromkeys(PRODUCER[name] for name in stage.inputs))


def stage_closure(stage: Stage) -> list[Stage]:
    """`stage` and everything upstream of it, in registry (topological) order."""
    needed = {stage.name}
    frontier = [stage]
    while frontier:
        for parent in upstream_stages(frontier.pop()):
            if parent.name not in needed:
                needed.add(parent.name)
                frontier.append(parent)
    return [s for s in STAGES if s.name in needed]


def params_keys(stage: Stage) -> list[str]:
    """Every top-level params key a stage depends on."""
    return list(dict.fromkeys((*ALWAYS_PARAMS, *stage.params)))
