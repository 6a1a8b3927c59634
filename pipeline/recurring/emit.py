"""Manifests for running recurring rounds under a cluster scheduler (no home-made daemon on a cluster).

``mergeflow schedule SPEC --emit kubernetes --out DIR`` writes what ``render_kubernetes`` returns:

- ``cronjob.yaml``: a Kubernetes ``batch/v1`` CronJob with ``concurrencyPolicy: Forbid``. Its pod
  runs ``mergeflow submit SPEC --verb round --wait --address RAY``: the round runs as a Ray job on
  an existing RayCluster and the pod lives exactly as long as that job, so Kubernetes never starts
  a round while the previous one is still running (``--wait`` is what makes ``Forbid`` mean it).
  MLflow and storage credentials come from a Secret (``envFrom``), never from the manifest.
- ``raycronjob.yaml``: the KubeRay alternative, a ``ray.io/v1`` RayCronJob (alpha since KubeRay
  1.6, off unless the operator runs with ``--feature-gates=RayCronJob=true``; ``timeZone`` needs
  1.7). Each tick it creates a RayJob whose entrypoint is ``mergeflow round SPEC``, submitted to
  the same RayCluster (``clusterSelector``). KubeRay 1.7 has no ``concurrencyPolicy`` for it:
  overlapping rounds are kept apart only by the round itself being idempotent.

Imports only the standard library and PyYAML: rendering needs neither Ray nor MLflow.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from urllib.parse import urlsplit

import yaml

# Kubernetes limits a CronJob's name to 52 characters (its Jobs append an 11-character suffix).
CRONJOB_NAME_MAX = 52
# KubeRay 1.7 limits a RayCronJob's name to 36 characters (utils.MaxRayCronJobNameLength: the
# child RayJob appends "-<unix minute>" and its RayCluster name must stay within 53).
RAYCRONJOB_NAME_MAX = 36
LABEL_VALUE_MAX = 63
# The RayJob clusterSelector key naming the RayCluster to submit to (KubeRay utils.RayJobClusterSelectorKey).
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
# KubeRay names a RayCluster's head Service "<cluster>-head-svc".
HEAD_SERVICE_SUFFIX = "-head-svc"
CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
STARTING_DEADLINE_S = 3600  # a tick missed by up to an hour (controller down, API busy) still runs
HISTORY_LIMIT = 3
BACKOFF_LIMIT = 1  # one retry of the submitting pod; a second submission of a running round is refused


def interval_to_cron(seconds: int) -> str:
    """An interval as the cron expression that fires at exactly that interval.

    Cron can say "every N minutes" only for N dividing 60, "every N hours" only for N dividing 24,
    and daily or weekly; other intervals drift at the hour or day boundary, so they are refused.

    Args:
        seconds: The interval between rounds.

    Returns:
        A five-field cron expression, e.g. ``"*/15 * * * *"`` for 900.

    Raises:
        ValueError: The interval has no exact cron expression; the message names it and says to
            give the schedule as a cron expression instead.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        raise ValueError(f"interval must be a positive number of seconds (got {seconds!r})")
    minutes, rest = divmod(seconds, 60)
    if rest == 0:
        if minutes == 1:
            return "* * * * *"
        if minutes < 60 and 60 % minutes == 0:
            return f"*/{minutes} * * * *"
        hours, rest = divmod(minutes, 60)
        if rest == 0:
            if hours == 1:
                return "0 * * * *"
            if hours < 24 and 24 % hours == 0:
                return f"0 */{hours} * * *"
            if hours == 24:
                return "0 0 * * *"
            if hours == 24 * 7:
                return "0 0 * * 0"
    raise ValueError(
        f"an interval of {seconds} s has no exact cron expression (cron can run every N minutes "
        f"with N dividing 60, every N hours with N dividing 24, daily or weekly); give the schedule "
        f"as a cron expression instead (e.g. '*/5 * * * *' or '0 2 * * *')")


def render_kubernetes(*, name: str, spec_path: str, cron: str, timezone: str = "UTC",
                      image: str = "mergeflow:latest", ray_address: str = "http://raycluster-head-svc:8265",
                      namespace: str | None = None, tracking_secret: str | None = "mergeflow-tracking",
                      ) -> dict[str, str]:
    """Manifests for running ``mergeflow round`` on a schedule on Kubernetes.

    Args:
        name: The workflow's name; the manifests' names are derived from it (lowercased, invalid
            characters replaced, shortened with a hash suffix when too long).
        spec_path: The spec as the image sees it (relative paths resolve in the image's working
            directory, ``/opt/mergeflow`` in ``infra/docker/Dockerfile``).
        cron: Five-field cron expression (or a macro such as ``@daily``), in ``timezone``.
        timezone: IANA time zone of the schedule.
        image: The mergeflow image the CronJob's pod runs.
        ray_address: The RayCluster's job server, ``http://<cluster>-head-svc[.<namespace>.svc…]:8265``;
            the RayCronJob selects the cluster by the name in it.
        namespace: Namespace of both objects; omitted: the one ``kubectl apply`` uses.
        tracking_secret: Secret whose keys (``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``, …)
            become the pod's environment; ``None``: no Secret.

    Returns:
        File name -> YAML text: ``"cronjob.yaml"`` (batch/v1 CronJob) and ``"raycronjob.yaml"``
        (KubeRay RayCronJob).

    Raises:
        ValueError: The cron expression, time zone or Ray address cannot be used (the message says
            what to give instead).
    """
    _check_cron(cron)
    if not timezone or timezone != timezone.strip() or " " in timezone:
        raise ValueError(f"timezone must be an IANA time zone name such as 'UTC' or 'Europe/Berlin' (got {timezone!r})")
    cluster = ray_cluster_name(ray_address)
    labels = {"app.kubernetes.io/name": "mergeflow", "mergeflow.workflow": _label_value(name)}
    rendered = (f"# Rendered by: mergeflow schedule {shlex.quote(spec_path)} --emit kubernetes --out DIR\n"
                "# (change the spec and render again rather than editing this file)\n")
    needs = f"the RayCluster behind {ray_address}" + (f" and the Secret {tracking_secret}" if tracking_secret else "")
    return {
        "cronjob.yaml": _dump(_cronjob(name, spec_path, cron, timezone, image, ray_address, namespace,
                                       tracking_secret, labels),
                              rendered + "# batch/v1 CronJob (Kubernetes >= 1.27 for timeZone).\n"
                              f"# Needs {needs} (see infra/k8s/recurring/README.md).\n"),
        "raycronjob.yaml": _dump(_raycronjob(name, spec_path, cron, timezone, cluster, namespace, labels),
                                 rendered +
                                 "# KubeRay RayCronJob: ALPHA. Needs KubeRay >= 1.7 (1.6 has RayCronJob but not timeZone)\n"
                                 "# with the operator started with --feature-gates=RayCronJob=true (off by default).\n"
                                 "# KubeRay has no concurrencyPolicy for RayCronJob: it does not stop a round from\n"
                                 "# starting while the previous one still runs. Prefer cronjob.yaml where that matters.\n"),
    }


def ray_cluster_name(ray_address: str) -> str:
    """The RayCluster behind a KubeRay head-service address (``http://NAME-head-svc…:8265`` -> ``NAME``)."""
    host = urlsplit(ray_address if "://" in ray_address else f"http://{ray_address}").hostname or ""
    service = host.split(".", 1)[0]
    if not service.endswith(HEAD_SERVICE_SUFFIX) or service == HEAD_SERVICE_SUFFIX.lstrip("-"):
        raise ValueError(
            f"cannot tell the RayCluster from the Ray address {ray_address!r}: on Kubernetes give the "
            f"KubeRay head service, http://<raycluster>{HEAD_SERVICE_SUFFIX}[.<namespace>.svc]:8265 "
            f"(the RayCronJob selects its cluster by that name)")
    return service[: -len(HEAD_SERVICE_SUFFIX)]


def dns_name(prefix: str, name: str, max_len: int) -> str:
    """``prefix + name`` as a DNS-1123 label of at most ``max_len`` characters.

    Lowercased; characters other than ``a-z0-9-`` become ``-``; runs of ``-`` collapse; when too
    long it is cut and ends in 6 hex digits of the name's hash, so distinct names stay distinct.
    """
    body = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{prefix}{name}".lower())).strip("-")
    if len(body) <= max_len:
        return body
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{body[: max_len - 7].rstrip('-')}-{digest}"


def _label_value(name: str) -> str:
    """A label value for the workflow name: ``[A-Za-z0-9_.-]``, alphanumeric at both ends, <= 63."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:LABEL_VALUE_MAX]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def _check_cron(cron: str) -> None:
    if "TZ" in cron:
        raise ValueError(f"schedule {cron!r}: give the time zone as timezone, not as TZ= or CRON_TZ= in the cron expression")
    if cron.strip() not in CRON_MACROS and len(cron.split()) != 5:
        raise ValueError(f"schedule {cron!r} is not a five-field cron expression (minute hour day-of-month "
                         f"month day-of-week, e.g. '0 2 * * *') nor one of {', '.join(sorted(CRON_MACROS))}")


def _cronjob(name: str, spec_path: str, cron: str, timezone: str, image: str, ray_address: str,
             namespace: str | None, tracking_secret: str | None, labels: dict[str, str]) -> dict:
    container: dict = {
        "name": "round",
        "image": image,
        "command": ["mergeflow", "submit", spec_path, "--verb", "round", "--wait", "--address", ray_address],
        # the pod only submits the round and follows it; the work runs on the RayCluster
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
    }
    if tracking_secret:
        container["envFrom"] = [{"secretRef": {"name": tracking_secret}}]
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(dns_name("mergeflow-round-", name, CRONJOB_NAME_MAX), namespace, labels),
        "spec": {
            "schedule": cron,
            "timeZone": timezone,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_S,
            "successfulJobsHistoryLimit": HISTORY_LIMIT,
            "failedJobsHistoryLimit": HISTORY_LIMIT,
            "jobTemplate": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "backoffLimit": BACKOFF_LIMIT,
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {"restartPolicy": "Never", "containers": [container]},
                    },
                },
            },
        },
    }


def _raycronjob(name: str, spec_path: str, cron: str, timezone: str, cluster: str,
                namespace: str | None, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": _metadata(dns_name("mergeflow-round-", name, RAYCRONJOB_NAME_MAX), namespace, labels),
        "spec": {
            "schedule": cron,
            "timeZone": timezone,
            "jobTemplate": {
                "entrypoint": f"mergeflow round {shlex.quote(spec_path)}",
                # submit to the long-lived RayCluster (the one the CronJob uses) rather than create
                # one per round; KubeRay forbids backoffLimit > 0 and suspend in this mode
                "clusterSelector": {CLUSTER_SELECTOR_KEY: cluster},
                "submissionMode": "K8sJobMode",
                # Ray job metadata: `mergeflow jobs` lists the rounds with the other mergeflow jobs
                "metadata": {"mergeflow.workflow": name},
            },
        },
    }


def _metadata(object_name: str, namespace: str | None, labels: dict[str, str]) -> dict:
    meta: dict = {"name": object_name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    return meta


def _dump(manifest: dict, header: str) -> str:
    return header + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1000)
