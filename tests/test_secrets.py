"""No secret in the lineage: a password or key in a URI is masked before anything is recorded or printed.

The end-to-end check (a workflow whose store URI carries S3 keys, on a real S3 API) is in
tests/test_s3_store.py; these are the rules, case by case.
"""

from __future__ import annotations

import pytest

from pipeline.redact import redact_text, redact_uri, redact_values, redacted_fields


@pytest.mark.parametrize(("uri", "shown"), [
    # a login stays, its password does not
    ("postgresql://mlflow:pw0rd@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:***@h/db"),
    ("mysql://root:hunter2@127.0.0.1/mlflow", "mysql://root:***@127.0.0.1/mlflow"),
    ("https://alice:s3cret@mlflow.example.com:443", "https://alice:***@mlflow.example.com:443"),
    ("https://ghp_token@mlflow.example.com", "https://***@mlflow.example.com"),  # a lone user part is a token
    # on storage the whole user part is a key pair
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/wf?endpoint_override=127.0.0.1:9000&scheme=http",
     "s3://***@bucket/wf?endpoint_override=127.0.0.1:9000&scheme=http"),
    ("s3://bucket/wf?access_key=AKIAEXAMPLE&secret_key=wJalr&region=us-east-1&session_token=FwoG",
     "s3://bucket/wf?access_key=***&secret_key=***&region=us-east-1&session_token=***"),
    ("abfs://container/x?sig=abc%3D&sv=2024-01-01", "abfs://container/x?sig=***&sv=2024-01-01"),
    ("gs://bucket/data.parquet?token=ya29.a0", "gs://bucket/data.parquet?token=***"),
])
def test_passwords_and_keys_are_masked(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # masking twice changes nothing


@pytest.mark.parametrize("plain", [
    "sqlite:///mlflow.db", "sqlite:////abs/path/mlflow.db", "mergeflow-store", "s3://bucket/prefix",
    "http://127.0.0.1:5000", "packaged:all-minilm-l6-v2", "file:///tmp/store", "{text} sentiment:",
    "s3://bucket/wf?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1", "hdfs://namenode:8020/x",
])
def test_uris_without_secrets_are_unchanged(plain):
    assert redact_uri(plain) == plain


def test_a_spec_as_recorded_text_and_values():
    text = ("name: wf\nstore:\n  root: s3://AK:SK@bucket/wf?endpoint_override=h:1\n"
            "tracking:\n  uri: postgresql://u:pw@db/mlflow\ntasks:\n- name: a\n  dataset: {source: data/a.csv}\n")
    shown = redact_text(text)
    assert "SK" not in shown and "pw" not in shown and "AK:" not in shown
    assert "s3://***@bucket/wf?endpoint_override=h:1" in shown and "postgresql://u:***@db/mlflow" in shown
    spec = {"store": {"root": "s3://AK:SK@bucket/wf"}, "tracking": {"uri": "sqlite:///x.db"},
            "tasks": [{"dataset": {"source": "gs://b/d.parquet?token=t"}}, {"dataset": {"source": "d.csv"}}]}
    assert redact_values(spec) == {"store": {"root": "s3://***@bucket/wf"}, "tracking": {"uri": "sqlite:///x.db"},
                                   "tasks": [{"dataset": {"source": "gs://b/d.parquet?token=***"}},
                                             {"dataset": {"source": "d.csv"}}]}
    assert redacted_fields(spec) == ["store.root", "tasks[0].dataset.source"]


def test_the_tracking_server_message_names_no_password():
    """A tracking server that does not answer: the message (printed, and tagged on the run) masks its password."""
    from pipeline.lineage.record import Lineage

    lineage = Lineage.__new__(Lineage)  # only what _retry reads of it: no server is contacted
    lineage.tracking_uri, lineage.retry_seconds, lineage.busy_seconds, lineage._depth = \
        "https://alice:s3cret@127.0.0.1:9", 0.01, 0.0, 0

    from pipeline.lineage.retry import TrackingUnavailable, _down_since, _retry

    @_retry
    def call(_self, run_id: str) -> None:
        raise ConnectionError("Max retries exceeded with url: https://alice:s3cret@127.0.0.1:9/api (connection refused)")

    try:
        with pytest.raises(TrackingUnavailable) as err:
            call(lineage, "0123456789abcdef0123")
    finally:
        _down_since.clear()
    assert "s3cret" not in str(err.value) and "https://alice:***@127.0.0.1:9" in str(err.value)
