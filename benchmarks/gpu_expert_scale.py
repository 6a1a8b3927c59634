"""One expert at a realistic size on a GPU: tokens/s and peak memory of mergeflow's fine-tune operator.

    python benchmarks/gpu_expert_scale.py [--hidden 2048 --layers 16] [--steps 20] [--seq 256]

Builds a random-config Llama (default: TinyLlama's shape, 1.1B parameters with a 32k vocabulary) in
a temp dir, then fine-tunes one causal-LM expert from it with ``operators.finetune.finetune`` on
synthetic prompt/response rows, in turn: LoRA (r 16 on every projection), LoRA with gradient
checkpointing, and a full fine-tune; each with ``precision: auto`` (bf16 autocast where the device
supports it). Prints steps, tokens/s, peak GPU memory and trainable parameters of each. Random
weights and data: this measures speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="lora,lora+ckpt,full")
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from operators.data import Split, TaskData
    from operators.finetune import finetune
    from pipeline.spec import FinetuneSpec, LoraSpec

    work = Path(tempfile.mkdtemp(prefix="mergeflow-gpu-scale-"))
    base = work / "base"
    # a word-level tokenizer over `vocab` made-up words, so every row is exactly `seq` tokens
    rng = random.Random(0)
    words = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(args.vocab - 4)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.save_pretrained(str(base))
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate, max_position_embeddings=max(2048, 2 * args.seq),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    start = time.perf_counter()
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(base))
    print(f"built a {args.layers} x {args.hidden} Llama in {time.perf_counter() - start:.0f}s (full fine-tune: "
          "trainable = every parameter)", flush=True)

    n_rows = args.steps * args.batch_size
    half = args.seq // 2
    rows_prompt = [" ".join(rng.choice(words) for _ in range(half)) for _ in range(n_rows)]
    rows_resp = [" " + " ".join(rng.choice(words) for _ in range(args.seq - half - 1)) for _ in range(n_rows)]
    split = Split(texts=rows_resp, labels=[], prompts=rows_prompt)
    data = TaskData("synthetic", [], split, split, "synthetic", "synthetic", "causal_lm")

    print(f"\n{'mode':<12} {'steps':>5} {'seconds':>8} {'tokens/s':>10} {'peak GPU GiB':>13} {'trainable':>14} precision")
    for mode in args.modes.split(","):
        settings = FinetuneSpec(
            mode="full" if mode == "full" else "lora", lora=LoraSpec(r=16, alpha=32), max_steps=args.steps,
            batch_size=args.batch_size, max_length=args.seq + 2, learning_rate=1e-4 if mode == "full" else 1e-3,
            gradient_checkpointing=mode.endswith("ckpt"), log_every=args.steps)
        res = finetune(base, data, settings, work / mode, device=args.device)
        print(f"{mode:<12} {res.steps:>5} {res.seconds:>8.2f} {res.tokens_per_second:>10.0f} "
              f"{res.peak_gpu_bytes / 2**30:>13.2f} {res.trainable_parameters:>14,} {res.precision}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
