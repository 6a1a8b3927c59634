"""What a user sees in the MLflow UI, checked in a real headless Chromium.

A tiny workflow runs through the real CLI (``mergeflow run``, real SQLite MLflow store), then
``mergeflow ui`` serves the real MLflow UI on a loopback port; Chromium opens the links ``run``
printed and the test reads the rendered page: the experiment opens on its training runs (not the
GenAI overview), the merged model's page lists its registered version and the datasets it was
scored on. Skipped, with the reason, where Chromium is not installed (``make browser`` installs it
on Debian/Ubuntu as root).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.helpers import free_ports, tiny_workflow_dict

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine (Debian/Ubuntu: "
                                                "`make browser`, i.e. apt-get install -y chromium, as root)"),
]


def _chromium(url: str, profile: Path, budget_ms: int) -> subprocess.Popen:
    shutil.rmtree(profile, ignore_errors=True)  # a fresh profile: no UI choice saved from an earlier visit
    return subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _visible_text(dom: str) -> str:
    text = re.sub(r"<style.*?</style>|<script.*?</script>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()  # &nbsp; is a space too


def render(pages: dict[str, tuple[str, str]], profiles: Path) -> dict[str, str]:
    """The visible text of each page after Chromium ran its scripts, all pages at once.

    Args:
        pages: name -> (url, a regex the page shows once its data has loaded).
        profiles: Folder for the browser profiles.

    Returns:
        name -> text. A page whose data had not loaded (a busy machine) is rendered again with more
        time, up to three times; the tests then assert on what it shows.
    """
    texts: dict[str, str] = {}
    todo = dict(pages)
    for budget in (15000, 30000, 60000):
        procs = {name: _chromium(url, profiles / name, budget) for name, (url, _) in todo.items()}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=180)
            texts[name] = _visible_text(out)
            (profiles / f"{name}.txt").write_text(texts[name])  # what was asserted on, kept for a failure
        todo = {n: v for n, v in todo.items() if not re.search(v[1], texts[n])}
        if not todo:
            break
    return texts


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    """A finished tiny workflow, the links ``mergeflow run`` printed, and ``mergeflow ui`` serving them."""
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("ui")
    spec = tmp / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_workflow_dict(tmp, tiny_base)))
    port = free_ports()[0]
    ui_url = f"http://127.0.0.1:{port}"
    run = CliRunner().invoke(main, ["run", str(spec), "--address", "in-process", "--ui-url", ui_url])
    assert run.exit_code == 0, run.output + repr(run.exception)
    printed = dict(re.findall(r"^  ([a-z ]+):\s+(http\S+)$", run.stdout, re.M))

    log = tmp / "ui.log"  # a file, not a pipe: the server's own output can never block on it
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", str(spec), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    served_links: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 240
        while "registered version" not in served_links:  # the links come once the UI answers
            assert proc.poll() is None, f"mergeflow ui exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"mergeflow ui did not serve within 240 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
            served_links = dict(re.findall(r"^  ([a-z ]+):\s+(http\S+)$", log.read_text(), re.M))
        links = printed
        texts = render({"experiment": (links["experiment"], r"matching run"),
                        "model": (links["merged model"], r"Model versions \S"),
                        "version": (links["registered version"], r"Aliases : @")}, tmp / "profiles")
        yield {"printed": printed, "served": served_links, "tmp": tmp, "ui_url": ui_url, "texts": texts}
    finally:
        proc.send_signal(signal.SIGTERM)  # mergeflow ui stops the MLflow server it started
        proc.wait(timeout=60)


def test_run_and_ui_print_the_same_direct_links(served):
    printed, links, ui = served["printed"], served["served"], served["ui_url"]
    assert set(printed) == {"experiment", "workflow run", "merged model", "registered version"}
    assert printed == links, "mergeflow run and mergeflow ui point at the same run, model and version"
    assert printed["registered version"] == f"{ui}/#/models/tiny-merged/versions/1?workflowType=machine_learning"
    assert re.fullmatch(re.escape(ui) + r"/#/experiments/\d+/models/m-[0-9a-f]{32}\?workflowType=machine_learning",
                        printed["merged model"])


def test_experiment_opens_on_its_training_runs(served):
    text = served["texts"]["experiment"]
    assert text.startswith("Runs - Experiment"), text[:200]  # the page title: the runs table, not an overview
    assert "Token Usage" not in text and "Tokens per Trace" not in text, "not the GenAI traces overview"
    assert re.search(r"Run Name .* tiny .* 6 matching runs", text), (
        "the workflow and its round, 2 experts, baseline and merge: 6 runs, shown as one tree under 'tiny'")


def test_merged_model_page_lists_its_version_and_datasets(served):
    text = served["texts"]["model"]
    assert re.search(r"Model versions tiny-merged v1\b", text), "the model page links its registry version"
    assert re.search(r"Datasets used (vowel|length)-eval \(#[0-9a-f]+\) \+1\b", text), "both eval sets are listed"
    # every evaluation metric names the dataset it was computed on
    for task in ("vowel", "length"):
        assert re.search(rf"eval/{task}/accuracy {task}-eval \(#[0-9a-f]+\) merge:task_arithmetic 0\.\d+", text)


def test_version_page_and_lineage_graph(served):
    text = served["texts"]["version"]
    assert re.search(r"tiny-merged v1 .*Aliases : @ current", text), text[:700]
    run_id = served["printed"]["workflow run"].split("/runs/")[1].split("?")[0]
    with urllib.request.urlopen(f"{served['ui_url']}/get-artifact?path=lineage.png&run_uuid={run_id}",
                                timeout=30) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n", "the workflow run's lineage graph is served as a PNG"
    assert os.path.isfile(served["tmp"] / "mlflow.db")
