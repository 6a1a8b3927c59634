"""``tracking`` and ``store``: where lineage goes (MLflow) and where checkpoints go (a folder or any
pyarrow.fs URI), both checked without I/O at load time."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from pipeline.spec.common import DEFAULT_STORE, DEFAULT_TRACKING_URI, _Frozen

# pyarrow.fs.FileSystem.from_uri opens these (mock:// and hf:// too, but one loses data and the
# other is a model hub, so neither is a checkpoint store); anything else fails only at run time.
STORE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# MLflow's tracking-store registry: databases (with an optional +driver), servers, file stores.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks", "databricks-uc")


def check_store_root(v: str) -> str:
    """``store.root``: a local folder, or a URI whose scheme pyarrow.fs opens (checked without I/O)."""
    if not v.strip():
        raise ValueError("store.root is empty; give a folder (e.g. mergeflow-store) or a URI such as s3://bucket/prefix")
    if "://" not in v:
        return v
    scheme, rest = v.split("://", 1)
    if scheme.lower() not in STORE_SCHEMES:
        raise ValueError(f"scheme {scheme + '://'!r} is not a filesystem pyarrow.fs opens (got {v!r}); use a local "
                         f"folder or one of {', '.join(s + '://' for s in STORE_SCHEMES)}")
    if scheme.lower() == "file" and not rest.startswith("/"):
        raise ValueError(f"a file:// URI needs an absolute path, file:///abs/path (got {v!r})")
    if scheme.lower() != "file" and not rest.split("/", 1)[0]:
        raise ValueError(f"{scheme}:// needs a bucket or host after it, e.g. {scheme}://bucket/prefix (got {v!r})")
    return v


def check_tracking_uri(v: str) -> str:
    """``tracking.uri``: a URI MLflow has a tracking store for, or a local folder (checked without I/O)."""
    if not v.strip():
        raise ValueError("tracking.uri is empty; use sqlite:///mlflow.db or http://host:5000")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", v)
    if m is None or len(m.group(1)) == 1:  # no scheme (a single letter is a Windows drive): a local folder
        return v
    scheme = m.group(1).lower()
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ValueError(f"scheme {scheme + ':'!r} is not one MLflow tracks to (got {v!r}); use sqlite:///path.db, "
                         "http(s)://host:port, postgresql://, mysql://, mssql:// or a local folder")
    if scheme == "sqlite" and (not v.startswith("sqlite:///") or len(v) == len("sqlite:///")):
        raise ValueError(f"a SQLite URI is sqlite:/// followed by the file's path, e.g. sqlite:///mlflow.db (got {v!r})")
    if scheme in ("http", "https") and not re.match(r"^https?://[^/:]+", v, re.I):
        raise ValueError(f"an MLflow server URI needs a host, e.g. http://127.0.0.1:5000 (got {v!r})")
    return v


class TrackingSpec(_Frozen):
    """Where lineage goes: an MLflow tracking URI and experiment, and the registered model name."""

    uri: str = Field(
        default=DEFAULT_TRACKING_URI, description="Any MLflow tracking URI: sqlite:///path.db, http(s)://host:port "
        "for a server, postgresql://, mysql://, mssql://, or a local folder."
    )
    experiment: str | None = Field(default=None, description="MLflow experiment; defaults to the workflow name.")
    registered_model: str | None = Field(
        default=None, description="Registry name of the merged models; defaults to '<name>-merged'."
    )
    alias: str = Field(
        default="current", description="Registry alias (letters, digits, '_', '-'), moved to the best merged "
        "version so far (mean held-out accuracy); 'latest' and 'v<N>' are reserved by MLflow."
    )
    log_model_artifacts: bool = Field(
        default=True,
        description="Upload the merged checkpoint as the LoggedModel's artifacts (the registry "
        "version then resolves inside MLflow). When false, the version's source is the store URI.",
    )
    log_expert_artifacts: bool = Field(
        default=False, description="Also upload every expert checkpoint to MLflow (they stay in the store anyway)."
    )
    artifact_location: str | None = Field(
        default=None, description="Artifact root of a new experiment; for SQLite, defaults next to the database."
    )
    retry_seconds: float = Field(
        default=300.0, gt=0, le=86400,
        description="How long each MLflow call waits for an unreachable tracking server (connection refused, 5xx, "
        "429), retrying with backoff, before the workflow stops with a message saying what was not recorded.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_tracking_uri(v)

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if v.lower() == "latest" or v.lower().startswith("v") and v[1:].isdigit():
            raise ValueError(
                f"MLflow reserves the alias {v!r} (it already means the newest version / a version number); "
                "choose another, e.g. 'current' or 'champion'"
            )
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]{0,255}$", v):
            raise ValueError(f"an alias is letters, digits, '_' and '-', starting with a letter (got {v!r})")
        return v


class StoreSpec(_Frozen):
    """The checkpoint store: a local folder or any pyarrow.fs URI."""

    root: str = Field(
        default=DEFAULT_STORE, description="A local folder or a pyarrow.fs URI (s3://bucket/prefix, gs://, hdfs://, "
        "file:///abs/path, ...) holding every checkpoint."
    )

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return check_store_root(v)
