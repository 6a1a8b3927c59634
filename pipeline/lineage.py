"""MLflow lineage: the only module that imports MLflow.

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
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TAG_WORKFLOW_RUN = "mergeflow.workflow_run_id"
TAG_KIND = "mergeflow.kind"
TAG_ROUND = "mergeflow.round"
TAG_TASK = "mergeflow.task"
TAG_STORE_URI = "mergeflow.store_uri"
TAG_SPEC_HASH = "mergeflow.spec_hash"
TAG_PARENT = "mlflow.parentRunId"
TAG_MODEL_ID = "mergeflow.model_id"
TAG_REGISTRATION = "mergeflow.registration"  # one token per register() call: its retries find what it made
# The MLflow 3 UI's experiment kind: "custom_model_development" is what its own kind selector
# writes for "Machine learning" (training runs first, not the GenAI traces overview).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The LoggedModel tag the UI reads to show "Registered" and the model's versions (a JSON list of
# {name, version}); mlflow.register_model() writes it the same way.
TAG_MODEL_VERSIONS = "mlflow.modelVersions"

log = logging.getLogger("mergeflow.lineage")


DEFAULT_RETRY_SECONDS = 300.0  # how long a call waits for an unreachable tracking server (tracking.retry_seconds)
# MLflow's own HTTP client retries a refused connection 7 times over about 4 minutes *inside* one call;
# mergeflow retries around the call instead (bounded by tracking.retry_seconds, with a message that
# says what was not recorded), so each call gives up sooner. Set the variable yourself to override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

# an unreachable or overloaded server (connection refused or reset, 5xx, 429): worth waiting for
_TRANSIENT = ("connection refused", "max retries exceeded", "failed to establish a new connection",
              "connection reset", "connection aborted", "remote end closed connection", "read timed out",
              "temporarily unavailable", "too many 500", "too many 502", "too many 503", "too many 504",
              "too many 429", "error code 500", "error code 502", "error code 503", "error code 504",
              "error code 429", "bad gateway", "service unavailable", "gateway timeout")
_LOCKED = ("locked", "busy", "timeout")  # SQLite under contention
_down_since: list = []  # [when, message] of the last call that gave up on the server (see _retry)
_FAIL_FAST_S = 30.0  # for this long after a call gave up, calls fail without trying: the run is ending anyway


def _transient(exc: BaseException) -> bool:
    return any(t in str(exc).lower() for t in _TRANSIENT)


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within ``tracking.retry_seconds``; says what was not recorded."""


def _what(fn: Callable, args: tuple) -> str:
    """``log_metrics (run 1a2b…)``: the call that was not recorded, for messages."""
    if fn.__name__ == "_call" and len(args) > 1:  # Lineage._call(client_method, *its_args)
        fn, args = args[1], (None, *args[2:])
    ids = [a for a in args[1:3] if isinstance(a, str) and len(a) >= 16 and a.replace("-", "").isalnum()]
    return fn.__name__.lstrip("_") + (f" (run or model {ids[0]})" if ids else "")


def _retry(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry an MLflow call: SQLite answers 'database is locked' under contention (a few quick tries), and
    an unreachable server is waited for with backoff (capped at 5 s between tries, so its return is
    noticed at once) for ``retry_seconds`` of the ``Lineage`` in ``args[0]``; past that,
    :class:`TrackingUnavailable` names what was not recorded. For 30 s after a call has given up, calls
    in this process fail at once without trying (a failing workflow does not wait again for every run it
    tries to close); after that they try again."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        delay, start, locked_tries, warned = 0.2, time.monotonic(), 0, False
        if _down_since and time.time() - _down_since[0] < _FAIL_FAST_S:
            raise TrackingUnavailable(_down_since[1])  # the first give-up's message: what failed first, what to do
        while True:
            try:
                out = fn(*args, **kwargs)
                _down_since.clear()
                return out
            except TrackingUnavailable:
                raise
            except Exception as exc:  # MlflowException wraps sqlite's OperationalError and requests' errors
                text = str(exc).lower()
                if _transient(exc):
                    bound = getattr(args[0], "retry_seconds", DEFAULT_RETRY_SECONDS) if args else DEFAULT_RETRY_SECONDS
                    uri = getattr(args[0], "tracking_uri", None) or (args[1] if len(args) > 1 else "?")
                    waited = time.monotonic() - start
                    if waited >= bound:
                        gave_up = TrackingUnavailable(
                            f"the MLflow tracking server {uri} did not answer for {waited:.0f} s "
                            f"({str(exc).splitlines()[0][:300]}); {_what(fn, args)} was not recorded. The workflow "
                            "stops here and every step already finished is kept in the store: once the server is "
                            "back, run the workflow again (or `mergeflow resume RUN`); it closes this attempt's "
                            "runs left RUNNING as KILLED and goes on from the store. To wait longer, raise "
                            "tracking.retry_seconds.")
                        _down_since[:] = [time.time(), str(gave_up)]
                        raise gave_up from exc
                    if not warned:
                        log.warning("MLflow tracking server %s unreachable (%s); retrying for up to %.0f s",
                                    uri, str(exc).splitlines()[0][:200], bound)
                        warned = True
                    time.sleep(min(delay * (1 + random.random()), 5.0, max(0.0, bound - waited)))
                    delay = min(delay * 2, 5.0)
                    continue
                locked_tries += 1
                if locked_tries >= 8 or not any(t in text for t in _LOCKED):
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 3.0)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        client = args[0] if args and isinstance(args[0], Lineage) else None
        if client is None or client._depth:  # not a client's call, or one inside another (counted there)
            return wrapper(*args, **kwargs)
        t0, client._depth = time.perf_counter(), 1
        try:
            return wrapper(*args, **kwargs)
        finally:  # what recording cost this client (steps report it as their `log` time)
            client._depth = 0
            client.busy_seconds += time.perf_counter() - t0

    return timed


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
    return {k: v[:6000] for k, v in out.items()}


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
        all_tags = {TAG_KIND: kind, **(tags or {})}
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

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_retry
    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self.client.log_artifact(run_id, str(path))

    @_retry
    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    @_retry
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    @_retry
    def log_dataset(self, run_id: str, *, name: str, texts: list[str], labels: list[str], source: str,
                    digest: str, context: str) -> None:
        """Record a task's split as a run input (name, source, digest, schema, profile)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        df = pd.DataFrame({"text": texts, "label": labels})
        ds = mlflow.data.from_pandas(df, source=_dataset_source(source), name=name, targets="label", digest=digest)
        entity = DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(run_id, datasets=[entity])

    # --- models -------------------------------------------------------------------------------
    @_retry
    def create_model(self, run_id: str, name: str, *, tags: dict[str, str] | None = None,
                     params: dict[str, Any] | None = None) -> str:
        """Create a LoggedModel (status PENDING) produced by ``run_id``; returns its id."""
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, tags=tags,
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
        self._call(self.client.log_outputs, run_id, [LoggedModelOutput(model_id, step)])
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
                    name, source=source or f"models:/{model_id}", run_id=run_id, description=description,
                    tags={**(tags or {}), TAG_MODEL_ID: model_id, TAG_REGISTRATION: token}, model_id=model_id,
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
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException as exc:
            if _transient(exc):  # the server is away: waited for by _retry, never taken for "no version"
                raise
            return None
        for v in versions:
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
            self.client.set_model_version_tag(name, version, k, str(v))

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, version).tags or {})

    @_retry
    def find_version_by_tag(self, name: str, tag: str, value: str) -> str | None:
        """The newest registry version of ``name`` whose tag ``tag`` is ``value`` (``None``: none)."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException as exc:
            if _transient(exc):  # the server is away: waited for by _retry, never taken for "no version"
                raise
            return None
        found = [int(v.version) for v in versions if (v.tags or {}).get(tag) == value]
        return str(max(found)) if found else None

    @_retry
    def model_artifact_location(self, model_id: str) -> str:
        return self.client.get_logged_model(model_id).artifact_location


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
