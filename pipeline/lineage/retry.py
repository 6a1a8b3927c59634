"""Every MLflow call of mergeflow goes through :func:`_retry`: a SQLite store under contention is tried again
at once, an unreachable tracking server is waited for with backoff, and a call that gives up says what
was not recorded (:class:`TrackingUnavailable`)."""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.redact import redact_text, redact_uri

T = TypeVar("T")

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
                    uri = redact_uri(getattr(args[0], "tracking_uri", None) or (args[1] if len(args) > 1 else "?"))
                    waited = time.monotonic() - start
                    if waited >= bound:
                        gave_up = TrackingUnavailable(redact_text(
                            f"the MLflow tracking server {uri} did not answer for {waited:.0f} s "
                            f"({str(exc).splitlines()[0][:300]}); {_what(fn, args)} was not recorded. The workflow "
                            "stops here and every step already finished is kept in the store: once the server is "
                            "back, run the workflow again (or `mergeflow resume RUN`); it closes this attempt's "
                            "runs left RUNNING as KILLED and goes on from the store. To wait longer, raise "
                            "tracking.retry_seconds."))
                        _down_since[:] = [time.time(), str(gave_up)]
                        raise gave_up from exc
                    if not warned:
                        log.warning("MLflow tracking server %s unreachable (%s); retrying for up to %.0f s",
                                    uri, redact_text(str(exc).splitlines()[0][:200]), bound)
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
        client = args[0] if args and hasattr(args[0], "busy_seconds") else None  # a Lineage
        if client is None or client._depth:  # not a client's call, or one inside another (counted there)
            return wrapper(*args, **kwargs)
        t0, client._depth = time.perf_counter(), 1
        try:
            return wrapper(*args, **kwargs)
        finally:  # what recording cost this client (steps report it as their `log` time)
            client._depth = 0
            client.busy_seconds += time.perf_counter() - t0

    return timed
