"""The first line of a mergeflow Ray job: can this cluster's ``python`` run mergeflow?

Ray runs a job's entrypoint with the ``python`` its head finds on ``PATH``, not the interpreter Ray
itself runs in: a head started as ``.venv/bin/ray start --head`` without the environment activated
runs the job with the system's Python, and the job used to fail after its upload with a 40-line
traceback ending in ``No module named 'torch'``. :func:`pipeline.jobs.submit` therefore starts every
job with ``python -m pipeline.job_python && …``: this module imports nothing but the standard
library, looks up (without importing) the modules a mergeflow driver needs, and when one is missing
prints one line naming the interpreter, what it lacks and the fix, and exits 2; the job ends FAILED
with that line as its log.

    python -m pipeline.job_python      # 0 and silent where mergeflow can run; else one line, exit 2
"""

from __future__ import annotations

import importlib.util
import sys

# what a driver imports (the CLI, the spec, Ray, MLflow) and what its steps need (torch, transformers, ...)
REQUIRED = ("torch", "transformers", "safetensors", "peft", "ray", "mlflow", "pydantic", "yaml", "click")
MIN_PYTHON = (3, 10)
EXIT_BAD_INPUT = 2  # pipeline.cli.common's code for bad input; not imported (it would import the CLI)


def missing(modules: tuple[str, ...] = REQUIRED) -> list[str]:
    """The modules of ``modules`` this interpreter cannot find."""
    out = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def problem() -> str | None:
    """One line saying why this interpreter cannot run a mergeflow job, or None."""
    where = f"{sys.executable} (Python {sys.version.split()[0]})"
    fix = ("start the cluster from mergeflow's environment (`source .venv/bin/activate && ray start --head ...`, "
           "the same on every node), or install mergeflow there (`make setup`, or `pip install -e .` after torch)")
    if sys.version_info < MIN_PYTHON:
        return (f"mergeflow job: the cluster's python is {where}; mergeflow needs Python "
                f"{'.'.join(map(str, MIN_PYTHON))} or later: {fix}")
    lacking = missing()
    if lacking:
        return (f"mergeflow job: the cluster's python, {where}, the first `python` on the head's PATH, cannot import "
                f"{', '.join(lacking)}: {fix}")
    return None


def main() -> int:
    line = problem()
    if line is None:
        return 0
    print(line, file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
