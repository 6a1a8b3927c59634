"""Session fixtures: a pico BERT built in-process (nothing downloaded) and two tiny experts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import make_tiny_bert, write_task_file  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from operators.checkpoint import quiet_transformers

    quiet_transformers()
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_experts(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Two experts fine-tuned from the pico BERT for a few steps (vowel / length tasks)."""
    from operators.data import load_task_data
    from operators.finetune import finetune
    from pipeline.spec import DatasetSpec, FinetuneSpec

    root = tmp_path_factory.mktemp("experts")
    out = {}
    for rule, labels in (("vowel", ["consonant", "vowel"]), ("length", ["short", "long"])):
        src = write_task_file(root / f"{rule}.parquet", rule)
        data = load_task_data(rule, DatasetSpec(source=str(src)), labels)
        finetune(tiny_base, data, FinetuneSpec(max_steps=4, batch_size=16, learning_rate=1e-3), root / rule)
        out[rule] = root / rule
    return out


def pytest_collection_modifyitems(config, items):
    """On an xdist worker (``make test``: ``-n 2 --dist loadfile --no-loadscope-reorder``), hand the
    longest files out first: those with a slow test, then those with an e2e test, then the rest, so
    that the minutes-long ones start at once and the short unit files fill in at the end instead of
    one long file running alone at the end. Files keep their tests together and in order; a plain
    ``pytest`` run (no xdist) keeps the usual order."""
    if not hasattr(config, "workerinput"):
        return
    rank: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::", 1)[0]
        r = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2
        rank[file] = min(rank.get(file, 2), r)
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable
