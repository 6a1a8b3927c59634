"""The workflow spec: YAML in, one frozen and fully validated :class:`Workflow` out.

Every rule is checked here, at load time, before Ray starts or a byte is written. An error
names the field path, the value received and what would be valid::

    workflow.yaml: 2 problems
      - merge.method: unknown merge method 'tie' (got 'tie'). Known: linear, task_arithmetic.
      - tasks[1].name: duplicate task name 'sst2' (got 'sst2'). Task names must be unique.

A module per section, each with the rules that tie it to the rest of the workflow (plain
functions ``check_*(wf)``, run by :class:`Workflow` in the order :data:`workflow.WORKFLOW_RULES` gives):

==============  ===============================================  ==========================================
module          spec keys                                        rules across the workflow
==============  ===============================================  ==========================================
``common``      (shared: ``_Frozen``, names, ``SpecError``)      —
``tasks``       ``tasks[]`` (``dataset``, ``template``)          one task type; a base model of that kind
``finetune``    ``finetune`` (``lora``), ``tasks[].finetune``    every task's and round's settings valid
``merge``       ``merge`` (``lora``, ``heads``)                  LoRA adapter out; per-expert parameters;
                                                                 searches, statistics, learned merges
``rounds``      ``rounds``                                       resident workers
``recurring``   ``recurring`` (``schedule``, ``gate``)           gate tasks, classification, element-wise
``resources``   ``resources``                                    —
``evaluation``  ``evaluation``                                   —
``tracking``    ``tracking``, ``store``                          —
``workflow``    the top level: ``name``, ``base_model``, ...     the order of all the rules above
``load``        ``parse_workflow``, ``load_workflow``            (turns errors into one line per problem)
==============  ===============================================  ==========================================

Import from here: ``from pipeline.spec import Workflow, load_workflow``.
"""

from pipeline.spec.common import (
    DEFAULT_BASE_MODEL,
    DEFAULT_STORE,
    DEFAULT_TRACKING_URI,
    IMPLEMENTED_STRATEGIES,
    PACKAGED_CAUSAL_LM,
    PACKAGED_ENCODERS,
    SpecError,
)
from pipeline.spec.evaluation import EvaluationSpec, LmEvalSpec
from pipeline.spec.finetune import FinetuneSpec, LoraSpec
from pipeline.spec.load import load_workflow, parse_workflow
from pipeline.spec.merge import PER_EXPERT_PARAMS, HeadsSpec, LoraMergeSpec, MergeSpec, RecipeSpec
from pipeline.spec.recurring import GateSpec, RecurringSpec, ScheduleSpec, parse_interval
from pipeline.spec.resources import ResourcesSpec
from pipeline.spec.rounds import RoundsSpec
from pipeline.spec.tasks import TASK_TYPES, DatasetSpec, PromptTemplate, TaskSpec
from pipeline.spec.tracking import (
    STORE_SCHEMES,
    TRACKING_SCHEMES,
    StoreSpec,
    TrackingSpec,
    check_store_root,
    check_tracking_uri,
)
from pipeline.spec.workflow import Workflow

__all__ = [
    "DEFAULT_BASE_MODEL", "DEFAULT_STORE", "DEFAULT_TRACKING_URI", "IMPLEMENTED_STRATEGIES", "PACKAGED_CAUSAL_LM",
    "PACKAGED_ENCODERS", "PER_EXPERT_PARAMS", "STORE_SCHEMES", "TASK_TYPES", "TRACKING_SCHEMES", "DatasetSpec", "EvaluationSpec",
    "FinetuneSpec", "GateSpec", "HeadsSpec", "LmEvalSpec", "LoraMergeSpec", "LoraSpec", "MergeSpec", "PromptTemplate", "RecipeSpec",
    "RecurringSpec", "ResourcesSpec", "RoundsSpec", "ScheduleSpec", "SpecError", "StoreSpec", "TaskSpec",
    "TrackingSpec", "Workflow", "check_store_root", "check_tracking_uri", "load_workflow", "parse_interval",
    "parse_workflow",
]
