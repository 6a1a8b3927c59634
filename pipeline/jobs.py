"""Cluster jobs: submit a workflow to a Ray cluster, list, follow and stop it (Ray Jobs).

The second and last module that imports Ray (``runtime.py`` runs steps; this one talks to the
cluster's job server through ``ray.job_submission.JobSubmissionClient``). The CLI only parses and
prints.

- The submission id is ``mergeflow-<workflow>-<spec hash>``: one spec, one id. While a job with that
  id is PENDING or RUNNING, submitting the same spec again is refused, naming it; once it has
  ended, the next submission gets ``…-2``, ``…-3`` (Ray never reuses a submission id).
- The job's working directory is a copy of the project without stores, virtual environments,
  ``.git``, MLflow files and data, plus the spec; its size is checked against Ray's upload limit
  before anything is sent.
- ``MLFLOW_TRACKING_URI`` and credentials (MLflow, AWS, Google) travel as runtime-env variables,
  never in the entrypoint or the job's metadata, and never as MLflow params.
- Authentication: the client reads Ray's token exactly as the ``ray`` CLI does (``RAY_AUTH_MODE``,
  ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.attempts import ENV_JOB_ID

if TYPE_CHECKING:  # `jobs`, `logs` and `stop` need no spec: importing it would import torch (seconds per call)
    from pipeline.spec import Workflow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never shipped: checkpoints, environments, history, MLflow files, data (the cluster reads data
# and stores from shared or object storage, named in the spec).
EXCLUDES = [".git", ".gitignore", ".venv", "venv", ".env", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info",
            "mlruns", "mlartifacts", "mlflow.db", "*.db", "mergeflow-store", "store", "data", "node_modules",
            "*.safetensors", "*.bin", "*.pt", "*.parquet"]
# Passed to the job's environment when set here; their values are never printed or recorded.
FORWARDED_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS"]
METADATA_KEY = "mergeflow.workflow"
ACTIVE = {"PENDING", "RUNNING"}
AGENT_WAIT_S = 120.0


class JobError(RuntimeError):
    """A job request that cannot be done, with what to do instead (one line)."""


@dataclass
class JobRecord:
    """A mergeflow job as the cluster reports it."""

    job_id: str
    status: str
    workflow: str
    spec_hash: str
    message: str
    start_time: float | None
    end_time: float | None


def upload_limit() -> int:
    """Ray's limit on a runtime-env package (bytes): the GCS's largest gRPC message."""
    try:
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

        return int(GCS_STORAGE_MAX_SIZE)
    except ImportError:  # moved in another Ray version: its documented default
        return 512 * 1024 * 1024


def submission_id(wf: Workflow, verb: str = "run") -> str:
    """The job id of a workflow spec: its name and spec hash (letters, digits, ``-`` and ``_``);
    recurring rounds (``verb`` round) get their own, so a round and a run of one spec never collide."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in wf.name)
    return f"mergeflow-{name}-{'round-' if verb == 'round' else ''}{wf.spec_hash()[:12]}"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, 401/403 without the token, not a job server
        raise JobError(f"--address: cannot reach Ray's job server at {address!r} ({_first_line(exc)}); give the "
                       "dashboard address (http://HEAD:8265) and, with token auth, set RAY_AUTH_MODE=token and "
                       "RAY_AUTH_TOKEN (or ~/.ray/auth_token) as for the ray CLI") from None


def _first_line(exc: BaseException) -> str:
    """One line of an error; for a server's traceback, its last line (the error itself)."""
    lines = [line.strip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    head = lines[0]
    if "Traceback" in head and len(lines) > 1:
        head = head[:head.index("Traceback")] + lines[-1]
    return head[:400]


def _excluded(rel: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in patterns)


def package_project(dest: Path, spec_text: str, project: Path = PROJECT_ROOT, excludes: list[str] | None = None,
                    limit: int | None = None) -> int:
    """Copy the project (without :data:`EXCLUDES`) and the spec into ``dest``; return its size in bytes.

    Raises:
        JobError: above Ray's upload limit, naming the largest files.
    """
    patterns = EXCLUDES + list(excludes or [])
    limit = upload_limit() if limit is None else limit
    files: list[tuple[int, Path]] = []
    for root, dirs, names in os.walk(project):
        rel_root = Path(root).relative_to(project)
        dirs[:] = [d for d in dirs if not _excluded(rel_root / d, patterns)]
        for n in names:
            rel = rel_root / n
            if not _excluded(rel, patterns) and (Path(root) / n).is_file():
                files.append(((Path(root) / n).stat().st_size, rel))
    total = sum(size for size, _ in files) + len(spec_text.encode())
    if total >= limit:
        biggest = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for size, rel in sorted(files, reverse=True)[:3])
        raise JobError(f"working_dir: {project} is {total / 2**20:.1f} MiB after excludes, above Ray's upload limit of "
                       f"{limit / 2**20:.0f} MiB (largest: {biggest}); move large files out of the project or pass "
                       "--exclude PATTERN, and put data and checkpoints on shared or object storage")
    for _, rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, dest / rel)
    (dest / "_mergeflow_job").mkdir(exist_ok=True)
    (dest / "_mergeflow_job" / "workflow.yaml").write_text(spec_text)
    return total


def _records(client) -> list[JobRecord]:
    out = []
    for job in client.list_jobs():
        meta = job.metadata or {}
        if METADATA_KEY not in meta:
            continue
        out.append(JobRecord(job.submission_id or job.job_id or "?", str(job.status.value if hasattr(job.status, "value")
                                                                          else job.status),
                             meta[METADATA_KEY], meta.get("mergeflow.spec_hash", ""), job.message or "",
                             job.start_time / 1000 if job.start_time else None,
                             job.end_time / 1000 if job.end_time else None))
    return sorted(out, key=lambda r: r.start_time or 0, reverse=True)


def submit(wf: Workflow, spec_text: str, address: str, *, excludes: list[str] | None = None,
           entrypoint_num_cpus: float = 0, env: dict[str, str] | None = None, verb: str = "run") -> str:
    """Submit ``wf`` as a Ray job; returns its submission id.

    Args:
        wf: The validated workflow.
        spec_text: The spec file's text (shipped as the job's spec).
        address: The cluster's job server, ``http://HEAD:8265``.
        excludes: More patterns to leave out of the upload.
        entrypoint_num_cpus: CPUs reserved for the driver (0: it only schedules).
        env: Where credentials are read from (default: this process's environment).
        verb: ``run`` (the workflow) or ``round`` (the next recurring round: ``mergeflow round``).

    Raises:
        JobError: the same spec is already PENDING or RUNNING, or the upload is too large.
    """
    if verb not in ("run", "round"):
        raise JobError(f"--verb: {verb!r} is not a verb a job runs; use run or round")
    if verb == "round" and wf.recurring is None:
        raise JobError(f"--verb round: workflow {wf.name!r} has no recurring: section; submit it with --verb run")
    client = _client(address)
    base = submission_id(wf, verb)
    taken = {r.job_id: r for r in _records(client) if r.job_id == base or r.job_id.startswith(base + "-")}
    for r in taken.values():
        if r.status in ACTIVE:
            raise JobError(f"{wf.name}: the same spec (hash {wf.spec_hash()[:12]}) is already {r.status} as job "
                           f"{r.job_id}; follow it with `mergeflow logs {r.job_id} --follow` or stop it with "
                           f"`mergeflow stop {r.job_id}` first")
    job_id, n = base, 1
    while job_id in taken:
        n += 1
        job_id = f"{base}-{n}"
    source = os.environ if env is None else env
    env_vars = {k: source[k] for k in FORWARDED_ENV if source.get(k)}
    env_vars[ENV_JOB_ID] = job_id  # the driver tags its MLflow run with it: `mergeflow jobs` links job → run
    # `stop` sends SIGTERM, then SIGKILL after this long: time for the driver to end its runs KILLED
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = source.get("RAY_JOB_STOP_WAIT_TIME_S", "30")
    tracking = ' --tracking-uri "$MLFLOW_TRACKING_URI"' if "MLFLOW_TRACKING_URI" in env_vars else ""
    # the cluster's `python` first says, in one line, whether it can run mergeflow at all (pipeline.job_python)
    entrypoint = f"python -m pipeline.job_python && python -m pipeline.cli.job_entry {verb} _mergeflow_job/workflow.yaml --address auto{tracking}"
    with tempfile.TemporaryDirectory(prefix="mergeflow-job-") as tmp:
        package_project(Path(tmp), spec_text, excludes=excludes)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, entrypoint_num_cpus=entrypoint_num_cpus,
                    runtime_env={"working_dir": tmp, "env_vars": env_vars},
                    metadata={METADATA_KEY: wf.name, "mergeflow.spec_hash": wf.spec_hash(), "mergeflow.verb": verb})
            except RuntimeError as exc:
                # a head that has just started answers 500 until its job agent is up: wait for it, briefly
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                raise JobError(f"submit: the job server refused {job_id}: {_first_line(exc)}") from None
            except OSError as exc:  # requests' ConnectionError: the head went away mid-request
                raise JobError(f"submit: lost the connection to Ray's job server at {address} ({_first_line(exc)}); "
                               "check that the head is up (`mergeflow jobs --address …`) and submit again") from None


def list_jobs(address: str) -> list[JobRecord]:
    """The cluster's mergeflow jobs, newest first."""
    return _records(_client(address))


def _check_job_id(job_id: str) -> None:
    if not job_id.strip() or "/" in job_id:  # "" would ask Ray's job list endpoint instead of one job
        raise JobError(f"JOB: {job_id!r} is not a job id; `mergeflow jobs --address …` lists them "
                       "(e.g. mergeflow-quickstart-1a2b3c4d5e6f)")


def _status(client, job_id: str) -> str:
    try:
        status = client.get_job_status(job_id)
    except RuntimeError:
        raise JobError(f"JOB: no job {job_id!r} on this cluster; `mergeflow jobs --address …` lists them") from None
    return str(getattr(status, "value", status))


def status(address: str, job_id: str) -> str:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    _check_job_id(job_id)
    return _status(_client(address), job_id)


def logs(address: str, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's driver output: everything so far, or (``follow``) chunks as they come until it ends."""
    import asyncio

    _check_job_id(job_id)
    client = _client(address)
    _status(client, job_id)
    if not follow:
        yield client.get_job_logs(job_id)
        return
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose()) if hasattr(stream, "aclose") else None
        loop.close()


def stop(address: str, job_id: str, wait_s: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> str:
    """Stop a job and wait (up to ``wait_s``) until it has ended; returns its last status."""
    _check_job_id(job_id)
    client = _client(address)
    state = _status(client, job_id)
    if state not in ACTIVE:
        return state
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while (state := _status(client, job_id)) in ACTIVE and time.monotonic() < deadline:
        sleep(0.5)
    return state

