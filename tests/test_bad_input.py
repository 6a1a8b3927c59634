"""Bad input through the real CLI: each case is what a user might hand over (a typo, the wrong
file, a half-written file) and must be refused with exit code 2 and one exact line on stderr,
before anything is created: no MLflow database, no store folder, no partial output.

Validation only (no training): the whole table runs in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from tests.helpers import tiny_workflow_dict

# a pattern: a literal with {placeholders} for the world's paths, or "re:" + a regular expression
Pattern = str


@dataclass(frozen=True)
class World:
    root: Path
    base: Path
    good: dict

    def spec(self, stem: str, /, **changes) -> str:
        """Write the good spec with ``changes`` (``a__b__0__c`` reaches ``a.b[0].c``; None deletes)."""
        data = json.loads(json.dumps(self.good))
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split("__")
            for part in parents:
                node = node[int(part)] if part.isdigit() else node[part]
            if value is None:
                node.pop(leaf)
            else:
                node[int(leaf) if leaf.isdigit() else leaf] = value
        return self.write(f"{stem}.yaml", yaml.safe_dump(data))

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    def write_bytes(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def merge_config(self, stem: str, /, **changes) -> str:
        config = {"base": str(self.base), "experts": {"a": str(self.base), "b": str(self.root / "ckpt")},
                  "method": "task_arithmetic", "params": {"scaling": 0.5}}
        config.update(changes)
        return self.write(f"{stem}.merge.yaml", yaml.safe_dump(config))


def _copy_model(src: Path, dst: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base) -> World:
    from transformers import AutoConfig, BertForSequenceClassification

    from operators.checkpoint import save_task_model
    from pipeline.lineage import Lineage

    root = tmp_path_factory.mktemp("bad")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    good = tiny_workflow_dict(root, base, seed_mlflow=False)  # nothing exists until a run makes it
    w = World(root, base, good)
    # data a user might point at
    w.write("nolabel.csv", "text,lbl\nabc,vowel\nxyz,consonant\n")
    w.write("empty.csv", "")
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}),
                   root / "empty.parquet")
    shutil.copy(root / "data" / "vowel.parquet", root / "half.parquet")
    _truncate(root / "half.parquet")
    w.write("broken.jsonl", '{"text": "abc", "label": "short"}\n{"text": "abd", "lab\n')
    w.write("medium.jsonl", "".join(json.dumps({"text": f"w{i}", "label": "medium"}) + "\n" for i in range(10)))
    w.write("words.jsonl", "".join(json.dumps({"words": f"w{i}", "label": "short"}) + "\n" for i in range(10)))
    w.write("notes.txt", "hello\n")
    w.write("one.jsonl", json.dumps({"text": "abc", "label": "short"}) + "\n")
    # models a user might point at
    _copy_model(base, root / "badcfg", lambda d: (d / "config.json").write_text('{"model_type": "bert",'))
    _copy_model(base, root / "half", lambda d: _truncate(d / "model.safetensors"))
    _copy_model(base, root / "pickle", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))
    _copy_model(base, root / "nocfg", lambda d: (d / "config.json").unlink())
    _copy_model(base, root / "notype", lambda d: (d / "config.json").write_text('{"hidden_size": 32}'))
    # a checkpoint with a head (an untrained head on the base body: enough to export)
    config = AutoConfig.from_pretrained(base, num_labels=2)
    save_task_model(BertForSequenceClassification(config), base, root / "ckpt", "vowel")
    _copy_model(root / "ckpt", root / "ckpt-halfbody", lambda d: _truncate(d / "model.safetensors"))
    _copy_model(root / "ckpt", root / "ckpt-halfhead", lambda d: _truncate(d / "heads" / "vowel" / "head.safetensors"))
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine")
    # a real (empty) tracking database, for status
    Lineage.init(f"sqlite:///{root / 'tracked.db'}", "other")
    (root / "notadb.db").write_text("this is a text file, not SQLite\n")
    return w


def _cases(w: World) -> list[tuple[str, list[str], Pattern]]:
    """(id, argv, expected stderr line after 'error: ') — built lazily: specs are files in the world."""
    from operators.merge import MERGE_METHODS

    r = w.root
    methods = ", ".join(sorted(MERGE_METHODS))  # the registry's names: other methods may join it
    spec_not_mapping = "(top level): a workflow spec is a mapping of keys (got {kind})."
    C: list[tuple[str, list[str], Pattern]] = [
        # --- the spec file ----------------------------------------------------------------------
        ("spec-missing", ["validate", str(r / "nope.yaml")],
         "{r}/nope.yaml: (file): no such spec file '{r}/nope.yaml'. Check the path; shipped specs are in workflows/."),
        ("spec-not-yaml", ["validate", w.write("unclosed.yaml", "name: [unclosed\n")],
         "{r}/unclosed.yaml: (file): not valid YAML: while parsing a flow sequence at line 1, column 7; expected ',' "
         "or ']', but got '<stream end>' at line 2, column 1"),
        ("spec-binary", ["validate", w.write_bytes("model.yaml", b"PK\x03\x04\x14\x00\x08\x08\xff\xfe")],
         "{r}/model.yaml: (file): not a text file (byte 8 is not UTF-8); a spec is YAML text: check the path "
         "(shipped specs are in workflows/)"),
        ("spec-list", ["validate", w.write("list.yaml", "- a\n- b\n")],
         "{r}/list.yaml: " + spec_not_mapping.format(kind="list")),
        ("spec-empty-file", ["validate", w.write("empty.yaml", "")],
         "{r}/empty.yaml: " + spec_not_mapping.format(kind="NoneType")),
        ("spec-no-name", ["validate", w.spec("noname", name=None)], "{r}/noname.yaml: name: required field is missing."),
        ("spec-bad-name", ["validate", w.spec("badname", name="my flow!")],
         "{r}/badname.yaml: name: the workflow name must be 1-64 characters of letters, digits, '_' or '-', "
         "starting with a letter or digit (got 'my flow!')."),
        ("spec-no-tasks", ["validate", w.spec("notasks", tasks=[])],
         "{r}/notasks.yaml: tasks: List should have at least 1 item after validation, not 0."),
        ("spec-duplicate-task", ["validate", w.spec("dup", tasks=[w.good["tasks"][0]] * 2)],
         "{r}/dup.yaml: tasks: duplicate task name 'vowel'; task names must be unique."),
        ("spec-typo-key", ["validate", w.spec("typo", taks=1)],
         "{r}/typo.yaml: taks: unknown key (got 1). Remove it or check its spelling against the README's spec "
         "reference."),
        ("spec-typo-finetune-key", ["validate", w.spec("epochz", finetune__epochz=3)],
         "{r}/epochz.yaml: finetune.epochz: unknown key (got 3). Remove it or check its spelling against the "
         "README's spec reference."),
        ("spec-unknown-method", ["validate", w.spec("tie", merge={"method": "tie"})],
         f"{{r}}/tie.yaml: merge: unknown merge method 'tie'. Known: {methods}."),
        ("spec-negative-scaling", ["validate", w.spec("scaling", merge__params__scaling=-1)],
         "{r}/scaling.yaml: merge.params.scaling: Input should be greater than or equal to 0 (got -1)."),
        ("spec-lr-not-number", ["validate", w.spec("lr", finetune__learning_rate="fast")],
         "{r}/lr.yaml: finetune.learning_rate: Input should be a valid number, unable to parse string as a number "
         "(got 'fast')."),
        ("spec-unknown-strategy", ["validate", w.spec("greedy", strategy="greedy")],
         "{r}/greedy.yaml: strategy: Input should be 'oneshot', 'atm' or 'cold_fusion' (got 'greedy')."),
        ("spec-one-label", ["validate", w.spec("onelabel", tasks__0__labels=["a"])],
         "{r}/onelabel.yaml: tasks[0]: 'labels' needs at least 2 entries (got ['a'])."),
        ("spec-source-and-train", ["validate", w.spec("both", tasks__0__dataset={"source": "a.csv", "train": "b.csv"})],
         "{r}/both.yaml: tasks[0].dataset: give either 'source' (split by eval_fraction) or 'train' and 'eval', not "
         "both (got source='a.csv', train='b.csv', eval=None)."),
        ("spec-zero-cpus", ["validate", w.spec("cpus", resources__num_cpus=0)],
         "{r}/cpus.yaml: resources.num_cpus: Input should be greater than 0 (got 0)."),
        ("spec-zero-rounds", ["validate", w.spec("rounds", strategy="atm", rounds={"count": 0})],
         "{r}/rounds.yaml: rounds.count: Input should be greater than or equal to 1 (got 0)."),
        ("spec-alias-latest", ["validate", w.spec("latest", tracking__alias="latest")],
         "{r}/latest.yaml: tracking.alias: MLflow reserves the alias 'latest' (it already means the newest version / "
         "a version number); choose another, e.g. 'current' or 'champion' (got 'latest')."),
        # --- where it would write: refused by validate, and by run before anything exists --------
        ("store-unknown-scheme", ["validate", w.spec("foo", store__root="foo://bucket/x")],
         "{r}/foo.yaml: store.root: scheme 'foo://' is not a filesystem pyarrow.fs opens (got 'foo://bucket/x'); "
         "use a local folder or one of file://, s3://, gs://, gcs://, hdfs://, viewfs://, abfs://, abfss://."),
        ("run-store-unknown-scheme", ["run", w.spec("runfoo", store__root="foo://bucket/x"), "--address", "in-process"],
         "{r}/runfoo.yaml: store.root: scheme 'foo://' is not a filesystem pyarrow.fs opens (got 'foo://bucket/x'); "
         "use a local folder or one of file://, s3://, gs://, gcs://, hdfs://, viewfs://, abfs://, abfss://."),
        ("store-no-bucket", ["validate", w.spec("s3", store__root="s3://")],
         "{r}/s3.yaml: store.root: s3:// needs a bucket or host after it, e.g. s3://bucket/prefix (got 's3://')."),
        ("store-relative-file-uri", ["validate", w.spec("fileuri", store__root="file://store")],
         "{r}/fileuri.yaml: store.root: a file:// URI needs an absolute path, file:///abs/path (got 'file://store')."),
        ("store-under-a-file", ["validate", w.spec("underfile", store__root=str(r / "notes.txt" / "store"))],
         "store.root: {r}/notes.txt is a file, not a folder (got '{r}/notes.txt/store'); choose a folder "
         "(preflight: nothing was run)"),
        ("tracking-ftp", ["validate", w.spec("ftp", tracking__uri="ftp://x/y")],
         "{r}/ftp.yaml: tracking.uri: scheme 'ftp:' is not one MLflow tracks to (got 'ftp://x/y'); use "
         "sqlite:///path.db, http(s)://host:port, postgresql://, mysql://, mssql:// or a local folder."),
        ("run-tracking-ftp", ["run", w.spec("runftp", tracking__uri="ftp://x/y"), "--address", "in-process"],
         "{r}/runftp.yaml: tracking.uri: scheme 'ftp:' is not one MLflow tracks to (got 'ftp://x/y'); use "
         "sqlite:///path.db, http(s)://host:port, postgresql://, mysql://, mssql:// or a local folder."),
        ("tracking-sqlite-one-slash", ["validate", w.spec("slash", tracking__uri="sqlite:/mlflow.db")],
         "{r}/slash.yaml: tracking.uri: a SQLite URI is sqlite:/// followed by the file's path, e.g. "
         "sqlite:///mlflow.db (got 'sqlite:/mlflow.db')."),
        ("tracking-http-no-host", ["validate", w.spec("nohost", tracking__uri="http://")],
         "{r}/nohost.yaml: tracking.uri: an MLflow server URI needs a host, e.g. http://127.0.0.1:5000 "
         "(got 'http://')."),
        ("tracking-db-is-folder", ["validate", w.spec("dbdir", tracking__uri=f"sqlite:///{r / 'data'}")],
         "tracking.uri: {r}/data is a folder, not a database file (got 'sqlite:///{r}/data'); name a file, e.g. "
         "sqlite:///{r}/data/mlflow.db (preflight: nothing was run)"),
        ("tracking-db-not-sqlite", ["validate", w.spec("dbtxt", tracking__uri=f"sqlite:///{r / 'notadb.db'}")],
         "tracking.uri: {r}/notadb.db exists and is not a SQLite database (got 'sqlite:///{r}/notadb.db'); point "
         "at another file or move it away (preflight: nothing was run)"),
        # --- data files ---------------------------------------------------------------------------
        ("data-missing", ["validate", w.spec("dmiss", tasks__0__dataset={"source": str(r / "nope.parquet")})],
         "{r}/nope.parquet: no such file. Check dataset paths in the spec (relative paths are from the working "
         "directory). (preflight: nothing was run)"),
        ("run-data-missing", ["run", w.spec("rdmiss", tasks__0__dataset={"source": str(r / "nope.parquet")}),
                              "--address", "in-process"],
         "{r}/nope.parquet: no such file. Check dataset paths in the spec (relative paths are from the working "
         "directory). (preflight: nothing was run)"),
        ("data-csv-no-label-column", ["validate", w.spec("nolabel", tasks__0__dataset={"source": str(r / "nolabel.csv")})],
         "tasks.vowel.dataset ({r}/nolabel.csv): no label column 'label'; the columns are ['text', 'lbl']. Set "
         "dataset.label_column to one of them. (preflight: nothing was run)"),
        ("data-empty-parquet", ["validate", w.spec("emptypq", tasks__0__dataset={"source": str(r / "empty.parquet")})],
         "tasks.vowel.dataset ({r}/empty.parquet): has 0 rows; need at least 2 to make a train and an eval split "
         "(preflight: nothing was run)"),
        ("data-half-written-parquet", ["validate", w.spec("halfpq", tasks__0__dataset={"source": str(r / "half.parquet")})],
         "re:" + re.escape("{r}/half.parquet: not a valid parquet file (") + r".*Parquet magic bytes not found in "
         r"footer.*" + re.escape("); set dataset.format if the extension misleads (preflight: nothing was run)")),
        ("data-half-written-jsonl", ["validate", w.spec("brokenjl", tasks__1__dataset={"source": str(r / "broken.jsonl")})],
         "re:" + re.escape("{r}/broken.jsonl: not a valid jsonl file (JSON parse error: ") + r"[^()]+"
         + re.escape(" in row 1); set dataset.format if the extension misleads (preflight: nothing was run)")),
        ("data-empty-csv", ["validate", w.spec("emptycsv", tasks__0__dataset={"source": str(r / "empty.csv")})],
         "{r}/empty.csv: not a valid csv file (Empty CSV file); set dataset.format if the extension misleads "
         "(preflight: nothing was run)"),
        ("data-undeclared-label", ["validate", w.spec("medium", tasks__1__dataset={"source": str(r / "medium.jsonl")})],
         "tasks.length.dataset ({r}/medium.jsonl): row 0 has label 'medium', which is not among the declared labels "
         "['short', 'long']. Add it to the task's labels, or fix the data. (preflight: nothing was run)"),
        ("data-no-text-column", ["validate", w.spec("words", tasks__1__dataset={"source": str(r / "words.jsonl")})],
         "tasks.length.dataset ({r}/words.jsonl): no text column 'text'; the columns are ['words', 'label']. Set "
         "dataset.text_column to one of them. (preflight: nothing was run)"),
        ("data-unknown-extension", ["validate", w.spec("txt", tasks__0__dataset={"source": str(r / "notes.txt")})],
         "{r}/notes.txt: cannot tell the file format from the extension '.txt'; set dataset.format to one of "
         "parquet, jsonl, csv (preflight: nothing was run)"),
        ("data-one-row", ["validate", w.spec("onerow", tasks__1__dataset={"source": str(r / "one.jsonl")})],
         "tasks.length.dataset ({r}/one.jsonl): has 1 rows; need at least 2 to make a train and an eval split "
         "(preflight: nothing was run)"),
        # --- the base model directory -------------------------------------------------------------
        ("base-missing", ["validate", w.spec("bmiss", base_model=str(r / "nobase"))],
         "base_model: {r}/nobase: no such model directory. Give a local Hugging Face checkpoint directory or "
         "packaged:NAME. (preflight: nothing was run)"),
        ("base-config-not-json", ["validate", w.spec("bcfg", base_model=str(r / "badcfg"))],
         "base_model: {r}/badcfg/config.json: not valid JSON (Expecting property name enclosed in double quotes: "
         "line 1 column 23 (char 22)) (preflight: nothing was run)"),
        ("base-config-missing", ["validate", w.spec("bnocfg", base_model=str(r / "nocfg"))],
         "base_model: {r}/nocfg: no config.json; a base model must be a Hugging Face checkpoint directory "
         "(preflight: nothing was run)"),
        ("base-config-no-model-type", ["validate", w.spec("btype", base_model=str(r / "notype"))],
         "base_model: {r}/notype/config.json: has no 'model_type'; transformers cannot tell the architecture "
         "(preflight: nothing was run)"),
        ("base-truncated-safetensors", ["validate", w.spec("bhalf", base_model=str(r / "half"))],
         "re:" + re.escape("base_model: {r}/half/model.safetensors: cannot read safetensors file (tensor '")
         + r"[\w.]+' lies at bytes \d+-\d+, past the \d+ data bytes"
         + re.escape("); the file is corrupt or truncated. (preflight: nothing was run)")),
        ("base-pickle-only", ["validate", w.spec("bpickle", base_model=str(r / "pickle"))],
         "base_model: {r}/pickle: only pickle weights (*.bin/*.pt) found. mergeflow loads safetensors only (pickle "
         "can run arbitrary code). Convert with `model.save_pretrained(dir, safe_serialization=True)` from a trusted "
         "environment. (preflight: nothing was run)"),
        ("base-unknown-packaged", ["validate", w.spec("bpkg", base_model="packaged:nope")],
         "re:" + re.escape("base_model: unknown packaged model 'nope'. Known: all-minilm-l6-v2")
         + r"[\w, -]*" + re.escape(" (preflight: nothing was run)")),
        # --- mergeflow merge configs --------------------------------------------------------------
        ("merge-config-missing", ["merge", str(r / "nope.yaml"), str(r / "out-m1"), "--quiet"],
         "{r}/nope.yaml: {r}/nope.yaml: no such merge config"),
        ("merge-config-not-yaml", ["merge", w.write("bad.merge.yaml", "base: [x\n"), str(r / "out-m2"), "--quiet"],
         "{r}/bad.merge.yaml: {r}/bad.merge.yaml: not valid YAML (while parsing a flow sequence at line 1, column 7; "
         "expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
        ("merge-unknown-method", ["merge", w.merge_config("tie", method="tie"), str(r / "out-m3"), "--quiet"],
         f"{{r}}/tie.merge.yaml: method: unknown merge method 'tie'. Known: {methods}"),
        ("merge-typo-key", ["merge", w.merge_config("typo", methdo="ties"), str(r / "out-m4"), "--quiet"],
         "re:" + re.escape("{r}/typo.merge.yaml: methdo: unknown key; a mergeflow merge config has ")
         + r"[\w, ]+" + re.escape(" (or give a mergekit config with merge_method)")),
        ("merge-negative-scaling", ["merge", w.merge_config("neg", params={"scaling": -1}), str(r / "out-m5"), "--quiet"],
         "{r}/neg.merge.yaml: params.scaling: Input should be greater than or equal to 0 (got -1)"),
        ("merge-expert-missing", ["merge", w.merge_config("emiss", experts={"a": str(r / "nope"), "b": str(r / "ckpt")}),
                                  str(r / "out-m6"), "--quiet"],
         "{r}/emiss.merge.yaml: experts.a: '{r}/nope' is not a local checkpoint directory"),
        ("merge-expert-truncated", ["merge", w.merge_config("ehalf", experts={"a": str(r / "half"), "b": str(r / "ckpt")}),
                                    str(r / "out-m7"), "--quiet"],
         "re:" + re.escape("{r}/half/model.safetensors: cannot read safetensors file (tensor '")
         + r"[\w.]+' lies at bytes \d+-\d+, past the \d+ data bytes" + re.escape("); the file is corrupt or truncated.")),
        ("merge-expert-pickle", ["merge", w.merge_config("epkl", experts={"a": str(r / "pickle"), "b": str(r / "ckpt")}),
                                 str(r / "out-m8"), "--quiet"],
         "{r}/pickle: only pickle weights (*.bin/*.pt) found. mergeflow loads safetensors only (pickle can run "
         "arbitrary code). Convert with `model.save_pretrained(dir, safe_serialization=True)` from a trusted "
         "environment."),
        ("merge-bad-shard-size", ["merge", w.merge_config("shard"), str(r / "out-m9"), "--shard-size", "lots", "--quiet"],
         "{r}/shard.merge.yaml: --shard-size: 'lots' is not a size; use e.g. 200MB or 5GB"),
        ("merge-output-not-empty", ["merge", w.merge_config("full"), str(r / "full"), "--quiet"],
         "{r}/full: output directory exists and is not empty; choose a new path or remove it"),
        # --- export -------------------------------------------------------------------------------
        ("export-checkpoint-missing", ["export", str(r / "nope"), "vowel", str(r / "out-e1")],
         "CHECKPOINT {r}/nope: no such directory; give a merged or expert checkpoint directory (mergeflow status "
         "RUN_ID lists them)"),
        ("export-checkpoint-is-file", ["export", str(r / "notes.txt"), "vowel", str(r / "out-e2")],
         "CHECKPOINT {r}/notes.txt: is a file; give a merged or expert checkpoint directory (mergeflow status RUN_ID "
         "lists them)"),
        ("export-no-such-head", ["export", str(r / "ckpt"), "sentiment", str(r / "out-e3")],
         "{r}/ckpt has no head for task 'sentiment'; heads: vowel"),
        ("export-plain-model-no-heads", ["export", str(r / "base"), "vowel", str(r / "out-e4")],
         "{r}/base has no head for task 'vowel'; heads: none"),
        ("export-output-not-empty", ["export", str(r / "ckpt"), "vowel", str(r / "full")],
         "{r}/full exists and is not an empty folder; choose a new directory"),
        ("export-truncated-body", ["export", str(r / "ckpt-halfbody"), "vowel", str(r / "out-e5")],
         "re:" + re.escape("{r}/ckpt-halfbody/model.safetensors: cannot read safetensors file (tensor '")
         + r"[\w.]+' lies at bytes \d+-\d+, past the \d+ data bytes" + re.escape("); the file is corrupt or truncated.")),
        ("export-truncated-head", ["export", str(r / "ckpt-halfhead"), "vowel", str(r / "out-e6")],
         "re:" + re.escape("{r}/ckpt-halfhead: ") + r".+" + re.escape(" (heads/vowel/ or the body is corrupt or truncated)")),
        # --- status and ui ------------------------------------------------------------------------
        ("status-no-database", ["status", "--tracking-uri", f"sqlite:///{r / 'none.db'}"],
         "no tracking database at sqlite:///{r}/none.db; run a workflow first or pass --tracking-uri"),
        ("status-not-a-database", ["status", "--tracking-uri", f"sqlite:///{r / 'notadb.db'}"],
         "{r}/notadb.db is not a SQLite database (--tracking-uri sqlite:///{r}/notadb.db); pass the file mergeflow "
         "run wrote"),
        ("status-ftp", ["status", "--tracking-uri", "ftp://x/y"],
         "--tracking-uri: scheme 'ftp:' is not one MLflow tracks to (got 'ftp://x/y'); use sqlite:///path.db, "
         "http(s)://host:port, postgresql://, mysql://, mssql:// or a local folder"),
        ("status-unknown-run-id", ["status", "0123456789abcdef", "--tracking-uri", f"sqlite:///{r / 'tracked.db'}"],
         "no run '0123456789abcdef' in sqlite:///{r}/tracked.db; list the workflow runs with: mergeflow status "
         "--tracking-uri sqlite:///{r}/tracked.db"),
        ("logs-empty-job-id", ["logs", "", "--address", "http://127.0.0.1:9"],
         "JOB: '' is not a job id; `mergeflow jobs --address …` lists them (e.g. mergeflow-quickstart-1a2b3c4d5e6f)"),
        ("stop-job-id-with-slash", ["stop", "a/b", "--address", "http://127.0.0.1:9"],
         "JOB: 'a/b' is not a job id; `mergeflow jobs --address …` lists them (e.g. mergeflow-quickstart-1a2b3c4d5e6f)"),
        ("ui-no-database", ["ui", w.spec("uinodb")],
         "no tracking database at {r}/mlflow.db (tracking.uri sqlite:///{r}/mlflow.db); run the workflow first: "
         "mergeflow run {r}/uinodb.yaml"),
        ("ui-bad-port", ["ui", w.spec("uiport", tracking__uri=f"sqlite:///{r / 'tracked.db'}"), "--port", "70000"],
         "--port 70000 is not a TCP port; use 1-65535, e.g. 5000"),
    ]
    return C


CASE_IDS = [
    "spec-missing", "spec-not-yaml", "spec-binary", "spec-list", "spec-empty-file", "spec-no-name", "spec-bad-name", "spec-no-tasks",
    "spec-duplicate-task", "spec-typo-key", "spec-typo-finetune-key", "spec-unknown-method", "spec-negative-scaling",
    "spec-lr-not-number", "spec-unknown-strategy", "spec-one-label", "spec-source-and-train", "spec-zero-cpus",
    "spec-zero-rounds", "spec-alias-latest", "store-unknown-scheme", "run-store-unknown-scheme", "store-no-bucket",
    "store-relative-file-uri", "store-under-a-file", "tracking-ftp", "run-tracking-ftp", "tracking-sqlite-one-slash",
    "tracking-http-no-host", "tracking-db-is-folder", "tracking-db-not-sqlite", "data-missing", "run-data-missing",
    "data-csv-no-label-column", "data-empty-parquet", "data-half-written-parquet", "data-half-written-jsonl",
    "data-empty-csv", "data-undeclared-label", "data-no-text-column", "data-unknown-extension", "data-one-row",
    "base-missing", "base-config-not-json", "base-config-missing", "base-config-no-model-type",
    "base-truncated-safetensors", "base-pickle-only", "base-unknown-packaged", "merge-config-missing",
    "merge-config-not-yaml", "merge-unknown-method", "merge-typo-key", "merge-negative-scaling",
    "merge-expert-missing", "merge-expert-truncated", "merge-expert-pickle", "merge-bad-shard-size",
    "merge-output-not-empty", "export-checkpoint-missing", "export-checkpoint-is-file", "export-no-such-head",
    "export-plain-model-no-heads", "export-output-not-empty", "export-truncated-body", "export-truncated-head",
    "status-no-database", "status-not-a-database", "status-ftp", "status-unknown-run-id", "logs-empty-job-id",
    "stop-job-id-with-slash", "ui-no-database",
    "ui-bad-port",
]


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (folders: -1), hidden ones included."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def cases(world) -> dict[str, tuple[list[str], Pattern]]:
    return {case_id: (argv, pattern) for case_id, argv, pattern in _cases(world)}


def test_the_table_covers_every_case(world):
    ids = [c[0] for c in _cases(world)]
    assert ids == CASE_IDS, "CASE_IDS lists the table's cases in order"
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_is_refused_in_one_line_and_leaves_nothing(world, cases, case_id, tmp_path, monkeypatch):
    argv, pattern = cases[case_id]
    monkeypatch.chdir(tmp_path)  # relative defaults (mlflow.db, mergeflow-store) would land here
    before, cwd_before = _tree(world.root), _tree(tmp_path)

    result = CliRunner().invoke(main, argv)

    assert result.exit_code == 2, f"exit code {result.exit_code}; stderr: {result.stderr!r}; {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line on stderr, got: {result.stderr!r}"
    message = lines[0].removeprefix("error: ")
    assert lines[0].startswith("error: ")
    if pattern.startswith("re:"):
        assert re.fullmatch(pattern[3:].replace(re.escape("{r}"), re.escape(str(world.root))).replace(
            "{r}", re.escape(str(world.root))), message), message
    else:
        assert message == pattern.replace("{r}", str(world.root))
    # nothing left behind: no database, no store folder, no (partial) output, anywhere
    assert _tree(world.root) == before
    assert _tree(tmp_path) == cwd_before
