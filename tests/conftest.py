"""Session fixtures: a pico BERT built in-process (nothing downloaded) and two tiny experts."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Exit without finalising the interpreter. Once every test has run and every atexit handler (Ray's
# shutdown among them) is done, the pytest process that ran Ray, MLflow, torch, moto and their
# threads in-process can still crash in native teardown: CI once saw `415 passed` and then a
# segmentation fault (exit 139) from interpreter finalisation. This handler is registered before any
# of those libraries is imported, so it runs last, and exits with pytest's own status; nothing of the
# tests' outcome is changed. PYTHONFAULTHANDLER=1 (`make test`) prints a traceback should a crash
# happen earlier than this. Set MERGEFLOW_TEST_FINALIZE=1 to finalise normally (to debug such a crash).
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    stop_quickstart()  # one started in the background and never waited for (its test deselected or not reached)
    if not hasattr(session.config, "workerinput"):  # the controller (or a plain run), not an xdist worker
        _EXIT_STATUS[:] = [int(exitstatus)]


def _exit_without_finalizing() -> None:
    if _EXIT_STATUS and not os.environ.get("MERGEFLOW_TEST_FINALIZE"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])


atexit.register(_exit_without_finalizing)


from tests.helpers import (  # noqa: E402
    QUICKSTART_TEST,
    make_tiny_bert,
    start_quickstart,
    stop_quickstart,
    wait_for_background_quickstart,
    write_task_file,
)


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
    one long file running alone at the end. Files keep their tests together and in order. A plain
    ``pytest`` run (no xdist) keeps the usual order, except that `serial` tests go last."""
    if not hasattr(config, "workerinput"):
        # a plain run: the `serial` tests (whose `ray stop --force` stops every Ray on the machine) go
        # last, after the quickstart started in the background (below) has ended
        items.sort(key=lambda item: bool(item.get_closest_marker("serial")))  # stable
        return
    rank: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::", 1)[0]
        r = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2
        rank[file] = min(rank.get(file, 2), r)
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable


# The quickstart test runs the README's main job: minutes of Ray training on every core. In a plain run
# (`make test`) its subprocess starts as soon as the tests are collected (tests/helpers.py:
# start_quickstart), and the test waits for it and asserts on what it printed: those minutes overlap the
# many tests that mostly wait (on servers, nodes, jobs and subprocesses) instead of adding to them.
# Under xdist, or with MERGEFLOW_TEST_QUICKSTART_INLINE=1, the test runs it itself.
def pytest_collection_finish(session):
    if (hasattr(session.config, "workerinput") or session.config.option.collectonly
            or os.environ.get("MERGEFLOW_TEST_QUICKSTART_INLINE")):
        return
    if any(item.nodeid == QUICKSTART_TEST for item in session.items):
        start_quickstart()


@pytest.fixture(autouse=True)
def _no_background_quickstart_under_serial_tests(request):
    """A `serial` test may stop every Ray on the machine: the background quickstart must be over first."""
    if request.node.get_closest_marker("serial"):
        wait_for_background_quickstart()
    yield
