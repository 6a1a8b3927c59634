"""Make docs/lineage.png: the lineage graph a real ATM run logs on its workflow run.

    .venv/bin/python docs/make_lineage_png.py        # about a minute on 2 cores; nothing downloaded

Runs a 3-round ATM workflow of two word tasks on the pico BERT of the tests (built in-process),
in-process (no Ray), with its store and MLflow database in a temporary folder, then copies the
``lineage.png`` artifact of the workflow run to ``docs/lineage.png``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> Path:
    """Run the workflow and copy its lineage graph; returns the PNG's path."""
    from mlflow import MlflowClient

    from pipeline.driver import run_workflow
    from pipeline.spec import parse_workflow
    from tests.helpers import make_tiny_bert, tiny_workflow_dict, write_task_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = make_tiny_bert(tmp_path / "pico-bert")
        spec = tiny_workflow_dict(tmp_path, base, name="pico-atm", strategy="atm", rounds={"count": 3})
        for task, rule in (("vowel", "vowel"), ("length", "length")):  # more rows than the tests use
            path = write_task_file(tmp_path / "data" / f"{task}-600.parquet", rule, n=600, seed=7)
            next(t for t in spec["tasks"] if t["name"] == task)["dataset"] = {"source": str(path)}
        spec["finetune"] = {"max_steps": 90, "batch_size": 32, "learning_rate": 3e-3, "max_length": 12,
                            "log_every": 10}
        wf = parse_workflow(spec)
        result = run_workflow(wf, address="in-process", report=print)
        client = MlflowClient(tracking_uri=wf.tracking.uri)
        local = client.download_artifacts(result.run_id, "lineage.png", str(tmp_path))
        out = ROOT / "docs" / "lineage.png"
        shutil.copy(local, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
