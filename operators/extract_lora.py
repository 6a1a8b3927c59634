"""A LoRA adapter from a full fine-tune (``mergeflow extract-lora``; mergekit's ``mergekit-extract-lora``).

For every linear weight the fine-tune changed, ΔW = W_ft − W_base (d_out × d_in) is factored by its
truncated SVD, ΔW ≈ B A with B = U_r Σ_r^½ and A = Σ_r^½ V_rᵀ (the best rank-r approximation:
Eckart–Young), and written as a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
that ``PeftModel.from_pretrained`` loads on the base. The rank is one ``rank`` for every module, or per
module the smallest that keeps ``energy`` of ΔW's squared singular values (peft's ``rank_pattern``),
capped by ``max_rank``. Scaling is 1 (``lora_alpha`` = r for each module). The relative error
‖ΔW − BA‖_F / ‖ΔW‖_F of each module is recorded in ``mergeflow.json`` and the report.

A LoRA adapter holds linear layers only: a fine-tune that changed anything else (a norm, a bias, the
embeddings or the output head) is refused, naming the tensor, unless ``skip_other`` drops those changes
(listed in the report). GPT-2's ``Conv1D`` layers (weights stored ``(in, out)``) are factored transposed
and written with peft's ``fan_in_fan_out``. mergekit keeps embeddings in the adapter's ``modules_to_save`` instead; here they
are refused or dropped, never silently. Weights are read with safetensors only; the SVD runs in float64.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from operators.checkpoint_files import write_provenance
from operators.errors import MergeError
from operators.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from operators.merge.output import atomic_output_dir, check_output_dir
from operators.tensor_io import CheckpointError, TensorReader

NON_LINEAR_MARKERS = ("embed", "wte", "wpe", "lm_head", "norm", "ln_")
# models whose linear layers are GPT-2's Conv1D, weights stored (in, out): their adapter has fan_in_fan_out
CONV1D_MODEL_TYPES = ("gpt2", "imagegpt", "decision_transformer")


@dataclass
class ExtractReport:
    """What an extraction wrote: per module its rank and relative error, and what was left out."""

    modules: dict[str, dict[str, float]] = field(default_factory=dict)  # module → {rank, error}
    skipped: list[str] = field(default_factory=list)  # changed tensors a LoRA cannot hold (skip_other)
    unchanged: int = 0
    error: float = 0.0  # over every module: ‖ΔW − BA‖_F / ‖ΔW‖_F
    worst_module: str | None = None
    worst_error: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def is_linear_weight(key: str, shape: tuple[int, ...]) -> bool:
    """A 2-D ``….weight`` that is not an embedding, the output head or a norm: a linear layer's."""
    return key.endswith(".weight") and len(shape) == 2 and not any(m in key for m in NON_LINEAR_MARKERS)


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None, max_rank: int | None) -> int:
    """The fixed ``rank``, or the smallest keeping ``energy`` of Σσ², capped by ``max_rank`` and the matrix."""
    if rank is not None:
        r = rank
    else:
        kept = torch.cumsum(s.square(), 0) / s.square().sum()
        r = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype))) + 1
    return max(1, min(r, max_rank or r, s.numel()))


def factor(delta: torch.Tensor, rank: int | None, energy: float | None, max_rank: int | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the best approximation of ``delta`` at the chosen rank (singular values split)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = choose_rank(s, rank, energy, max_rank)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def write_adapter(out: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], base: str | Path,
                  fan_in_fan_out: bool = False) -> None:
    """``adapter_model.safetensors`` and an ``adapter_config.json`` whose per-module ranks (``rank_pattern``) and
    alphas (``alpha_pattern``, equal: scaling 1) are the factors'."""
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    r0 = max(ranks.values())
    pattern = {m: r for m, r in ranks.items() if r != r0}
    config = {"peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": r0, "rank_pattern": pattern,
              "alpha_pattern": dict(pattern), "target_modules": sorted(ranks), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": str(base)}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_request(base: str | Path, out_dir: str | Path, rank: int | None, energy: float | None) -> bool:
    """Refuse a bad request before any SVD runs; whether the model's linear layers are Conv1D (GPT-2)."""
    if (rank is None) == (energy is None):
        raise MergeError("give --rank R (every module) or --energy E (per module, e.g. 0.99), not both or neither")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise MergeError(f"--energy: {energy} must be in (0, 1], the share of ΔW's squared singular values kept")
    check_output_dir(out_dir)  # before any SVD runs
    cfg_file = Path(base) / "config.json"
    return cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") in CONV1D_MODEL_TYPES


def extract_lora(finetuned: str | Path, base: str | Path, out_dir: str | Path, *, rank: int | None = None,
                 energy: float | None = None, max_rank: int | None = None, skip_other: bool = False) -> ExtractReport:
    """Write a peft adapter of ``finetuned`` − ``base`` into ``out_dir`` (see the module docstring).

    Raises:
        MergeError: neither or both of rank and energy, a changed tensor a LoRA cannot hold (without
            ``skip_other``), or nothing changed. CheckpointError: the two checkpoints' tensors differ.
    """
    conv1d = _check_request(base, out_dir, rank, energy)
    start = time.perf_counter()
    ft, bs = TensorReader(finetuned), TensorReader(base)
    report = ExtractReport()
    try:
        if set(ft.keys()) != set(bs.keys()):
            diff = sorted(set(ft.keys()) ^ set(bs.keys()))
            raise CheckpointError(f"{finetuned} and {base} hold different tensors (first: {diff[0]!r}); a LoRA is "
                                  "extracted from a fine-tune of that very base")
        tensors, ranks, total, residual = {}, {}, 0.0, 0.0
        for key in ft.keys():
            if ft.shape(key) != bs.shape(key):
                raise CheckpointError(f"{key}: shape {ft.shape(key)} in {finetuned}, {bs.shape(key)} in {base}")
            if not bs.dtype(key).is_floating_point:
                continue
            delta = ft.get(key).double() - bs.get(key).double()
            if not bool(delta.any()):
                report.unchanged += 1
                continue
            if not is_linear_weight(key, tuple(delta.shape)):
                if not skip_other:
                    raise MergeError(f"{key}: the fine-tune changed it, and a LoRA adapter holds linear layers only; "
                                     "pass --skip-other to drop such changes (they are listed), or merge the full "
                                     "checkpoint instead")
                report.skipped.append(key)
                continue
            b, a = factor(delta.T if conv1d else delta, rank, energy, max_rank)  # peft's B (out, r), A (r, in)
            r, err = a.shape[0], float(((delta.T if conv1d else delta) - b @ a).norm())
            module = key.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
            ranks[module] = r
            norm = float(delta.norm())
            report.modules[module] = {"rank": r, "error": err / norm}
            total, residual = total + norm**2, residual + err**2
        if not ranks:
            raise MergeError(f"{finetuned}: no linear weight differs from {base}; there is nothing to extract")
        report.error = (residual / total) ** 0.5
        report.worst_module, worst = max(report.modules.items(), key=lambda kv: kv[1]["error"])
        report.worst_error = worst["error"]
        with atomic_output_dir(out_dir) as tmp:
            write_adapter(tmp, tensors, ranks, base, fan_in_fan_out=conv1d)
            report.seconds = time.perf_counter() - start
            write_provenance(tmp, {"kind": "extracted_lora", "finetuned": str(finetuned), "base": str(base),
                                   "rank": rank, "energy": energy, "max_rank": max_rank, **report.as_dict()})
        return report
    finally:
        ft.close()
        bs.close()


__all__ = ["ExtractReport", "choose_rank", "extract_lora", "factor", "is_linear_weight", "write_adapter"]
