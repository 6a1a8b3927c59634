"""MLflow lineage: the only package that imports MLflow (``make lint`` keeps it so).

Run tree for one workflow::

    <workflow> (parent run: spec, params, summary table, final metrics)
    └── round-0 (child run: one per round; metrics with step=round)
        ├── expert:<task>   (params, per-step train loss, eval on every task, dataset input,
        │                    output LoggedModel)
        ├── baseline        (linear probe of the frozen base, per task)
        └── merge:<method>  (inputs: the experts' LoggedModels; params; eval metrics;
                             output LoggedModel, registered as a model version with an alias)

Every run carries the tag ``mergeflow.workflow_run_id`` (the parent's id), so one search finds the
whole tree. The driver creates runs and registers models; workers log into runs by id, through
the same tracking URI. All calls retry briefly: a SQLite store serialises concurrent writers.

- :mod:`~pipeline.lineage.record`: :class:`Lineage`, what runs, steps and the driver record;
- :mod:`~pipeline.lineage.reads`: reads for the CLI (UI links, status, resume, jobs' runs);
- :mod:`~pipeline.lineage.retry`: how every call waits for a busy or unreachable tracking store;
- :mod:`~pipeline.lineage.tags`: the tag names.
"""

from pipeline.lineage.reads import (
    DEFAULT_UI_URL,
    UI_VIEW,
    RunRecord,
    RunTree,
    TrackingStoreError,
    latest_workflow,
    runs_of_jobs,
    runs_under,
    ui_links,
    workflow_root_of,
    workflow_runs,
    workflow_spec_of,
)
from pipeline.lineage.record import Lineage, default_artifact_location, flatten_params
from pipeline.lineage.retry import DEFAULT_RETRY_SECONDS, TrackingUnavailable
from pipeline.lineage.tags import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    TAG_KIND,
    TAG_MODEL_ID,
    TAG_MODEL_VERSIONS,
    TAG_PARENT,
    TAG_REDACTED,
    TAG_REGISTRATION,
    TAG_ROUND,
    TAG_SPEC_HASH,
    TAG_STORE_URI,
    TAG_TASK,
    TAG_WORKFLOW_RUN,
)

__all__ = [
    "DEFAULT_RETRY_SECONDS", "DEFAULT_UI_URL", "EXPERIMENT_KIND", "TAG_EXPERIMENT_KIND", "TAG_KIND", "TAG_MODEL_ID",
    "TAG_MODEL_VERSIONS", "TAG_PARENT", "TAG_REDACTED", "TAG_REGISTRATION", "TAG_ROUND", "TAG_SPEC_HASH", "TAG_STORE_URI", "TAG_TASK",
    "TAG_WORKFLOW_RUN", "UI_VIEW", "Lineage", "RunRecord", "RunTree", "TrackingStoreError", "TrackingUnavailable",
    "default_artifact_location", "flatten_params", "latest_workflow", "runs_of_jobs", "runs_under", "ui_links",
    "workflow_root_of", "workflow_runs", "workflow_spec_of",
]
