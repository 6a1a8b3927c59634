"""Where a tensor sits in a model's stack of layers: its layer index from its name, and the layer count.

Layers are found by name, ``….layers.N.…`` (Llama, Mistral, Qwen, Gemma …), ``….h.N.…`` (GPT-2) or
``….layer.N.…`` / ``….blocks.N.…``; the layer count by ``num_hidden_layers`` / ``n_layer`` in config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from operators.errors import MergeError

LAYER_RE = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h|layer|blocks)\.)(?P<idx>\d+)(?P<post>\..+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(model: Path) -> tuple[str, int]:
    """The config key that holds ``model``'s layer count, and the count."""
    cfg = json.loads((model / "config.json").read_text())
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            return key, cfg[key]
    raise MergeError(f"{model}/config.json: no layer count ({', '.join(LAYER_COUNT_KEYS)}); a merge by layers "
                     "needs one")


def layer_index(key: str) -> int | None:
    """The layer the tensor ``key`` belongs to (None outside the layers)."""
    m = LAYER_RE.match(key)
    return None if m is None else int(m["idx"])
