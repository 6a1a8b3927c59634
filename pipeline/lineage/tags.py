"""The tags mergeflow writes on MLflow runs, models and experiments (names only: nothing is imported here)."""

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
# the spec's fields whose password or key was masked before recording (``pipeline.redact``), comma-separated
TAG_REDACTED = "mergeflow.redacted_fields"
