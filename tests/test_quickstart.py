"""The README's main job, run as a user runs it: `mergeflow run workflows/quickstart.yaml`.

Real MiniLM from its PyPI package, the four packaged lexicon tasks, a private local Ray cluster,
a SQLite MLflow file. Takes about 3 minutes on 2 cores: marked slow (CI runs it; `make test-fast`
skips it). In a plain `make test` the run starts in the background as soon as the tests are collected
(tests/conftest.py), and this test waits for it.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import quickstart_result

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quickstart_runs_and_shows_what_merging_costs(tmp_path):
    # `mergeflow run workflows/quickstart.yaml --json` in a fresh directory; in a plain `make test` it was
    # started in the background when the tests were collected (tests/conftest.py), and is waited for here
    code, out, err = quickstart_result(tmp_path)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "quickstart: accuracy on held-out data" in out
    result = json.loads(out[out.index("{\n"):])
    summary = result["summary"]
    assert set(summary) == {"sentiment", "emotion", "pos", "language", "mean"}
    # every expert beats the base's linear probe on its own task ...
    for task in ("sentiment", "emotion", "pos", "language"):
        assert summary[task]["expert"] > summary[task]["base_probe"], task
    # ... and merging four different tasks into one body loses some of that
    assert summary["mean"]["merged"] < summary["mean"]["expert"]
    assert summary["mean"]["normalized"] < 1.0
    assert result["rounds"][0]["registered_version"] == "1"
    print(out[: out.index("{\n")][-1500:])  # the table, for the CI log
