"""Rebuild the vendored schemas in this folder from their sources (see README.md).

    python tests/data/schemas/extract.py K8S_SCHEMA_DIR KUBERAY_CRD_YAML

K8S_SCHEMA_DIR: ``kubernetes_validate/kubernetes-json-schema/v1.30.0-local-strict`` unpacked from
the kubernetes-validate wheel. KUBERAY_CRD_YAML: ``ray-operator/config/crd/bases/ray.io_raycronjobs.yaml``
at the KubeRay tag named in README.md.

Writes ``k8s-v1.30.0-cronjob-batch-v1.json``: the CronJob schema and the closure of the
definitions it reaches, as one self-contained JSON Schema (draft 2020-12, refs ``#/$defs/...``),
and ``kuberay-v1.7.0-raycronjob.json``: the CRD's ``openAPIV3Schema``, unchanged. One value a
line (``indent=0``) keeps diffs readable and the files small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = "io.k8s.api.batch.v1.CronJob"


def _refs(node: object):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def cronjob_closure(schema_dir: Path) -> dict:
    """The CronJob definition and everything it references, refs rewritten to ``#/$defs/NAME``."""
    text = (schema_dir / "_definitions.json").read_text().replace('"/api/_definitions.json#/$defs/', '"#/$defs/')
    defs = json.loads(text)["$defs"]
    seen: set[str] = set()
    todo = [ROOT]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(ref.rsplit("/", 1)[-1] for ref in _refs(defs[name]))
    top = json.loads((schema_dir / "cronjob-batch-v1.json").read_text().replace('"/api/_definitions.json#/$defs/', '"#/$defs/'))
    top["$defs"] = {name: defs[name] for name in sorted(seen)}
    return top


def crd_schema(crd_yaml: Path) -> dict:
    """The ``openAPIV3Schema`` of the CRD's one served version."""
    crd = yaml.safe_load(crd_yaml.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    return version["schema"]["openAPIV3Schema"]


def main(schema_dir: str, crd_yaml: str) -> None:
    for name, schema in (("k8s-v1.30.0-cronjob-batch-v1.json", cronjob_closure(Path(schema_dir))),
                         ("kuberay-v1.7.0-raycronjob.json", crd_schema(Path(crd_yaml)))):
        (HERE / name).write_text(json.dumps(schema, indent=0, sort_keys=True) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
