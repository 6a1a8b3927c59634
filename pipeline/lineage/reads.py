"""Reading a tracking store without writing to it: links into the MLflow UI, the runs of cluster jobs, a
workflow's latest run, and what ``mergeflow status`` and ``mergeflow resume`` read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.lineage.tags import TAG_KIND, TAG_MODEL_ID, TAG_WORKFLOW_RUN

# The MLflow 3 UI opens in its GenAI view unless told otherwise (a browser's own choice is kept in
# its local storage); links carry the "Model training" view so they open on runs and models.
UI_VIEW = "workflowType=machine_learning"
DEFAULT_UI_URL = "http://127.0.0.1:5000"


def ui_links(ui_url: str, experiment_id: str, *, run_id: str | None = None, model_id: str | None = None,
             registered_model: str | None = None, version: str | None = None) -> dict[str, str]:
    """Direct links into the MLflow UI served at ``ui_url``.

    Args:
        ui_url: Where the UI is served, e.g. ``http://127.0.0.1:5000``.
        experiment_id: The workflow's experiment.
        run_id: The workflow run.
        model_id: The merged LoggedModel.
        registered_model: The registered model's name (with ``version``).
        version: The registry version.

    Returns:
        Label (``experiment``, ``workflow run``, ``merged model``, ``registered version``) to URL,
        for the parts given.
    """
    from urllib.parse import quote

    root = ui_url.rstrip("/") + "/#"
    links = {"experiment": f"{root}/experiments/{experiment_id}/runs?{UI_VIEW}"}
    if run_id:
        links["workflow run"] = f"{root}/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"
    if model_id:
        links["merged model"] = f"{root}/experiments/{experiment_id}/models/{model_id}?{UI_VIEW}"
    if registered_model and version:
        links["registered version"] = f"{root}/models/{quote(registered_model, safe='')}/versions/{version}?{UI_VIEW}"
    return links


def runs_of_jobs(tracking_uri: str, job_ids: list[str], tag: str = "mergeflow.job_id") -> dict[str, tuple[str, str]]:
    """The top-level MLflow run each Ray job's driver started: job id → (experiment id, run id).

    Reads only; searches every experiment for runs tagged with the job id (a job's workflow or
    recurring run; its child runs carry no job tag). Jobs whose driver has not started a run yet are
    left out.
    """
    from mlflow import MlflowClient

    if not job_ids:
        return {}
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, tuple[str, str]] = {}
    for job in job_ids if experiments else []:  # (MLflow's filter has no IN for tags: one query per job)
        value = job.replace("'", "")
        runs = client.search_runs(experiments, f"tags.`{tag}` = '{value}'", max_results=1,
                                  order_by=["attributes.start_time ASC"])
        if runs:
            found[job] = (runs[0].info.experiment_id, runs[0].info.run_id)
    return found


def latest_workflow(tracking_uri: str, experiment: str, workflow: str, registered_model: str,
                    alias: str) -> dict[str, str | None] | None:
    """The newest finished run of ``workflow`` in ``experiment`` and its merged model, for links.

    Reads only: nothing is created. Returns ``None`` when the experiment or a finished run is
    missing; otherwise ``experiment_id``, ``run_id``, ``model_id`` and ``version`` (the version
    ``alias`` points at, else the newest one the run registered).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'workflow' and attributes.status = 'FINISHED'"
                              f" and attributes.run_name = '{workflow}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    version = model_id = None
    try:
        mv = client.get_model_version_by_alias(registered_model, alias)
        version, model_id = str(mv.version), (mv.tags or {}).get(TAG_MODEL_ID)
    except MlflowException:
        pass
    if model_id is None:  # no alias: the run's own newest merged model
        merges = client.search_runs([exp.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{run_id}' and "
                                    f"tags.`{TAG_KIND}` = 'merge'", order_by=["attributes.start_time DESC"])
        outputs = [o.model_id for r in merges for o in (r.outputs.model_outputs if r.outputs else [])]
        model_id = outputs[0] if outputs else None
    return {"experiment_id": exp.experiment_id, "run_id": run_id, "model_id": model_id, "version": version}


# --- reading a tracking store for `mergeflow status` and `mergeflow resume` (reads only) ----------------


class TrackingStoreError(ValueError):
    """A tracking store, run or artifact that cannot be read, in one line with what to do instead."""


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain data: what ``mergeflow status`` shows and ``mergeflow resume`` checks."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    start_time: int  # milliseconds since the epoch, as MLflow keeps it
    tags: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunTree:
    """A run and every run of the workflow it belongs to, oldest first (``mergeflow status RUN_ID``)."""

    name: str  # the asked run's name
    root_id: str  # its workflow run
    root_status: str
    runs: list[RunRecord]


def _run_record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name, run.info.experiment_id, run.info.status, run.info.start_time,
                     dict(run.data.tags), dict(run.data.metrics))


def _open_tracking_store(tracking_uri: str):
    """An MLflow client on an existing tracking store, and the store's experiments.

    Raises:
        TrackingStoreError: the URI is not one MLflow tracks to, its SQLite file is missing or is not
            a database, or the store does not answer.
    """
    from mlflow import MlflowClient

    from pipeline.spec import check_tracking_uri

    try:
        check_tracking_uri(tracking_uri)
    except ValueError as exc:
        raise TrackingStoreError(f"--tracking-uri: {exc}") from None
    db = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():
        raise TrackingStoreError(f"no tracking database at {tracking_uri}; run a workflow first or pass --tracking-uri")
    if db is not None and db.read_bytes()[:16] != b"SQLite format 3\x00":
        raise TrackingStoreError(f"{db} is not a SQLite database (--tracking-uri {tracking_uri}); pass the file "
                                 "mergeflow run wrote")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        experiments = client.search_experiments()
    except Exception as exc:  # a server that does not answer, a database of another program, ...
        raise TrackingStoreError(f"cannot read the tracking store {tracking_uri}: {type(exc).__name__}: {exc}") from None
    return client, experiments


def _get_run(client, tracking_uri: str, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception:
        raise TrackingStoreError(f"no run {run_id!r} in {tracking_uri}; list the workflow runs with: mergeflow status "
                                 f"--tracking-uri {tracking_uri}") from None


def workflow_runs(tracking_uri: str, experiment: str | None = None, limit: int = 10) -> list[RunRecord]:
    """The newest workflow runs in a tracking store, newest first.

    Args:
        tracking_uri: An existing tracking store.
        experiment: Only this experiment's runs (``None``: every experiment's).
        limit: At most this many.

    Raises:
        TrackingStoreError: the store cannot be read.
    """
    client, experiments = _open_tracking_store(tracking_uri)
    if experiment:
        experiments = [e for e in experiments if e.name == experiment]
    runs = client.search_runs([e.experiment_id for e in experiments], f"tags.`{TAG_KIND}` = 'workflow'",
                              max_results=limit, order_by=["attributes.start_time DESC"])
    return [_run_record(r) for r in runs]


def runs_under(tracking_uri: str, run_id: str) -> RunTree:
    """``run_id``'s name, its workflow run and every run of that workflow (up to 1000, oldest first).

    Raises:
        TrackingStoreError: the store cannot be read or has no run ``run_id``.
    """
    client, _ = _open_tracking_store(tracking_uri)
    asked = _get_run(client, tracking_uri, run_id)
    root = asked.data.tags.get(TAG_WORKFLOW_RUN, run_id)
    runs = client.search_runs([asked.info.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{root}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return RunTree(asked.info.run_name, root, client.get_run(root).info.status, [_run_record(r) for r in runs])


def workflow_root_of(tracking_uri: str, run_id: str) -> RunRecord:
    """The workflow run that ``run_id`` (itself, or any run under it) belongs to.

    Raises:
        TrackingStoreError: the store cannot be read, has no run ``run_id``, or the run is not part
            of a workflow run (a recurring round's, say).
    """
    client, _ = _open_tracking_store(tracking_uri)
    run = _get_run(client, tracking_uri, run_id)
    root = client.get_run(run.data.tags.get(TAG_WORKFLOW_RUN, run_id))
    if root.data.tags.get(TAG_KIND) != "workflow":
        raise TrackingStoreError(f"run {run_id} is not part of a mergeflow workflow run (recurring rounds finish "
                                 "themselves: mergeflow round SPEC)")
    return _run_record(root)


def workflow_spec_of(tracking_uri: str, run_id: str) -> tuple[str, str | None]:
    """The spec a workflow run recorded: its ``workflow.json`` text, and its ``workflow.yaml`` text
    (the spec file as written; ``None`` when the run has none).

    Raises:
        TrackingStoreError: the run has no readable ``workflow.json``.
    """
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="mergeflow-resume-") as tmp:
        try:
            spec_json = Path(client.download_artifacts(run_id, "workflow.json", tmp)).read_text()
        except Exception as exc:
            raise TrackingStoreError(f"run {run_id} has no workflow.json artifact to resume from "
                                     f"({type(exc).__name__}); run its spec again with mergeflow run SPEC") from None
        try:
            spec_text = Path(client.download_artifacts(run_id, "workflow.yaml", tmp)).read_text()
        except Exception:
            spec_text = None
    return spec_json, spec_text
