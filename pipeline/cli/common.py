"""What every verb of the ``mergeflow`` command line shares: exit codes, one-line errors, loading a
spec, the console and its timed progress lines, MLflow UI links, sizes."""

from __future__ import annotations

import re
import sys
import time
from typing import NoReturn

import click

from pipeline.redact import redact_text

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # the workflow is already running on that store (another driver holds its lease)


def new_console():
    """A rich console for tables and progress lines."""
    from rich.console import Console

    # piped or logged output gets a wide console: rich would squeeze tables to 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def timed_reporter(console):
    """Progress lines with the seconds since the command started (``run``, ``resume``, ``round``)."""
    start = time.perf_counter()

    def report(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {redact_text(msg)}")

    return report


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: MESSAGE`` (in one line) on stderr and exit with ``code``."""
    click.echo(f"error: {one_line(redact_text(message))}", err=True)  # never a password or key
    sys.exit(code)


def one_line(message: str) -> str:
    """Fold a YAML parser's multi-line report (context, snippet, caret) into one line; a list of
    problems (lines starting with '  - ') keeps its lines."""
    message = re.sub(r'\n\s+in "[^"]*", line (\d+), column (\d+):(?:\n(?!\s*\^)[^\n]*)?\n\s*\^',
                     r" at line \1, column \2", message.rstrip())
    return re.sub(r"\n(?!  - )\s*", "; ", message)


def load_spec(spec: str, tracking_uri: str | None, store: str | None):
    """The validated workflow in the file ``spec`` (with the CLI's overrides); a spec error exits 2."""
    from pipeline.spec import SpecError, load_workflow

    try:
        return load_workflow(spec, {"tracking.uri": tracking_uri, "store.root": store})
    except SpecError as exc:
        fail(spec_error_message(exc), EXIT_BAD_INPUT)


def spec_error_message(exc) -> str:
    """A :class:`~pipeline.spec.SpecError` as printed: one problem, one line; several, a header and one line each."""
    return f"{exc.source}: {exc.problems[0]}" if len(exc.problems) == 1 else str(exc)


def print_links(links: dict[str, str], header: str) -> None:
    """``header``, then one aligned ``label: url`` line per link."""
    click.echo(redact_text(header))
    for label, url in links.items():
        click.echo(f"  {label + ':':<20}{redact_text(url)}")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``200MB``, ``5GB`` or ``512MiB`` (``--shard-size``)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"--shard-size: {text!r} is not a size; use e.g. 200MB or 5GB") from None
    if value < 1:
        raise ValueError(f"--shard-size: {text!r} must be positive")
    return int(value)
