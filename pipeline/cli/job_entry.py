"""The entry point of a mergeflow Ray job: ``python -m pipeline.cli.job_entry run|round SPEC ...``, the
entrypoint :func:`pipeline.jobs.submit` gives the job."""

from __future__ import annotations

import signal
import sys

from pipeline.cli import main


def entry(argv: list[str]) -> None:
    """The job's entrypoint: ``mergeflow run`` (or ``round``) with SIGTERM (what ``ray job stop`` sends
    first) turned into KeyboardInterrupt, so the workflow's runs end KILLED instead of staying RUNNING."""

    def on_term(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    verb = argv.pop(0) if argv and argv[0] in ("run", "round") else "run"
    main([verb, *argv], prog_name="mergeflow")


if __name__ == "__main__":
    entry(sys.argv[1:])
