"""``finetune``: how each expert is trained (full or LoRA), and the rule that every task's and every
round's settings, overrides included, are valid before anything runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.spec.common import _Frozen

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow


class LoraSpec(_Frozen):
    """LoRA settings (peft): W' = W + (alpha / r) · B·A on each target module (alpha / sqrt(r) with rsLoRA)."""

    r: int = Field(default=8, ge=1, le=4096, description="LoRA rank of each adapted module (1-4096).")
    alpha: float = Field(default=16.0, gt=0, description="lora_alpha; the update is scaled by alpha / r.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 <= p < 1).")
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; default per architecture (attention and MLP projections: "
        "Llama/Mistral/Qwen/Gemma q,k,v,o,gate,up,down_proj; GPT-2 c_attn, c_proj, c_fc; BERT query, key, value, "
        "dense; others peft's defaults).",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not isinstance(m, str) or not m for m in v)):
            raise ValueError(f"target_modules must be a non-empty list of module names (got {v!r})")
        return v


class SharpnessSpec(_Frozen):
    """Sharpness-aware training: each step's gradient is taken at the worst nearby weights, so the expert
    settles in a flat region (where task vectors interfere less when merged)."""

    method: Literal["sam", "asam"] = Field(
        default="sam", description="sam: ε = ρ g/‖g‖ (Foret et al., ICLR 2021); asam: ε = ρ T²g/‖T g‖ with T = |w| + η on "
        "weights, the radius scaled by each weight's size (Kwon et al., ICML 2021)."
    )
    rho: float = Field(default=0.05, gt=0, le=10, description="The radius ρ (SAM's default 0.05; ASAM's papers use "
                                                               "0.5-2).")
    eta: float = Field(default=0.01, ge=0, le=1, description="ASAM: T = |w| + η on weights (its authors' 0.01).")


class FinetuneSpec(_Frozen):
    """How each expert is fine-tuned from its start model: full fine-tune, or LoRA adapters (peft)."""

    mode: Literal["full", "lora"] = Field(
        default="full", description="full: every weight (and the head); lora: peft adapters (and the head); the "
        "expert is then an adapter directory."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (mode: lora).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on a CUDA device that supports it, else fp32; or fp32, bf16."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less GPU memory, slower)."
    )
    freeze_embeddings: bool = Field(
        default=False, description="Keep the input word embeddings fixed (faster; they stay equal to the base's)."
    )
    epochs: float | None = Field(
        default=1.0, gt=0, description="Training budget in passes over the train split (fractions allowed); "
        "max_steps wins when set."
    )
    max_steps: int | None = Field(default=None, gt=0, description="Training budget in optimizer steps; overrides "
                                  "epochs when set.")
    learning_rate: float = Field(default=5e-5, gt=0, lt=1, description="AdamW learning rate of the body.")
    head_learning_rate: float | None = Field(
        default=None, gt=0, lt=1, description="AdamW learning rate of the classification head; defaults to "
        "learning_rate."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Share of the steps spent in linear warm-up, then linear decay to 0."
    )
    batch_size: int = Field(default=32, gt=0, description="Examples per optimizer step.")
    max_length: int = Field(default=64, gt=1, le=8192, description="Tokens per example; longer inputs are truncated.")
    seed: int = Field(default=0, description="Seeds a fresh head's initialisation, LoRA's A, dropout and the batch "
                      "order: same seed, same expert.")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient's global norm to this; none: no clipping."
    )
    log_every: int = Field(default=10, gt=0, description="Log the training loss every N steps.")
    sharpness: SharpnessSpec | None = Field(
        default=None, description="Sharpness-aware training (SAM or ASAM): two forward and backward passes a step, "
        "experts trained to merge; none: plain AdamW steps."
    )

    @model_validator(mode="after")
    def _budget(self) -> FinetuneSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give 'epochs' or 'max_steps' (got neither)")
        return self


def check_finetune(settings: dict[str, Any], where: str) -> None:
    """Validate merged fine-tuning settings; raise ``ValueError`` naming ``where``'s field and value."""
    try:
        FinetuneSpec.model_validate(settings)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "(settings)"
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown finetune setting; valid: {', '.join(FinetuneSpec.model_fields)}"
        raise ValueError(f"{where}.{loc}: {msg} (got {e.get('input')!r})") from None


def check_finetune_overrides(wf: Workflow) -> None:
    """Every task's settings, and every task's per-round settings, must be valid before anything runs."""
    for i, t in enumerate(wf.tasks):
        task_settings = {**wf.finetune.model_dump(), **t.finetune}
        if t.finetune:
            check_finetune(task_settings, f"tasks[{i}].finetune")
        if wf.rounds.finetune:
            check_finetune({**task_settings, **wf.rounds.finetune}, "rounds.finetune")
