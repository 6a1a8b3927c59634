"""Task data from Parquet / JSON Lines / CSV / packaged lexicons; fine-tuning is deterministic."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from operators.data import DataError, load_task_data
from operators.packaged_data import PACKAGED_DATASETS, load_packaged
from operators.tensor_io import load_state_dict
from pipeline.spec import DatasetSpec, FinetuneSpec
from tests.helpers import write_task_file


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_formats_read_the_same_rows(tmp_path, suffix):
    path = write_task_file(tmp_path / f"t{suffix}", "vowel", n=50)
    data = load_task_data("t", DatasetSpec(source=str(path), eval_fraction=0.2), ["consonant", "vowel"])
    assert len(data.train) == 40 and len(data.eval) == 10
    ref = load_task_data("t", DatasetSpec(source=str(write_task_file(tmp_path / "r.parquet", "vowel", n=50))),
                         ["consonant", "vowel"])
    assert data.train.texts == ref.train.texts and data.eval.labels == ref.eval.labels
    assert data.digest == ref.digest


def test_file_uri_goes_through_pyarrow_fs(tmp_path):
    path = write_task_file(tmp_path / "t.parquet", "length", n=30)
    data = load_task_data("t", DatasetSpec(source=path.as_uri()), ["short", "long"])
    assert len(data.train) + len(data.eval) == 30


def test_separate_train_and_eval_files_and_caps(tmp_path):
    tr = write_task_file(tmp_path / "train.parquet", "vowel", n=60, seed=1)
    ev = write_task_file(tmp_path / "eval.csv", "vowel", n=20, seed=2)
    ds = DatasetSpec(train=str(tr), eval=str(ev), max_train_examples=25)
    data = load_task_data("t", ds, ["consonant", "vowel"])
    assert (len(data.train), len(data.eval)) == (25, 20)


def test_integer_labels_map_to_positions(tmp_path):
    p = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"sentence": ["a", "b", "c", "d"], "y": [0, 1, 1, 0]}), p)
    ds = DatasetSpec(source=str(p), text_column="sentence", label_column="y", eval_fraction=0.5)
    data = load_task_data("t", ds, ["neg", "pos"])
    assert sorted(data.train.labels + data.eval.labels) == [0, 0, 1, 1]


def test_data_errors_say_what_to_fix(tmp_path):
    p = write_task_file(tmp_path / "t.parquet", "vowel", n=10)
    with pytest.raises(DataError, match=r"no text column 'sentence'; the columns are \['text', 'label'\]\. Set dataset.text_column"):
        load_task_data("t", DatasetSpec(source=str(p), text_column="sentence"), ["consonant", "vowel"])
    with pytest.raises(DataError, match=r"has label 'vowel', which is not among the declared labels \['a', 'consonant'\]"):
        load_task_data("t", DatasetSpec(source=str(p)), ["a", "consonant"])
    with pytest.raises(DataError, match="no such file"):
        load_task_data("t", DatasetSpec(source=str(tmp_path / "missing.parquet")), ["a", "b"])
    with pytest.raises(DataError, match="cannot tell the file format from the extension '.txt'"):
        load_task_data("t", DatasetSpec(source=str(tmp_path / "x.txt")), ["a", "b"])
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": ["a"], "label": ["x"]}), one)
    with pytest.raises(DataError, match="has 1 rows; need at least 2"):
        load_task_data("t", DatasetSpec(source=str(one)), ["x", "y"])
    empty_eval = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), empty_eval)
    with pytest.raises(DataError, match="the eval split is empty"):
        load_task_data("t", DatasetSpec(train=str(p), eval=str(empty_eval)), ["consonant", "vowel"])
    with pytest.raises(DataError, match="unknown packaged dataset 'imdb'"):
        load_task_data("t", DatasetSpec(source="packaged:imdb"), ["a", "b"])


@pytest.mark.parametrize("name", sorted(PACKAGED_DATASETS))
def test_packaged_datasets_have_real_balanced_labels(name):
    table = load_packaged(name)
    _, labels, _ = PACKAGED_DATASETS[name]
    counts = Counter(table.column("label").to_pylist())
    assert set(counts) == set(labels)
    assert table.num_rows >= 1000
    assert max(counts.values()) <= 1200
    assert len(set(table.column("text").to_pylist())) == table.num_rows, "no duplicate words"


def test_packaged_labels_are_the_lexicons_own():
    rows = dict(zip(load_packaged("vader_sentiment").column("text").to_pylist(),
                    load_packaged("vader_sentiment").column("label").to_pylist(), strict=True))
    # VADER rates these words far from zero; anyone can check vader_lexicon.txt
    assert rows.get("abuse") == "negative"
    assert any(rows.get(w) == "positive" for w in ("love", "wonderful", "excellent", "happy"))
    pos = dict(zip(load_packaged("brill_pos").column("text").to_pylist(),
                   load_packaged("brill_pos").column("label").to_pylist(), strict=True))
    assert (pos["ablaze"], pos["joyfully"], pos["abandon"]) == ("adjective", "adverb", "verb")
    emo = dict(zip(load_packaged("nrc_emotion").column("text").to_pylist(),
                   load_packaged("nrc_emotion").column("label").to_pylist(), strict=True))
    assert (emo["glee"], emo["radioactive"], emo["disappointing"]) == ("joy", "fear", "sadness")
    lang = dict(zip(load_packaged("word_language").column("text").to_pylist(),
                    load_packaged("word_language").column("label").to_pylist(), strict=True))
    assert Counter(lang.values()) == Counter({"de": 600, "en": 600, "es": 600, "fr": 600})


def test_finetune_is_deterministic_and_learns(tiny_base, tmp_path):
    from operators.finetune import finetune

    src = write_task_file(tmp_path / "v.parquet", "vowel", n=120)
    data = load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])
    settings = FinetuneSpec(max_steps=30, batch_size=16, learning_rate=2e-3, log_every=5, seed=3)
    logged = []
    r1 = finetune(tiny_base, data, settings, tmp_path / "a", log=lambda s, m: logged.append((s, m["train_loss"])))
    r2 = finetune(tiny_base, data, settings, tmp_path / "b")
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, same weights"
    assert r1.losses == r2.losses
    assert [s for s, _ in logged] == [5, 10, 15, 20, 25, 30]
    assert r1.losses[-1][1] < r1.losses[0][1], "the loss goes down"
    r3 = finetune(tiny_base, data, FinetuneSpec(**{**settings.model_dump(), "seed": 4}), tmp_path / "c")
    assert r3.losses != r1.losses


def test_freeze_embeddings_keeps_them_equal_to_the_base(tiny_base, tmp_path):
    from operators.finetune import finetune

    src = write_task_file(tmp_path / "v.parquet", "vowel", n=60)
    data = load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])
    finetune(tiny_base, data, FinetuneSpec(max_steps=5, batch_size=16, learning_rate=1e-2, freeze_embeddings=True), tmp_path / "e")
    base, exp = load_state_dict(tiny_base), load_state_dict(tmp_path / "e")
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(base[key], exp[key])
    assert not torch.equal(base["encoder.layer.0.attention.self.query.weight"], exp["encoder.layer.0.attention.self.query.weight"])


def test_head_carries_over_when_the_start_model_has_one(tiny_base, tmp_path):
    from operators.finetune import finetune

    src = write_task_file(tmp_path / "v.parquet", "vowel", n=60)
    data = load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])
    s = FinetuneSpec(max_steps=3, batch_size=16, learning_rate=1e-3)
    first = finetune(tiny_base, data, s, tmp_path / "r1")
    second = finetune(tmp_path / "r1", data, s, tmp_path / "r2")
    assert (first.head_init, second.head_init) == ("fresh", "carried over")


def test_linear_probe_fits_the_training_split(tiny_base, tmp_path):
    from operators.evaluate import classification_metrics, linear_probe

    # evaluate the probe on its own training rows: a head fitted on them must beat the majority class
    src = write_task_file(tmp_path / "v.parquet", "vowel", n=200)
    data = load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])
    on_train = type(data)(data.name, data.label_names, data.train, data.train, data.source, data.digest)
    m = linear_probe(tiny_base, on_train, steps=400, lr=5e-2)
    majority = max(Counter(data.train.labels).values()) / len(data.train)
    assert m["n"] == len(data.train)
    assert m["accuracy"] > majority
    # metric definitions on a case worked out by hand: 3 of 4 right; F1(0)=2/3, F1(1)=4/5
    hand = classification_metrics([0, 1, 1, 1], [0, 0, 1, 1], 2)
    assert hand["accuracy"] == 0.75
    assert abs(hand["macro_f1"] - (2 / 3 + 4 / 5) / 2) < 1e-12


def test_length_batched_inference_keeps_each_example_in_its_place(tiny_experts):
    """Evaluation batches examples of similar length (less padding); every prediction and every captured
    head input still belongs to its own example: equal to scoring each example alone."""
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.data import Split
    from operators.evaluate import _features, length_batches, predict

    ckpt = tiny_experts["length"]
    model = load_task_model(ckpt, "length").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    texts = ["a", "abcdefghij", "abc", "ab", "abcdefgh", "abcd", "b", "abcdefghijkl", "xyz", "ba"]
    split = Split(texts=texts, labels=[0] * len(texts))
    batches = length_batches(tokenizer, texts, batch_size=3, max_length=16)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # shortest first: each batch pads to little
    with torch.no_grad():
        alone = [model(**tokenizer([t], return_tensors="pt")).logits[0] for t in texts]
    assert predict(model, tokenizer, split, batch_size=3, max_length=16).tolist() == [int(x.argmax()) for x in alone]
    # the head inputs (what a linear probe trains on), captured batch by batch, put back in the split's order
    feats = _features(model, tokenizer, split, model.classifier, max_length=16, device="cpu")
    with torch.no_grad():
        logits = model.classifier(feats)
    torch.testing.assert_close(logits, torch.stack(alone), rtol=1e-5, atol=1e-5)
