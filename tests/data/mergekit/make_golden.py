"""Regenerate the mergekit reference outputs that tests/test_mergekit_compat.py compares against.

Builds a tiny Llama (hidden 16, 2 layers, vocabulary 32) and three experts (base + Gaussian noise),
saves them under models/, and runs real mergekit on every config in configs/, keeping each output's
tensors as expected/<config>.safetensors. Run it with a mergekit install of its own:

    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && \\
        /tmp/mk/bin/pip install mergekit==0.1.5 -c <(echo torch==2.13.0)
    .venv/bin/python tests/data/mergekit/make_golden.py --mergekit-bin /tmp/mk/bin/mergekit-yaml

The inputs are stored too, so the test never depends on random number generation being identical
across machines or torch versions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("base", "e0", "e1", "e2")
# five layers, for parameters given as gradients over the layers (t = 0, 1/4, 1/2, 3/4, 1)
DEEP_MODELS = ("d_base", "d0", "d1", "d2")
# character tokenizers that differ: t0 adds "<tool>" and "zz", t1 adds "zz" and "qq", t2 has the base's
VOCAB_MODELS = ("t_base", "t0", "t1", "t2")
ADDED = {"t0": ["<tool>", "zz"], "t1": ["zz", "qq"], "t2": []}


def build_vocab_models() -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from operators.pretrain import char_tokenizer

    torch.manual_seed(2)
    tok = char_tokenizer()
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=False, max_position_embeddings=64)
    base = HERE / "models" / "t_base"
    for name in VOCAB_MODELS:
        shutil.rmtree(HERE / "models" / name, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    for f in base.iterdir():
        if f.name not in ("config.json", "model.safetensors") and not f.name.startswith(("tokenizer", "special")):
            f.unlink()
    sd = load_file(base / "model.safetensors")
    for i, name in enumerate(VOCAB_MODELS[1:]):
        g = torch.Generator().manual_seed(20 + i)
        out = HERE / "models" / name
        out.mkdir()
        t = char_tokenizer()
        t.add_tokens(ADDED[name])
        new = {k: (v + 0.02 * torch.randn(v.shape, generator=g)) for k, v in sd.items()}
        for k in ("model.embed_tokens.weight", "lm_head.weight"):  # rows of the added tokens: fresh values
            new[k] = torch.cat([new[k], torch.randn(len(t) - len(tok), new[k].shape[1], generator=g)])
        save_file({k: v.contiguous() for k, v in new.items()}, out / "model.safetensors", metadata={"format": "pt"})
        c = json.loads((base / "config.json").read_text())
        c["vocab_size"] = len(t)
        (out / "config.json").write_text(json.dumps(c, indent=2))
        t.save_pretrained(out)


def build_models(names: tuple[str, ...] = MODELS, layers: int = 2, seed: int = 0) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=32, tie_word_embeddings=False, max_position_embeddings=64)
    base = HERE / "models" / names[0]
    for name in names:
        shutil.rmtree(HERE / "models" / name, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
    for f in base.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    sd = load_file(base / "model.safetensors")
    for i, name in enumerate(names[1:]):
        g = torch.Generator().manual_seed(10 + i)
        out = HERE / "models" / name
        out.mkdir()
        save_file({k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()},
                  out / "model.safetensors", metadata={"format": "pt"})
        shutil.copy2(base / "config.json", out / "config.json")


def config_text(path: Path, models_root: Path) -> str:
    return string.Template(path.read_text()).substitute({m: str(models_root / m) for m in MODELS + DEEP_MODELS + VOCAB_MODELS})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit-bin", required=True)
    ap.add_argument("--keep-models", action="store_true", help="reuse models/ instead of rebuilding it")
    args = ap.parse_args()
    if not args.keep_models:
        build_models()
    if not args.keep_models or not (HERE / "models" / DEEP_MODELS[0]).exists():
        build_models(DEEP_MODELS, layers=5, seed=1)
    if not args.keep_models or not (HERE / "models" / VOCAB_MODELS[0]).exists():
        build_vocab_models()
    expected = HERE / "expected"
    shutil.rmtree(expected, ignore_errors=True)
    expected.mkdir()
    for cfg in sorted((HERE / "configs").glob("*.yaml")):
        with tempfile.TemporaryDirectory() as tmp:
            filled = Path(tmp) / cfg.name
            filled.write_text(config_text(cfg, HERE / "models"))
            out = Path(tmp) / "out"
            subprocess.run([args.mergekit_bin, str(filled), str(out), "--no-write-model-card", "--quiet",
                            "--no-copy-tokenizer"], check=True)
            shards = sorted(out.glob("*.safetensors"))
            assert len(shards) == 1, shards
            shutil.copy2(shards[0], expected / f"{cfg.stem}.safetensors")
            if (out / "tokenizer.json").is_file():  # a merge of vocabularies: the output's token → id
                from transformers import AutoTokenizer

                vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
                (expected / f"{cfg.stem}.vocab.json").write_text(json.dumps(vocab, sort_keys=True, indent=0))
            print(f"{cfg.stem}: {shards[0].stat().st_size} bytes")


if __name__ == "__main__":
    main()
