"""Where steps run: Ray tasks on a local or remote cluster, or plainly in this process.

This is the only module that imports Ray for execution. Strategies submit step functions with
resources and get futures back; they never see Ray objects, so the same loop runs on a laptop,
on a cluster, or in-process for tests and debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

# Workers never reach for a model hub, and tokenizers must not fork thread pools in workers.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
    # an expert's Ray Train workers wait for their slots like any queued step (Ray Train's default, 60 s, logs an
    # error at every wait and starts waiting again)
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600",
}


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 1


class StateHandle:
    """A checkpoint held in memory, passed between steps by reference: an object in Ray's object
    store on a cluster (read where a step needs it, zero-copy on its node), the object itself in process."""

    def __init__(self, ref: Any = None, value: Any = None):
        self._ref = ref
        self._value = value

    @property
    def key(self) -> str:
        """Names the object (the same on every worker that reads it)."""
        return self._ref.hex() if self._ref is not None else f"local-{id(self._value)}"

    def get(self) -> Any:
        if self._ref is not None:
            import ray

            return ray.get(self._ref)
        return self._value


class PartsHandle:
    """A checkpoint held in memory in parts (runs of its tensors that several workers merged), read as one:
    its tensors in their order, and the heads part 0 carries."""

    def __init__(self, parts: list[StateHandle]):
        self.parts = parts

    @property
    def key(self) -> str:
        return "+".join(p.key for p in self.parts)

    def get(self) -> Any:
        first, *rest = [p.get() for p in self.parts]
        return first.with_parts(rest)


class WithState(NamedTuple):
    """What a resident step returns: a small ``value`` for the driver, and a ``state`` (a checkpoint in
    memory) that stays in the object store, owned by the driver, for the steps that read it next."""

    value: Any
    state: Any


class Future:
    """A handle on a submitted step (``state``: the checkpoint a resident step kept in memory)."""

    def __init__(self, name: str, ref: Any = None, value: Any = None, error: BaseException | None = None,
                 state: StateHandle | None = None):
        self.name = name
        self._ref = ref
        self._value = value
        self._error = error
        self.state = state

    def done_value(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class InProcessRuntime:
    """Runs each step immediately in this process (sequentially). For tests, debugging, notebooks."""

    address = "in-process"

    def __enter__(self) -> InProcessRuntime:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def device_for(self, resources: Resources) -> str:
        return "cuda" if resources.num_gpus > 0 else "cpu"

    def submit(self, fn: Callable[..., Any], *args: Any, name: str, resources: Resources = Resources(), **kwargs: Any) -> Future:
        try:
            return Future(name, value=fn(*args, **kwargs))
        except Exception as exc:  # surfaced by result()/as_completed(), like a Ray task error
            return Future(name, error=exc)

    def result(self, future: Future) -> Any:
        return future.done_value()

    def resident_pool(self, size: int, resources: Resources) -> InProcessPool:
        return InProcessPool()

    def gang(self, size: int, resources: Resources, placement: str = "pack") -> InProcessGang:
        return InProcessGang(self)

    def as_completed(self, futures: list[Future]) -> Iterator[tuple[Future, Any]]:
        for f in futures:
            yield f, f.done_value()


class InProcessGang:
    """Steps that belong together (a split merge's parts), here one after the other in this process."""

    def __init__(self, runtime: InProcessRuntime):
        self.runtime = runtime

    def submit(self, slot: int, fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Future:
        return self.runtime.submit(fn, *args, name=name, **kwargs)

    def close(self) -> None:
        pass


class RayGang:
    """``size`` slots of ``resources`` reserved together in one placement group, packed on few nodes or spread
    over many (``placement``); step ``i`` runs in slot ``i``. The slots are held until :meth:`close`."""

    def __init__(self, runtime: RayRuntime, size: int, resources: Resources, placement: str):
        import ray
        from ray.util.placement_group import placement_group

        bundle = {"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {})}
        self.runtime, self.resources = runtime, resources
        self.group = placement_group([dict(bundle) for _ in range(size)],
                                     strategy="PACK" if placement == "pack" else "SPREAD")
        ray.get(self.group.ready())  # every slot is free before any step starts (or this waits for them)

    def submit(self, slot: int, fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Future:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = self.runtime._remote(fn, name, self.resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=slot))
        return Future(name, ref=remote.remote(*args, **kwargs))

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


class InProcessPool:
    """Resident workers in this process: one, the process itself (its caches last across rounds)."""

    size = 1

    def submit(self, worker: int, fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Future:
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            return Future(name, error=exc)
        if isinstance(out, WithState):
            return Future(name, value=out.value, state=StateHandle(value=out.state))
        return Future(name, value=out)

    def put(self, obj: Any) -> StateHandle:
        return StateHandle(value=obj)

    def pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        pass


PRELOAD_ENV = "MERGEFLOW_PRELOAD"  # the modules every worker imports as it starts (comma-separated)


def preload_modules() -> None:
    """Every worker's setup hook (``worker_process_setup_hook``): import the modules the runtime was told to
    preload (``RayRuntime(preload=...)``: what every step imports first, torch, transformers and MLflow among
    them; seconds) as the worker process starts, so the workers Ray starts with the cluster do it while the
    driver sets up, not in the first steps. A failure is left to the step that imports the same module,
    which reports it; here it would only stop the worker from starting."""
    import importlib
    import logging

    # Ray Train's placement-group cleaner asks the state API (served by the dashboard) every few seconds whether
    # its run's controller lives; a private local cluster runs no dashboard, so it would warn every time
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        lambda record: "State API may be temporarily unavailable" not in record.getMessage())
    for name in filter(None, os.environ.get(PRELOAD_ENV, "").split(",")):
        try:
            importlib.import_module(name)
        except Exception:
            pass


class _Resident:
    """A resident worker (a Ray actor): runs steps in one long-lived process, whose module-level caches
    (models, tokenizers, tokenized data) outlive each step."""

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Any]:
        out = fn(*args, **kwargs)
        return (out.value, out.state) if isinstance(out, WithState) else (out, None)

    def pid(self) -> int:
        return os.getpid()


class RayPool:
    """``size`` resident workers: Ray actors holding a slot's resources for the workflow's lifetime.

    A worker that dies (its process or node lost) is restarted by Ray and the call it was running is
    run again from the same inputs (``max_restarts``/``max_task_retries``), like a task's retry.
    """

    def __init__(self, size: int, resources: Resources):
        import ray

        actor = ray.remote(_Resident).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                              max_restarts=resources.max_retries,
                                              max_task_retries=resources.max_retries)
        self.size = size
        self.actors = [actor.remote() for _ in range(size)]

    def submit(self, worker: int, fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Future:
        value, state = self.actors[worker].run.options(num_returns=2, name=name).remote(fn, args, kwargs)
        return Future(name, ref=value, state=StateHandle(ref=state))

    def put(self, obj: Any) -> StateHandle:
        import ray

        return StateHandle(ref=ray.put(obj))

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        """Give the slots back (the workers' caches go with them)."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class StepFailed(RuntimeError):
    """A step failed on the cluster; carries the step name and the worker's error text."""


def _session_dir() -> str | None:
    """The session directory of the local cluster this process started (None where this Ray hides it)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API names it (Ray 2.60)
    try:
        return node.get_session_dir_path() if node is not None else None
    except Exception:
        return None


class RayRuntime:
    """Runs steps as Ray tasks.

    Args:
        address: ``None`` or ``"local"`` starts a private local cluster; ``"auto"`` or
            ``"ray://host:10001"`` / ``"host:6379"`` connects to an existing one.
        num_cpus: CPUs of a local cluster (default: all).
        num_gpus: GPUs of a local cluster (default: detected).
        working_dir: Shipped to remote workers as the runtime_env working_dir (for clusters where
            mergeflow is not installed on the nodes).
        preload: Modules every worker imports as it starts (:func:`preload_modules`).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 working_dir: str | None = None, preload: tuple[str, ...] = ()):
        self.address = address or "local"
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.working_dir = working_dir
        self.preload = preload
        self._started = False
        self._watchdog = None  # pipeline.reaper's process, for a local cluster this runtime started
        self._remotes: dict[Callable[..., Any], Any] = {}

    def __enter__(self) -> RayRuntime:
        import ray

        if ray.is_initialized():
            return self
        runtime_env: dict[str, Any] = {"env_vars": {**WORKER_ENV, PRELOAD_ENV: ",".join(self.preload)},
                                       "worker_process_setup_hook": f"{__name__}.preload_modules"}
        if self.working_dir:
            runtime_env["working_dir"] = self.working_dir
        kwargs: dict[str, Any] = {
            "address": self.address,
            "runtime_env": runtime_env,
            "log_to_driver": True,
            "logging_level": "WARNING",
        }
        if self.address == "local":
            from pipeline.reaper import reap_leftovers

            if reaped := reap_leftovers():  # a dead local cluster whose watchdog died with it
                print(f"stopped {len(reaped)} process(es) left by a dead local Ray cluster: {reaped}", file=sys.stderr)
            kwargs.update(include_dashboard=False, num_cpus=self.num_cpus, num_gpus=self.num_gpus)
            # keep Ray's spill/session files off small /tmp partitions only if the user asks
            if os.environ.get("MERGEFLOW_RAY_TMPDIR"):
                kwargs["_temp_dir"] = os.environ["MERGEFLOW_RAY_TMPDIR"]
        ray.init(**kwargs)
        self._started = True
        if self.address == "local":  # a cluster of our own: it goes when this process goes, however it goes
            from pipeline.reaper import watch

            if (where := _session_dir()) is not None:
                self._watchdog = watch(where)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False
            if self._watchdog is not None:
                from pipeline.reaper import release

                release(self._watchdog)
                self._watchdog = None

    def device_for(self, resources: Resources) -> str:
        return "cuda" if resources.num_gpus > 0 else "cpu"

    def submit(self, fn: Callable[..., Any], *args: Any, name: str, resources: Resources = Resources(), **kwargs: Any) -> Future:
        return Future(name, ref=self._remote(fn, name, resources).remote(*args, **kwargs))

    def _remote(self, fn: Callable[..., Any], name: str, resources: Resources, **options: Any) -> Any:
        """``fn`` as a Ray remote function with a step's options (and any others, e.g. where it is placed)."""
        import ray

        if fn not in self._remotes:  # one remote function per step function (not one per call)
            self._remotes[fn] = ray.remote(fn)
        return self._remotes[fn].options(
            name=name,
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=resources.max_retries,  # retries when the worker process dies
            retry_exceptions=False,  # a Python error is a bug or bad input: retrying will not help
            **options,
        )

    def resident_pool(self, size: int, resources: Resources) -> RayPool:
        """Resident workers: ``size`` of them, or as many as the cluster's free slots hold, if fewer."""
        import ray

        free = ray.available_resources()
        fit = [free.get("CPU", 0.0) // resources.num_cpus if resources.num_cpus else size,
               free.get("GPU", 0.0) // resources.num_gpus if resources.num_gpus else size]
        return RayPool(max(1, min(size, int(min(fit)))), resources)

    def gang(self, size: int, resources: Resources, placement: str = "pack") -> RayGang:
        """Slots for steps that belong together (a split merge's parts): :class:`RayGang`."""
        return RayGang(self, size, resources, placement)

    def result(self, future: Future) -> Any:
        import ray

        try:
            return ray.get(future._ref)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(future.name, exc) from None

    def as_completed(self, futures: list[Future]) -> Iterator[tuple[Future, Any]]:
        import ray

        by_ref = {f._ref: f for f in futures}
        pending = list(by_ref)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            f = by_ref[ready[0]]
            yield f, self.result(f)


def where_am_i() -> dict[str, str]:
    """Where this step runs, as run tags: the host and process, and the Ray node and task when in a Ray worker."""
    import socket

    tags = {"mergeflow.host": socket.gethostname(), "mergeflow.pid": str(os.getpid())}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            tags["mergeflow.ray_node_id"] = ctx.get_node_id()
            task_id = ctx.get_task_id()
            if task_id:
                tags["mergeflow.ray_task_id"] = task_id
    except Exception:  # not in Ray, or an API that moved: the host alone
        pass
    return tags


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory (VmHWM) afresh, so that :func:`peak_rss_bytes` measures what
    comes next, not an earlier step's peak in a reused worker (Linux: ``/proc/self/clear_refs``); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started or :func:`reset_peak_rss` (0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _unwrap(name: str, exc: Exception) -> BaseException:
    """Turn a RayTaskError back into the worker's own exception type where possible."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        try:
            cause.add_note(f"(in step {name!r}, on a Ray worker)")
        except AttributeError:  # Python < 3.11
            pass
        return cause
    return StepFailed(f"step {name!r} failed on a Ray worker: {exc}")


def make_runtime(address: str | None, num_cpus: int | None = None, working_dir: str | None = None,
                 preload: tuple[str, ...] = ()):
    """``in-process`` → :class:`InProcessRuntime`; anything else → :class:`RayRuntime` (``preload``: see there)."""
    if address == "in-process":
        return InProcessRuntime()
    return RayRuntime(address=address, num_cpus=num_cpus, working_dir=working_dir, preload=preload)
