"""Recording lineage: :class:`Lineage`, a thin client over one tracking URI and one experiment (runs,
params, metrics, datasets, LoggedModels, the registry). The driver creates runs and registers models;
workers log into runs by id, through the same tracking URI."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.lineage.retry import DEFAULT_RETRY_SECONDS, _retry, _transient, log
from pipeline.lineage.tags import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    TAG_KIND,
    TAG_MODEL_ID,
    TAG_MODEL_VERSIONS,
    TAG_PARENT,
    TAG_REGISTRATION,
    TAG_STORE_URI,
    TAG_WORKFLOW_RUN,
)
from pipeline.redact import redact_text, redact_values


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store, keep artifacts next to the database file (not in the working directory)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            name = v.get("name", i) if isinstance(v, dict) else i
            _flatten(f"{prefix}.{name}", v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def flatten_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    _flatten(prefix, d, out)
    return {k: redact_text(v)[:6000] for k, v in out.items()}  # a password or key in a URI is never recorded


def _redacted(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as strings, with any password or key in a URI masked (``pipeline.redact``)."""
    return {k: redact_text(str(v)) for k, v in tags.items()}


@dataclass(frozen=True)
class _Target:
    """A tracking URI and how long to wait for it (what ``_retry`` reads before a ``Lineage`` exists)."""

    tracking_uri: str
    retry_seconds: float


class Lineage:
    """A thin client over one tracking URI and one experiment."""

    def __init__(self, tracking_uri: str, experiment_id: str, retry_seconds: float = DEFAULT_RETRY_SECONDS):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.retry_seconds = retry_seconds
        self.busy_seconds = 0.0  # time spent in MLflow calls through this client (retries included)
        self._depth = 0
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- driver side: setup -------------------------------------------------------------------
    @classmethod
    def init(cls, tracking_uri: str, experiment: str, artifact_location: str | None = None,
             retry_seconds: float = DEFAULT_RETRY_SECONDS) -> Lineage:
        """Create the tracking database (once, in the driver) and the experiment if needed.

        Workers must not be the first to touch a fresh SQLite file: concurrent first-time schema
        creation races. Calling this before any task starts avoids that.
        """
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).resolve().parent.mkdir(parents=True, exist_ok=True)
        return cls._init(_Target(tracking_uri, retry_seconds), experiment, artifact_location)

    @staticmethod
    @_retry
    def _init(target: _Target, experiment: str, artifact_location: str | None) -> Lineage:
        from mlflow import MlflowClient

        tracking_uri = target.tracking_uri
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_experiments(max_results=1)  # creates and migrates the schema
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_location or default_artifact_location(tracking_uri, experiment)
            exp_id = client.create_experiment(experiment, artifact_location=location,
                                              tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            if TAG_EXPERIMENT_KIND not in exp.tags:  # made by an older mergeflow; a kind someone chose stays
                client.set_experiment_tag(exp_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return Lineage(tracking_uri, exp_id, target.retry_seconds)

    @_retry
    def start_run(self, name: str, *, kind: str, parent: str | None = None, workflow_run: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
        """Create a run (child of ``parent`` if given) and return its id."""
        all_tags = {TAG_KIND: kind, **_redacted(tags or {})}
        if parent:
            all_tags[TAG_PARENT] = parent
        if workflow_run:
            all_tags[TAG_WORKFLOW_RUN] = workflow_run
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if kind == "workflow":
            self.client.set_tag(run.info.run_id, TAG_WORKFLOW_RUN, run.info.run_id)
        return run.info.run_id

    @_retry
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # --- logging (driver or worker) -----------------------------------------------------------
    @_retry
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    @_retry
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Log ``metrics`` at ``step``; optionally for a LoggedModel and on a dataset.

        Args:
            run_id: The run the metrics belong to.
            metrics: Metric name to value.
            step: The step (the round for evaluation metrics).
            model_id: The LoggedModel the metrics score (its page lists them).
            dataset: ``(name, digest)`` of the dataset input they were computed on (the model's
                page lists it under "Datasets used").
        """
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        name, digest = dataset if dataset else (None, None)
        items = [Metric(k, float(v), ts, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
                 for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=items)

    @_retry
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _redacted(tags).items()])

    @_retry
    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self.client.log_artifact(run_id, str(path))

    @_retry
    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, redact_values(obj), artifact_file)

    @_retry
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, redact_text(text), artifact_file)

    @_retry
    def log_dataset(self, run_id: str, *, name: str, texts: list[str], labels: list[str], source: str,
                    digest: str, context: str) -> None:
        """Record a task's split as a run input (name, source, digest, schema, profile)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        df = pd.DataFrame({"text": texts, "label": labels})
        ds = mlflow.data.from_pandas(df, source=_dataset_source(redact_text(source)), name=name, targets="label", digest=digest)
        entity = DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(run_id, datasets=[entity])

    # --- models -------------------------------------------------------------------------------
    @_retry
    def create_model(self, run_id: str, name: str, *, tags: dict[str, str] | None = None,
                     params: dict[str, Any] | None = None) -> str:
        """Create a LoggedModel (status PENDING) produced by ``run_id``; returns its id."""
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, tags=_redacted(tags) if tags else tags,
            params=flatten_params(params or {}), model_type="mergeflow-checkpoint",
        )
        return model.model_id

    def finalize_model(self, model_id: str, *, run_id: str, step: int, local_dir: str | Path | None = None) -> str:
        """Upload the checkpoint (optional), mark the model READY, record it as the run's output.

        Returns:
            The model's artifact location.
        """
        from mlflow.entities import LoggedModelOutput

        if local_dir is not None:
            self.upload_model_artifacts(model_id, local_dir)
        self._call(self.client.finalize_logged_model, model_id, "READY")
        try:
            self._call(self.client.log_outputs, run_id, [LoggedModelOutput(model_id, step)])
        except Exception as exc:  # a call retried after its connection broke, whose first try had landed
            outputs = self._call(self.client.get_run, run_id).outputs
            if not any(o.model_id == model_id for o in (outputs.model_outputs if outputs else [])):
                raise
            log.info("the run's output %s was recorded by an earlier try (%s)", model_id, str(exc).splitlines()[0])
        return self._call(self.client.get_logged_model, model_id).artifact_location  # waits out an outage too

    @_retry
    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    @_retry
    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The run's metrics, each at its latest value."""
        return dict(self.client.get_run(run_id).data.metrics)

    @_retry
    def fail_pending_models(self, run_id: str) -> int:
        """Mark the LoggedModels ``run_id`` left PENDING as FAILED (an attempt whose worker died); returns how many."""
        from mlflow.entities import LoggedModelStatus

        pending = [m.model_id for m in self.client.search_logged_models([self.experiment_id])
                   if m.source_run_id == run_id and m.status == LoggedModelStatus.PENDING]
        for model_id in pending:
            self.fail_model(model_id)
        return len(pending)

    def fail_model(self, model_id: str) -> None:
        try:
            self._call(self.client.finalize_logged_model, model_id, "FAILED")
        except Exception:  # best effort: we are already handling a failure
            log.warning("could not mark LoggedModel %s FAILED", model_id)

    def upload_model_artifacts(self, model_id: str, local_dir: str | Path) -> None:
        """Upload a checkpoint directory as the LoggedModel's artifacts."""
        self._call(self.client.log_model_artifacts, model_id, str(local_dir))

    @_retry
    def _call(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    @_retry
    def log_model_inputs(self, run_id: str, model_ids: list[str]) -> None:
        from mlflow.entities import LoggedModelInput

        self.client.log_inputs(run_id, models=[LoggedModelInput(m) for m in model_ids])

    # --- registry (driver side) ---------------------------------------------------------------
    def register(self, name: str, *, model_id: str, run_id: str, alias: str | None, source: str | None = None,
                 tags: dict[str, str] | None = None, description: str = "") -> str:
        """Register the LoggedModel ``model_id`` as a new version of ``name`` (see :meth:`_register`); a
        retry after a dropped connection finds the version this call made (by a token tag) instead of
        making a second one."""
        return self._register(name, model_id=model_id, run_id=run_id, alias=alias, source=source, tags=tags,
                              description=description, token=uuid.uuid4().hex)

    @_retry
    def _register(self, name: str, *, model_id: str, run_id: str, alias: str | None, source: str | None,
                  tags: dict[str, str] | None, description: str, token: str) -> str:
        """Register the LoggedModel ``model_id`` as a new version of ``name``; move ``alias`` to it.

        As ``mlflow.register_model("models:/<model_id>", name)`` does, the version's source is the
        LoggedModel and the LoggedModel's ``mlflow.modelVersions`` tag lists the version, so the UI
        links them both ways (the model page shows "Registered" and its versions).

        Args:
            name: The registered model.
            model_id: The LoggedModel to register.
            run_id: The run that made it.
            alias: Alias to point at the new version (``None``: leave the aliases alone).
            source: Where the version's files are when they were not uploaded to the LoggedModel
                (a store URI); default ``models:/<model_id>``.
            tags: Version tags.
            description: Version description.

        Returns:
            The new version number.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="Merged models made by mergeflow.")
        # MLflow's SQL registry resolves a models:/<id> source through the *global* tracking URI
        # a retried call whose version was made before the connection dropped finds it instead of a second one
        version = self.find_version_by_tag.__wrapped__(self, name, TAG_REGISTRATION, token)
        if version is None:
            with _use_tracking_uri(self.tracking_uri):
                version = str(self.client.create_model_version(
                    name, source=redact_text(source) if source else f"models:/{model_id}", run_id=run_id,
                    description=redact_text(description), model_id=model_id,
                    tags={**_redacted(tags or {}), TAG_MODEL_ID: model_id, TAG_REGISTRATION: token},
                ).version)
        listed = self.client.get_logged_model(model_id).tags.get(TAG_MODEL_VERSIONS)
        versions = json.loads(listed) if listed else []
        if {"name": name, "version": version} not in versions:
            versions.append({"name": name, "version": version})
            self.client.set_logged_model_tags(model_id, {TAG_MODEL_VERSIONS: json.dumps(versions)})
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        return version

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points at in ``name`` (``None`` when there is none)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    @_retry
    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    @_retry
    def find_version(self, name: str, model_id: str) -> str | None:
        """The registry version already made for ``model_id`` (so a re-run does not register twice)."""
        # by its tag (set at registration), a query of its own: listing every version each round made the
        # driver's time and memory grow with the registry (benchmarks/soak.py)
        for v in self._versions(name, TAG_MODEL_ID, model_id):
            if getattr(v, "model_id", None) == model_id or (v.tags or {}).get(TAG_MODEL_ID) == model_id:
                return str(v.version)
        return None

    # --- attempts whose driver died (see pipeline.attempts) -------------------------------------
    @_retry
    def running_workflow_runs(self, workflow: str) -> list[tuple[str, dict[str, str]]]:
        """``(run_id, tags)`` of this experiment's workflow runs named ``workflow`` still RUNNING."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_KIND}` = 'workflow' and "
                                       f"attributes.status = 'RUNNING' and attributes.run_name = '{workflow}'")
        return [(r.info.run_id, dict(r.data.tags)) for r in runs]

    @_retry
    def end_attempt(self, workflow_run_id: str, status: str, tags: dict[str, str]) -> tuple[int, int]:
        """End every RUNNING run of one attempt (the workflow run and its descendants) with ``status``
        and ``tags``; mark the LoggedModels they left PENDING as FAILED.

        Returns:
            ``(runs ended, models failed)``.
        """
        from mlflow.entities import LoggedModelStatus

        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{workflow_run_id}' and "
                                       "attributes.status = 'RUNNING'")
        ids = {r.info.run_id for r in runs}
        for run_id in sorted(ids - {workflow_run_id}) + [workflow_run_id] * (workflow_run_id in ids):
            self.set_tags(run_id, tags)
            self.client.set_terminated(run_id, status=status)
        models = 0
        for m in self.client.search_logged_models([self.experiment_id]):
            if m.source_run_id in ids and m.status == LoggedModelStatus.PENDING:
                self.fail_model(m.model_id)
                models += 1
        return len(ids), models

    # --- queries (recurring rounds, history) ------------------------------------------------------
    @_retry
    def find_runs(self, filter_string: str, order_by: list[str] | None = None) -> list[dict[str, Any]]:
        """This experiment's runs matching an MLflow search filter, as plain records
        (``run_id``, ``name``, ``status``, ``start_time``, ``end_time`` in ms, ``tags``, ``metrics``, ``params``)."""
        runs = self.client.search_runs([self.experiment_id], filter_string, order_by=order_by or ["attributes.start_time ASC"],
                                       max_results=5000)
        return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                 "start_time": r.info.start_time, "end_time": r.info.end_time, "tags": dict(r.data.tags),
                 "metrics": dict(r.data.metrics), "params": dict(r.data.params)} for r in runs]

    @_retry
    def set_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, redact_text(str(v)))

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, version).tags or {})

    @_retry
    def find_version_by_tag(self, name: str, tag: str, value: str) -> str | None:
        """The newest registry version of ``name`` whose tag ``tag`` is ``value`` (``None``: none)."""
        value = redact_text(value)
        found = [int(v.version) for v in self._versions(name, tag, value) if (v.tags or {}).get(tag) == value]
        return str(max(found)) if found else None

    @_retry
    def store_uris_of_versions(self) -> dict[str, list[str]]:
        """Store URI -> every registry version (``name vN``, of any registered model) that points at it (its
        ``mergeflow.store_uri`` tag, or a source outside MLflow): what ``mergeflow gc`` must never remove."""
        out: dict[str, list[str]] = {}
        token = None
        while True:
            page = self.client.search_model_versions(max_results=1000, page_token=token)
            for v in page:
                uri = (v.tags or {}).get(TAG_STORE_URI)
                if not uri and v.source and not v.source.startswith(("models:/", "runs:/", "mlflow-artifacts:")):
                    uri = v.source
                if uri:
                    out.setdefault(uri, []).append(f"{v.name} v{v.version}")
            token = page.token
            if not token:
                return out

    @_retry
    def experiment_exists(self, name: str) -> bool:
        return self.client.get_experiment_by_name(name) is not None

    def _versions(self, name: str, tag: str | None = None, value: str | None = None) -> list:
        """The versions of the registered model ``name`` (none when it does not exist); with ``tag``, those
        whose tag is ``value`` (the registry filters them; every version where ``value`` cannot be quoted)."""
        from mlflow.exceptions import MlflowException

        query = f"name = '{name}'"
        if tag is not None and value is not None and "'" not in value and "`" not in tag:
            query += f" and tags.`{tag}` = '{value}'"
        try:
            return self.client.search_model_versions(query)
        except MlflowException as exc:
            if _transient(exc):  # the server is away: waited for by _retry, never taken for "no version"
                raise
            return []

    @_retry
    def model_artifact_location(self, model_id: str) -> str:
        return self.client.get_logged_model(model_id).artifact_location


def _use_tracking_uri(uri: str):
    """Temporarily make ``uri`` MLflow's global tracking URI (restored afterwards)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri as use

    return use(uri)


def _dataset_source(source: str):
    """An MLflow DatasetSource for a path/URI, or a code-ish source for packaged data."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from operators.packaged_data import PACKAGED_PREFIX

    if source.startswith(PACKAGED_PREFIX) or "|" in source:
        return CodeDatasetSource(tags={"source": source})
    try:
        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.simplefilter("ignore")
            return resolve_dataset_source(source)
    except Exception:
        return CodeDatasetSource(tags={"source": source})
