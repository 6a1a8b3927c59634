"""Write a copy of a task table with its labels shuffled (seeded): a contribution the gate must reject.

    python workflows/recurring-quickstart/shuffle_labels.py packaged:vader_sentiment /tmp/shuffled.jsonl

The texts stay; each label moves to another row, so the table looks like a normal contribution
(same columns, same label set, same label counts) but teaches nothing. This stands in for a
contributor's broken labelling pipeline in the README's three-round story.
"""

from __future__ import annotations

import json
import random
import sys

from operators.data import read_table


def main(source: str, out: str, seed: int = 0) -> None:
    table = read_table(source).to_pydict()
    labels = list(table["label"])
    random.Random(seed).shuffle(labels)
    with open(out, "w") as f:
        for text, label in zip(table["text"], labels, strict=True):
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    print(f"wrote {len(labels)} rows of {source} with shuffled labels to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
