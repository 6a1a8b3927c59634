"""The ``mergeflow`` click group; each verb module of ``pipeline.cli`` adds its commands to it."""

from __future__ import annotations

import os

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergeflow")
def main() -> None:
    """mergeflow: distributed fine-tune-then-merge workflows on Ray, with MLflow lineage."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
