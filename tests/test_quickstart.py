"""The README's main job, run as a user runs it: `mergeflow run workflows/quickstart.yaml`.

Real MiniLM from its PyPI package, the four packaged lexicon tasks, a private local Ray cluster,
a SQLite MLflow file. Takes about 3 minutes on 2 cores: marked slow (CI runs it; `make test-fast`
skips it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_shows_what_merging_costs(tmp_path):
    exe = Path(sys.executable).parent / "mergeflow"
    cmd = [str(exe), "run", str(ROOT / "workflows" / "quickstart.yaml"), "--json",
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--store", str(tmp_path / "store")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
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
