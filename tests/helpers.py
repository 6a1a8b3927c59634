"""Tiny models and data built in the test process: nothing is downloaded.

The pico BERT (hidden 32, 2 layers, a character-level vocabulary) follows mergekit's test models.
"""

from __future__ import annotations

import json
import random
import socket
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_char_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer over single characters (and ##continuations): any lowercase word fits.

    Built from a ``tokenizers`` object: transformers 5 ignores ``BertTokenizerFast(vocab_file=...)``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits)
    vocab = SPECIALS + chars + [f"##{c}" for c in chars]
    ids = {w: i for i, w in enumerate(vocab)}
    tk = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    directory.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert tok.tokenize("ab") == ["a", "##b"], "the pico tokenizer must split words into characters"


def make_tiny_bert(directory: Path, seed: int = 0, hidden: int = 32, layers: int = 2, dropout: float = 0.0) -> Path:
    """Save a random-initialised pico BERT body (BertModel) with its tokenizer to ``directory`` (``dropout``: its
    hidden and attention dropout, for tests where the random stream of training matters)."""
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    write_char_tokenizer(directory)
    vocab_size = len((directory / "vocab.txt").read_text().split())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(str(directory))
    return directory


def word_rows(rule: str, n: int = 120, seed: int = 0) -> tuple[list[str], list[str]]:
    """Random lowercase words with a label given by a simple, learnable rule."""
    g = torch.Generator().manual_seed(seed)
    letters = string.ascii_lowercase
    texts, labels = [], []
    for _ in range(n):
        length = int(torch.randint(3, 8, (1,), generator=g))
        word = "".join(letters[int(i)] for i in torch.randint(0, 26, (length,), generator=g))
        texts.append(word)
        if rule == "vowel":
            labels.append("vowel" if word[0] in "aeiou" else "consonant")
        elif rule == "length":
            labels.append("long" if length >= 5 else "short")
        elif rule == "half":  # first letter in a-m: balanced, and a pico model learns it in ~60 steps
            labels.append("early" if word[0] < "n" else "late")
        elif rule == "anyvowel":
            labels.append("yes" if any(c in "aeiou" for c in word) else "no")
        else:
            raise ValueError(rule)
    return texts, labels


def write_task_file(path: Path, rule: str, n: int = 120, seed: int = 0) -> Path:
    """Write a task table as Parquet, JSON Lines or CSV depending on the suffix."""
    texts, labels = word_rows(rule, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": texts, "label": labels})
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
    elif path.suffix == ".csv":
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels, strict=True)))
    else:
        raise ValueError(path)
    return path


def make_pretrained_pico(directory: Path, base: Path, rules: tuple[str, ...], steps: int = 1500) -> Path:
    """A pico BERT body "pre-trained" on the joint labels of ``rules`` (one class per combination).

    Merging works from a pretrained basin, not from random weights: experts fine-tuned from a random
    pico body average into noise. This gives the tests a base whose features the tasks share, as a
    real pretrained model's are (about 30 s on one core for 1500 steps).
    """
    import shutil

    from operators.data import Split, TaskData
    from operators.finetune import finetune
    from pipeline.spec import FinetuneSpec

    def joint(n: int, seed: int) -> tuple[list[str], list[str]]:
        cols = [word_rows(r, n, seed) for r in rules]
        return cols[0][0], ["/".join(x) for x in zip(*[c[1] for c in cols], strict=True)]

    texts, ys = joint(600, 11)
    names = sorted(set(ys))
    data = TaskData("joint", names, Split(texts, [names.index(y) for y in ys]), Split(texts[:50], [names.index(y) for y in ys[:50]]),
                    "in-process", "joint")
    finetune(base, data, FinetuneSpec(max_steps=steps, batch_size=32, learning_rate=3e-3, max_length=12), directory,
             torch_threads=1)
    shutil.rmtree(directory / "heads", ignore_errors=True)  # a base is a body
    (directory / "provenance.json").unlink(missing_ok=True)
    return directory


_MLFLOW_TEMPLATE: list[Path] = []


def seeded_mlflow_db(path: Path) -> Path:
    """An empty MLflow SQLite database at ``path`` (unless one is there), copied from one this process made
    once. MLflow builds a new file's schema with its migrations, about 4 s each; the suite would pay that
    for every spec. Making a fresh database stays under test wherever a spec does not come from these
    helpers: the quickstart, recurring rounds (two at once on a fresh file), bad input."""
    import shutil
    import tempfile

    if not _MLFLOW_TEMPLATE:
        from mlflow import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="mergeflow-test-mlflow-")) / "template.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments(max_results=1)  # migrates
        _MLFLOW_TEMPLATE.append(template)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MLFLOW_TEMPLATE[0], path)
    return path


def tiny_workflow_dict(tmp: Path, base: Path, *, seed_mlflow: bool = True, **overrides) -> dict:
    """A 2-task workflow over the pico BERT with everything (store, MLflow) inside ``tmp``; the MLflow
    file starts as an empty, already migrated database (``seeded_mlflow_db``) unless ``seed_mlflow`` is
    False (a test about a missing or fresh database)."""
    vowel = write_task_file(tmp / "data" / "vowel.parquet", "vowel", seed=1)
    length = write_task_file(tmp / "data" / "length.jsonl", "length", seed=2)
    spec = {
        "name": "tiny",
        "base_model": str(base),
        "tasks": [
            {"name": "vowel", "dataset": {"source": str(vowel)}, "labels": ["consonant", "vowel"]},
            {"name": "length", "dataset": {"source": str(length)}, "labels": ["short", "long"]},
        ],
        "finetune": {"max_steps": 6, "batch_size": 16, "learning_rate": 1e-3, "max_length": 12, "log_every": 2},
        "merge": {"method": "task_arithmetic", "params": {"scaling": 0.5}},
        "resources": {"num_cpus": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "store": {"root": str(tmp / "store")},
    }
    spec.update(overrides)
    if seed_mlflow and spec["tracking"]["uri"] == f"sqlite:///{tmp / 'mlflow.db'}":
        seeded_mlflow_db(tmp / "mlflow.db")
    return spec


def make_tiny_causal_lm(directory: Path, arch: str = "llama", seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random-initialised pico causal LM (``llama``, ``qwen2`` or ``gpt2``) with a character tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from operators.pretrain import char_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=48,
                             max_position_embeddings=128, **ids)
        LlamaForCausalLM(config).save_pretrained(str(directory))
    elif arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                             max_position_embeddings=128, **ids)
        Qwen2ForCausalLM(config).save_pretrained(str(directory))
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=2, n_positions=128,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        GPT2LMHeadModel(config).save_pretrained(str(directory))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return directory


def lm_rows(n: int = 96, seed: int = 0) -> dict[str, list[str]]:
    """A tiny prompt/answer task a pico LM learns in a few dozen steps: is the word's first letter a vowel?"""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))) for _ in range(n)]
    answers = ["yes" if w[0] in "aeiou" else "no" for w in words]
    return {"text": words, "answer": answers}


def write_lm_task(path: Path, rule: str, n: int = 96, seed: int = 0) -> Path:
    """A prompt/answer task table (columns ``text``, ``answer``) for a pico LM: vowel-first or long word."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))) for _ in range(n)]
    if rule == "vowel":
        answers = ["yes" if w[0] in "aeiou" else "no" for w in words]
    elif rule == "length":
        answers = ["long" if len(w) >= 5 else "short" for w in words]
    else:
        raise ValueError(rule)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": words, "answer": answers}), path)
    return path


def tiny_lm_workflow_dict(tmp: Path, base: Path, **overrides) -> dict:
    """A 2-task LoRA causal-LM workflow over a pico LM, everything (store, MLflow) inside ``tmp``."""
    tasks = []
    for rule, question in (("vowel", "{text} vowel?"), ("length", "{text} long?")):
        src = write_lm_task(tmp / "data" / f"{rule}.parquet", rule, seed=len(rule))
        tasks.append({"name": rule, "type": "causal_lm", "dataset": {
            "source": str(src), "template": {"prompt": question, "response": " {answer}"}, "answer_column": "answer"}})
    spec = {
        "name": "tinylm",
        "base_model": str(base),
        "tasks": tasks,
        "finetune": {"mode": "lora", "lora": {"r": 4, "alpha": 8}, "max_steps": 6, "batch_size": 16,
                     "learning_rate": 5e-3, "max_length": 24, "log_every": 2},
        "merge": {"method": "task_arithmetic", "params": {"scaling": 0.5}},
        "resources": {"num_cpus": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "store": {"root": str(tmp / "store")},
    }
    spec.update(overrides)
    if spec["tracking"]["uri"] == f"sqlite:///{tmp / 'mlflow.db'}":
        seeded_mlflow_db(tmp / "mlflow.db")
    return spec


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct free loopback ports (all held open at once while they are picked, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_mlflow_server(port: int, backend_uri: str, artifacts_dir: Path, log_file: Path | None = None,
                        wait: bool = True):
    """A real ``mlflow server`` on loopback with proxied artifacts; returns its process once /health answers
    (``wait=False``: at once; :func:`wait_for_mlflow_server` waits later, so its start overlaps other set-up)."""
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    out = log_file.open("ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts_dir), "--serve-artifacts",
         "--workers", "1"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runners: less CPU
    if wait:
        wait_for_mlflow_server(proc, port, log_file)
    return proc


def wait_for_mlflow_server(proc, port: int, log_file: Path | None = None) -> None:
    """Return once the server of :func:`start_mlflow_server` answers /health (90 s at most)."""
    import time
    import urllib.request

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited at start (code {proc.returncode})" + (
                    f": {log_file.read_text()[-2000:]}" if log_file else "")) from None
            time.sleep(0.3)
    stop_process_group(proc)
    raise RuntimeError("mlflow server did not answer /health within 90 s")


def stop_process_group(proc, grace_s: float = 5.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL after ``grace_s``."""
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Postgres:
    """A throwaway PostgreSQL server on a loopback port (Debian's binaries), for the tracking-server test.

    ``start()`` returns a SQLAlchemy URI or raises ``RuntimeError`` with the reason it cannot run here.
    PostgreSQL refuses to run as root, so under root its data folder belongs to the ``postgres`` user
    and its programs run as that user (``runuser``).
    """

    def __init__(self, port: int):
        self.port = port
        self.dir: Path | None = None
        self._as: list[str] = []
        self._bin: Path | None = None

    def _run(self, *cmd: str, timeout: float = 60):
        import subprocess

        return subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=timeout)

    def start(self) -> str:
        import os
        import pwd
        import shutil
        import tempfile

        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or (
            [Path(p)] if (p := shutil.which("initdb")) else [])
        if not found:
            raise RuntimeError("no PostgreSQL server binaries (Debian package 'postgresql'; initdb not found)")
        self._bin = found[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="mergeflow-pg-"))  # not under pytest's 0700 tmp: postgres reads it
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        steps = [
            [str(self._bin / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync"],
            [str(self._bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
             "-o", f"-p {self.port} -k {self.dir} -h 127.0.0.1 -c fsync=off", "start"],
            [str(self._bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow"],
        ]
        for cmd in steps:
            res = self._run(*cmd)
            if res.returncode != 0:
                log = (self.dir / "server.log").read_text()[-1500:] if (self.dir / "server.log").exists() else ""
                self.stop()
                raise RuntimeError(f"{Path(cmd[0]).name} failed: {(res.stderr or res.stdout).strip()[-1500:]} {log}")
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        import shutil

        if self.dir is None:
            return
        if self._bin is not None and (self.dir / "data" / "postmaster.pid").exists():
            self._run(str(self._bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


# --- the quickstart, started in the background (tests/conftest.py) ---------------------------------------

QUICKSTART_TEST = "tests/test_quickstart.py::test_quickstart_runs_and_shows_what_merging_costs"
_QUICKSTART: dict = {}


def quickstart_command(workdir: Path) -> list[str]:
    """`mergeflow run workflows/quickstart.yaml --json` with its MLflow file and store in ``workdir``."""
    import sys

    root = Path(__file__).resolve().parents[1]
    return [str(Path(sys.executable).parent / "mergeflow"), "run", str(root / "workflows" / "quickstart.yaml"),
            "--json", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--store", str(workdir / "store")]


def start_quickstart() -> None:
    """Start the quickstart in a fresh directory, in the background; :func:`quickstart_result` waits for it."""
    import subprocess
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="mergeflow-quickstart-test-"))
    with (workdir / "stdout.txt").open("w") as out, (workdir / "stderr.txt").open("w") as err:
        _QUICKSTART.update(workdir=workdir, proc=subprocess.Popen(quickstart_command(workdir), cwd=workdir,
                                                                  stdout=out, stderr=err))


def quickstart_result(tmp_path: Path, timeout: float = 900) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the quickstart: the background run's, or one run here in ``tmp_path``."""
    import subprocess

    proc = _QUICKSTART.get("proc")
    if proc is None:
        done = subprocess.run(quickstart_command(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)
        return done.returncode, done.stdout, done.stderr
    workdir = _QUICKSTART["workdir"]
    try:
        code = proc.wait(timeout=timeout)
        return code, (workdir / "stdout.txt").read_text(), (workdir / "stderr.txt").read_text()
    finally:
        stop_quickstart()  # (removes its directory)


def wait_for_background_quickstart(timeout: float = 900) -> None:
    """Return once the background quickstart (if any) has ended; its result stays for its test."""
    proc = _QUICKSTART.get("proc")
    if proc is not None:
        proc.wait(timeout=timeout)


def stop_quickstart() -> None:
    """Stop a background quickstart still running (SIGTERM: its driver stops its private Ray cluster)."""
    import shutil
    import subprocess

    proc = _QUICKSTART.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc is not None and _QUICKSTART.get("workdir"):
        shutil.rmtree(_QUICKSTART.pop("workdir"), ignore_errors=True)
