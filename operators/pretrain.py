"""``packaged:word-llama``: a small causal LM that mergeflow pre-trains itself on packaged text.

No pretrained causal LM ships inside a package, and nothing may be downloaded at run time, so the
LoRA causal-LM workflow starts from a model built here, honestly: a Llama architecture (hidden 128,
4 layers, 4 heads; 0.82M parameters) with a character-level tokenizer, pre-trained for 400
steps of next-token prediction on the words of the packaged lexicons (every word of the four
packaged tables, without their labels), packed into lines of space-separated words. It learns to
spell words of four languages; it knows nothing of the tasks until the experts are fine-tuned.

Built once per machine into ``$MERGEFLOW_CACHE`` (default ``~/.cache/mergeflow``), atomically (a
half-built model is never visible), deterministic for a given torch build and thread count. The
folder name carries a hash of the recipe, so a changed recipe builds a new model.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import string
import time
import uuid
from pathlib import Path

import torch

from operators.packaged_models import cache_root

RECIPE = {
    "architecture": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "intermediate_size": 352, "max_position_embeddings": 128, "rope_theta": 10000.0},
    "pretrain": {"steps": 400, "batch_size": 16, "seq_chars": 64, "learning_rate": 3e-3, "warmup": 30,
                 "seed": 0, "threads": 1},
    "corpus": ["vader_sentiment", "nrc_emotion", "brill_pos", "word_language"],
    "version": 1,
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
EXTRA_CHARS = "àáâäæçèéêëíîïñóôöœßùúûü"


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def char_tokenizer():
    """A character-level tokenizer (printable ASCII + common accented letters), saved with the model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c") | set(EXTRA_CHARS))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def corpus_words() -> list[str]:
    """Every word of the packaged tables (labels dropped), sorted and de-duplicated."""
    from operators.packaged_data import load_packaged

    words: set[str] = set()
    for name in RECIPE["corpus"]:
        words.update(load_packaged(name).column("text").to_pylist())
    return sorted(words)


def pretrain_word_llama(out_dir: str | Path, *, steps: int | None = None, log=print) -> Path:
    """Build and pre-train the word-llama into ``out_dir`` (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from operators.checkpoint import quiet_transformers

    quiet_transformers()
    cfg = RECIPE["pretrain"]
    steps = steps or cfg["steps"]
    torch.manual_seed(cfg["seed"])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        tokenizer = char_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=True, **RECIPE["architecture"])
        model = LlamaForCausalLM(config)
        words = corpus_words()
        rng = random.Random(cfg["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * max(0.05, 1 - s / steps))
        start = time.perf_counter()
        model.train()
        for step in range(1, steps + 1):
            lines = []
            for _ in range(cfg["batch_size"]):  # a line of random words, as many as fit
                line = rng.choice(words)
                while len(line) < cfg["seq_chars"]:
                    line += " " + rng.choice(words)
                lines.append(line[:cfg["seq_chars"]])
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(x)["input_ids"] for x in lines])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == steps:
                log(f"[word-llama] pre-training step {step}/{steps}: loss {loss.item():.3f} "
                    f"({time.perf_counter() - start:.0f}s)")
        model.eval()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "mergeflow.json").write_text(json.dumps({
            "kind": "base", "name": "word-llama", "recipe": RECIPE, "recipe_hash": recipe_hash(),
            "final_loss": loss.item(), "words": len(words), "seconds": time.perf_counter() - start,
        }, indent=2, sort_keys=True))
        return out_dir
    finally:
        torch.set_num_threads(previous_threads)


def packaged_word_llama() -> Path:
    """The cached word-llama, built on first use (atomically: built aside, then renamed into place)."""
    final = cache_root() / f"word-llama-{recipe_hash()}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        print(f"[word-llama] first use: pre-training the packaged causal LM into {final} (once per machine)",
              flush=True)
        pretrain_word_llama(tmp, log=lambda m: print(m, flush=True))
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
