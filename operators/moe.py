"""A mixture of experts from dense experts (``mergeflow moe``; mergekit's ``mergekit-moe``, Mixtral output).

Given a dense base (Llama or Mistral) and E experts fine-tuned from it, the output is a Mixtral checkpoint:
attention, norms, embeddings and output head from the base; in every layer, expert e's MLP is expert
model e's (``gate_proj``/``up_proj``/``down_proj``, ``down_proj`` times its ``residual_scale`` if given),
stored as transformers' fused ``experts.gate_up_proj`` (E × 2I × H, gate rows then up rows) and
``experts.down_proj`` (E × H × I); each layer's router ``mlp.gate.weight`` (E × H) has one row per expert:

- ``hidden`` (default) / ``hidden_last``: the base model's hidden state entering that layer at each
  positive prompt's last token, averaged over the prompts, minus the same over the negative prompts,
  normalized to unit length (``hidden_avg``: every token's, averaged);
- ``cheap_embed``: the prompts' summed token embeddings, normalized, the same for every layer;
- ``random`` (standard normal) and ``uniform_random`` (±1/√H, nn.Linear's initialisation), seeded.

Each token goes to its ``experts_per_token`` highest-scoring experts (Mixtral's top-k routing). Hidden
states are taken in float32 at the true last token of each prompt (mergekit pads on the right and takes
the last position, which for a shorter prompt is padding). The config is mergekit-moe's YAML::

    base_model: ./base
    gate_mode: hidden
    experts_per_token: 2
    experts:
      - source_model: ./expert-code
        positive_prompts: ["Write a Python function"]
        negative_prompts: ["Tell me a story"]     # optional
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from operators.checkpoint_files import copy_tokenizer, write_provenance
from operators.errors import MergeError
from operators.merge.output import _BackgroundWriter, atomic_output_dir
from operators.tensor_io import ShardedWriter, TensorReader

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
DENSE_TYPES = ("llama", "mistral")
MIXTRAL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "attention_dropout",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class MoeExpert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: float | None = None


class MoeConfig(BaseModel):
    """mergekit-moe's config (Mixtral output; no shared experts, no noise)."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: list[MoeExpert] = Field(min_length=2)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(default=2, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    architecture: Literal["mixtral"] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _sound(self) -> MoeConfig:
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} experts")
        if self.gate_mode not in ("random", "uniform_random"):
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"experts[{i}].positive_prompts: gate_mode {self.gate_mode} routes by prompts; "
                                     "give prompts that show what goes to this expert (or gate_mode: random)")
            first = (self.experts[0].positive_prompts, self.experts[0].negative_prompts)
            if all((e.positive_prompts, e.negative_prompts) == first for e in self.experts[1:]):
                raise ValueError("experts: every expert has the same prompts, so every router row is the same; "
                                 "give each expert prompts of its own")
        return self


def load_moe_config(path: str | Path) -> MoeConfig:
    """Read and validate a mergekit-moe YAML config (one line per problem, naming the key)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return MoeConfig.model_validate(raw)
    except FileNotFoundError:
        raise MergeError(f"{path}: no such MoE config") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise MergeError(f"{path}: {where + ': ' if where else ''}{msg}") from None


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def check_models(cfg: MoeConfig, root: Path) -> tuple[Path, list[Path]]:
    """The base and expert directories, every one a dense Llama/Mistral of the base's shape."""
    base = (root / cfg.base_model).resolve() if not Path(cfg.base_model).is_absolute() else Path(cfg.base_model)
    experts = [(root / e.source_model).resolve() if not Path(e.source_model).is_absolute() else Path(e.source_model)
               for e in cfg.experts]
    ref = None
    for where, path in [("base_model", base), *((f"experts[{i}].source_model", p) for i, p in enumerate(experts))]:
        if not (path / "config.json").is_file():
            raise MergeError(f"{where}: {path} is not a local checkpoint directory (no config.json)")
        c = _config(path)
        if c.get("model_type") not in DENSE_TYPES:
            raise MergeError(f"{where}: model_type {c.get('model_type')!r}; a Mixtral MoE is built from dense "
                             f"{' or '.join(DENSE_TYPES)} models")
        shape = {k: c.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
        if ref is not None and shape != ref:
            raise MergeError(f"{where}: {path} has {shape}, the base {ref}; experts must be fine-tunes of the base")
        ref = ref or shape
    return base, experts


def mixtral_config(base_cfg: dict, n_experts: int, per_token: int, dtype: str | None) -> dict:
    """The output's config.json: the base's architecture as Mixtral, with E local experts."""
    cfg = {k: base_cfg[k] for k in MIXTRAL_KEYS if k in base_cfg}
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=n_experts,
               num_experts_per_tok=per_token, sliding_window=None, output_router_logits=False)
    if dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype"):
        cfg["dtype"] = dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    return cfg


def _prompt_states(model, tokenizer, prompts: list[str], mode: str) -> torch.Tensor:
    """(layers, hidden): the hidden state entering each layer, at each prompt's last token (or averaged over its
    tokens), averaged over the prompts."""
    bos = tokenizer.bos_token or ""
    enc = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states[:-1]).float()  # (L, B, T, H)
    mask = enc["attention_mask"].float()  # (B, T)
    if mode == "hidden_avg":
        per_prompt = (hs * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]
    else:
        last = mask.sum(1).long() - 1  # the last real token (right padding)
        per_prompt = hs[:, torch.arange(hs.shape[1]), last]
    return per_prompt.mean(1)


def router_weights(cfg: MoeConfig, base: Path, hidden: int, layers: int) -> torch.Tensor:
    """(layers, experts, hidden): each layer's router rows (see the module docstring)."""
    n = len(cfg.experts)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.gate_mode == "random":
        return torch.randn(layers, n, hidden, generator=g)
    if cfg.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        return torch.rand(layers, n, hidden, generator=g) * 2 * bound - bound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    if cfg.gate_mode == "cheap_embed":
        embed = TensorReader(base)
        try:
            table = embed.get("model.embed_tokens.weight").float()
        finally:
            embed.close()

        def states(prompts: list[str]) -> torch.Tensor:
            enc = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            summed = (table[enc["input_ids"]] * enc["attention_mask"][..., None]).sum((0, 1))
            return (summed / summed.norm().clamp(min=1e-8)).expand(layers, -1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

        def states(prompts: list[str]) -> torch.Tensor:
            return _prompt_states(model, tokenizer, prompts, cfg.gate_mode)
    rows = []
    for e in cfg.experts:
        h = states(e.positive_prompts)
        if e.negative_prompts:
            h = h - states(e.negative_prompts)
        rows.append(h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def build_moe(config_path: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Write the Mixtral MoE that ``config_path`` describes into ``out_dir``; returns a summary.

    Raises:
        MergeError: a bad config, a model that is not a dense Llama/Mistral of the base's shape.
    """
    cfg = load_moe_config(config_path)
    base, experts = check_models(cfg, Path(config_path).resolve().parent)
    base_cfg = _config(base)
    layers, hidden = base_cfg["num_hidden_layers"], base_cfg["hidden_size"]
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    gates = router_weights(cfg, base, hidden, layers)
    readers = [TensorReader(base), *(TensorReader(p) for p in experts)]
    try:
        shared = [k for k in readers[0].keys() if ".mlp." not in k]
        out_dt = {k: dtype or readers[0].dtype(k) for k in shared}
        mlp_dt = dtype or readers[1].dtype("model.layers.0.mlp.gate_proj.weight")
        inter = base_cfg["intermediate_size"]
        plan = [(k, out_dt[k], readers[0].shape(k)) for k in shared]
        for i in range(layers):
            plan += [(f"model.layers.{i}.mlp.gate.weight", mlp_dt, (len(experts), hidden)),
                     (f"model.layers.{i}.mlp.experts.gate_up_proj", mlp_dt, (len(experts), 2 * inter, hidden)),
                     (f"model.layers.{i}.mlp.experts.down_proj", mlp_dt, (len(experts), hidden, inter))]
        with atomic_output_dir(out_dir) as tmp:
            writer = ShardedWriter(tmp, plan, max_shard_bytes, metadata={"mergeflow_method": "moe"})
            with _BackgroundWriter(writer) as bg:
                for k in shared:
                    bg.write(k, readers[0].get(k).to(out_dt[k]))
                for i in range(layers):
                    p = f"model.layers.{i}.mlp."
                    bg.write(p + "gate.weight", gates[i].to(mlp_dt).contiguous())
                    bg.write(p + "experts.gate_up_proj", torch.stack([
                        torch.cat([r.get(p + "gate_proj.weight"), r.get(p + "up_proj.weight")]) for r in readers[1:]
                    ]).to(mlp_dt))
                    bg.write(p + "experts.down_proj", torch.stack([
                        r.get(p + "down_proj.weight") * (e.residual_scale if e.residual_scale is not None else 1.0)
                        for r, e in zip(readers[1:], cfg.experts, strict=True)]).to(mlp_dt))
            files = writer.close()
            (tmp / "config.json").write_text(json.dumps(mixtral_config(base_cfg, len(experts), cfg.experts_per_token,
                                                                       cfg.dtype), indent=2, sort_keys=True) + "\n")
            copy_tokenizer(base, tmp)
            summary = {"kind": "moe", "base": str(base), "experts": [str(p) for p in experts], "gate_mode": cfg.gate_mode,
                       "experts_per_token": cfg.experts_per_token, "layers": layers, "files": files}
            write_provenance(tmp, summary)
        return summary
    finally:
        for r in readers:
            r.close()


__all__ = ["MoeConfig", "build_moe", "load_moe_config", "mixtral_config", "router_weights"]
