#!/usr/bin/env bash
# The README's "Recurring rounds" story, end to end (run from the repository root, after `make setup`):
#   round 1 fuses two tasks, round 2 adds a third, round 3 brings shuffled labels and the gate rejects it.
set -euo pipefail
SPEC=workflows/recurring-quickstart.yaml
MF=${MERGEFLOW:-.venv/bin/mergeflow}
PY=${PYTHON:-.venv/bin/python}

$MF contribute $SPEC packaged:vader_sentiment --task sentiment --id 001-sentiment --contributor alice
$MF contribute $SPEC packaged:brill_pos --task pos --id 002-pos --contributor bob
$MF round $SPEC                                   # round 1: sentiment + pos → promoted

$MF contribute $SPEC packaged:word_language --task language --id 003-language --contributor carol
$MF round $SPEC                                   # round 2: adds language → promoted

$PY workflows/recurring-quickstart/shuffle_labels.py packaged:vader_sentiment /tmp/sentiment-shuffled.jsonl
$MF contribute $SPEC /tmp/sentiment-shuffled.jsonl --task sentiment --id 004-sentiment-relabelled --contributor dave
$MF round $SPEC                                   # round 3: shuffled labels → rejected, champion stays

$MF round $SPEC                                   # nothing new: nothing to do, nothing trained
$MF history $SPEC --plot recurring-history.png
