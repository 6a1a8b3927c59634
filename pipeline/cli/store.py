"""The store's upkeep: ``mergeflow gc`` (what it keeps and removes is ``pipeline.gc``'s)."""

from __future__ import annotations

import click

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_BUSY, fail, load_spec
from pipeline.cli.group import main


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--keep-rounds", type=int, default=1, show_default=True,
              help="Keep every checkpoint of the store's last N rounds (what the next run resumes from).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--tracking-uri", default=None, help="Override tracking.uri (where the registry is).")
@click.option("--store", "store_root", default=None, help="Override store.root.")
def gc(spec: str, keep_rounds: int, dry_run: bool, tracking_uri: str | None, store_root: str | None) -> None:
    """Remove the checkpoints of SPEC's old rounds that nothing needs: never one a registry version points
    at, nor the experts it was merged from, nor the last --keep-rounds rounds."""
    from pipeline.attempts import WorkflowBusy
    from pipeline.gc import collect

    wf = load_spec(spec, tracking_uri, store_root)
    try:
        result = collect(wf, keep_rounds=keep_rounds, dry_run=dry_run, report=click.echo)
    except WorkflowBusy as exc:
        fail(str(exc), EXIT_BUSY)
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    verb = "would remove" if dry_run else "removed"
    for c in result.removed:
        click.echo(f"{verb} {c.uri} (round {c.round}, {_mb(c.bytes)})")
    for c in result.kept:
        click.echo(f"kept    {c.uri}: {c.why_kept}")
    for line in result.missing:
        click.echo(f"note: {line}")
    extra = "" if dry_run else f"; {result.leftovers} staging folder(s) of killed writers ({_mb(result.leftover_bytes)})"
    click.echo(f"gc {wf.name!r}: {verb} {len(result.removed)} checkpoint(s), {_mb(sum(c.bytes for c in result.removed))}"
               f"{extra}; kept {len(result.kept)} ({_mb(sum(c.bytes for c in result.kept))})")
