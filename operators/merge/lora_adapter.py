"""Adapter-mode output: a merge of LoRA experts written as ONE peft LoRA adapter.

The merge itself is the exact one (every registered method, over ``W + ΔW_t``); per targeted module
the merged update ``ΔW = merged − base`` is then written as ``B @ A`` (scaling 1):

- ``svd``: the best rank-k approximation of ΔW (Eckart–Young: truncated SVD, ``B = U_k √S_k``,
  ``A = √S_k V_kᵀ``; a seeded randomized SVD where k is small enough for it to be as accurate,
  see :func:`svd_algorithm`). The default k is the sum of the ranks of the experts that target the module,
  capped by the matrix's dimensions: exact (up to float rounding) for linear and task arithmetic,
  whose ΔW = Σ c_t B_t A_t has at most that rank; an approximation for TIES, DARE, ...
- ``concat``: the experts' factors stacked, ``B = [c_1 s_1 B_1 … c_T s_T B_T]``, ``A = [A_1; …; A_T]``:
  exact for ``linear`` and ``task_arithmetic`` (c_t is the method's coefficient of expert t, read off
  the method itself), refused for every other method.

Every module's error ``‖ΔW − BA‖_F / ‖ΔW‖_F`` is measured on the factors as written (after the cast
to the adapters' dtype), against the ΔW the merge produced, never assumed. Tensors no adapter
targets must come out of the merge equal to the base (an adapter cannot carry a change to them);
a method that changes them is refused. Modules with a lower rank than the adapter's ``r`` are
zero-padded (exact), so one ``r`` and ``lora_alpha = r`` (scaling 1) describe the whole adapter.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from operators.errors import MergeError
from operators.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoraAdapter, LoraModule
from operators.merge.blocks import cast_checked
from operators.merge.registry import MergeMethod, TensorContext

CONCAT_METHODS = ("linear", "task_arithmetic")
# a tensor no adapter targets must merge to the base up to float32 rounding of the method's
# arithmetic (a weighted mean of T equal values can be off by an ulp or two)
UNTARGETED_RTOL = 1e-6


def svd_algorithm(shape: Sequence[int], rank: int) -> str:
    """``randomized`` where it is as accurate as the full SVD and cheaper, else ``full``.

    Randomized SVD (Halko et al. 2011) with 2k samples and 8 power iterations, where 2k is at most a
    third of the smaller dimension: measured on a TIES-merged ΔW of four rank-16 adapters (768 × 768,
    a flat spectrum, the hard case) within 4e-5 (k = 16) and 5e-12 (k = 64) of the optimal relative
    error, 4× faster than the full SVD (``benchmarks/lora_merge_cost.py`` prints both).
    """
    return "randomized" if 2 * rank * 3 <= min(shape) else "full"


def factorize_svd(delta: Tensor, rank: int, algorithm: str = "auto") -> tuple[Tensor, Tensor]:
    """A best rank-``rank`` factorisation ``ΔW ≈ B @ A`` (truncated SVD, singular values split evenly).

    Args:
        delta: ``(out, in)`` float32.
        rank: At most ``min(out, in)``.
        algorithm: ``full`` (LAPACK, exact Eckart–Young), ``randomized`` (seeded, deterministic)
            or ``auto`` (:func:`svd_algorithm`).

    Returns:
        ``(B, A)``: ``(out, rank)`` and ``(rank, in)``, float32.
    """
    if algorithm == "auto":
        algorithm = svd_algorithm(delta.shape, rank)
    if algorithm == "randomized":
        with torch.random.fork_rng(devices=[]):  # the same factors on every run, the caller's RNG untouched
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta.float(), q=2 * rank, niter=8)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def factorize_concat(parts: Sequence[tuple[LoraModule, float]]) -> tuple[Tensor, Tensor]:
    """Stack experts' factors: ``B = [c_1 s_1 B_1 …]``, ``A = [A_1; …]``, so ``B @ A = Σ c_t s_t B_t A_t``.

    Args:
        parts: ``(module, c)`` per expert that targets the module; ``c`` is the method's coefficient.

    Returns:
        ``(B, A)`` in peft's ``(out, r)`` / ``(r, in)`` layout, float32.
    """
    b = torch.cat([m.lora_B * (c * m.scaling) for m, c in parts], dim=1)
    a = torch.cat([m.lora_A for m, _ in parts], dim=0)
    return b, a


def linear_coefficients(spec: MergeMethod, params: Any, weights: Sequence[float], names: Sequence[str]) -> list[float]:
    """Each expert's coefficient c_t in ``merged = base + Σ c_t (θ_t − base)``, read off the method itself.

    The method is run on a probe: the base is 1 everywhere; expert t is 1 except a 2 at position t.

    Raises:
        MergeError: for methods other than ``linear`` and ``task_arithmetic`` (their merge of the
            experts is not that linear combination, so stacked factors would not be exact).
    """
    if spec.name not in CONCAT_METHODS:
        raise MergeError(
            f"adapter_factorization: 'concat' is exact only for {' and '.join(CONCAT_METHODS)}, not {spec.name!r} "
            "(its merge is not a weighted sum of the experts' B·A); use adapter_factorization: svd")
    n = len(names)
    base = torch.ones(n + 1)
    experts = []
    for i in range(n):
        e = torch.ones(n + 1)
        e[i] = 2.0
        experts.append(e)
    out = spec.fn(base if spec.needs_base else None, experts, list(weights), params,
                  TensorContext(key="probe", experts=tuple(names)))
    return [float(out[i] - out[n]) for i in range(n)]


@dataclass
class AdapterResult:
    """What the written adapter holds and how far it is from the exact merge."""

    rank: int
    error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F over all targeted modules together
    worst_module: str | None
    worst_module_error: float
    module_errors: dict[str, float] = field(default_factory=dict)
    modules: int = 0
    factorization: str = "svd"
    svd_algorithms: dict[str, int] = field(default_factory=dict)  # algorithm → modules factorised with it
    seconds: float = 0.0  # spent factorising and measuring the error (the rest is the exact merge)


class AdapterBuilder:
    """Collects the merged update of every targeted tensor, block by block, and factorises it.

    The engine hands it each merged block with the base block it came from (:meth:`add`); a
    targeted tensor's ΔW is kept until its last block arrives (memory: one tensor), then replaced
    by its factors. Untargeted tensors are only checked against the base.

    Args:
        adapters: Expert name → its adapter, in the merge's expert order.
        targets: Expert name → (base tensor name → module name), from each expert's reader.
        factorization: ``svd`` or ``concat``.
        rank: The output rank (svd; default: per module the sum of the targeting experts' ranks,
            capped by the dimensions). Ignored by concat, whose rank is that sum.
        coefficients: Each expert's coefficient (concat only; see :func:`linear_coefficients`).
        method: The merge method's name (for error messages).
    """

    def __init__(self, adapters: dict[str, LoraAdapter], targets: dict[str, dict[str, str]], factorization: str,
                 rank: int | None, coefficients: Sequence[float] | None, method: str):
        self.factorization = factorization
        self.method = method
        self.names = list(adapters)
        self.dtype = adapters[self.names[0]].dtype
        self._rank = rank
        self._coef = dict(zip(self.names, coefficients or [], strict=False))
        # base tensor → (module name, [(expert, module)]) over every expert that targets it
        self.modules: dict[str, tuple[str, list[tuple[str, LoraModule]]]] = {}
        for n in self.names:
            for key, mod_name in targets[n].items():
                entry = self.modules.setdefault(key, (mod_name, []))
                if entry[0] != mod_name:
                    raise MergeError(f"experts {entry[1][0][0]!r} and {n!r} name base tensor {key!r} differently "
                                       f"({entry[0]!r} vs {mod_name!r}); their adapters were made on different model "
                                       "classes: merge adapters of one model class")
                entry[1].append((n, adapters[n].modules[mod_name]))
        fifo = {m.fan_in_fan_out for _, parts in self.modules.values() for _, m in parts}
        if len(fifo) > 1:
            raise MergeError("experts disagree on fan_in_fan_out (adapter_config.json); one adapter cannot hold "
                               "both layouts: use lora_mode: exact")
        self.fan_in_fan_out = fifo.pop() if fifo else False
        self._pending: dict[str, list[Tensor]] = {}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # module name → (B, A) as written
        self._err2: dict[str, tuple[float, float]] = {}  # module name → (‖ΔW − BA‖², ‖ΔW‖²)
        self._algorithms: dict[str, int] = {}
        self._seconds = 0.0

    def add(self, key: str, base_block: Tensor, merged_block: Tensor, last: bool) -> None:
        """Take one merged block of tensor ``key`` (float32) and the base block it came from."""
        if key not in self.modules:
            if not base_block.is_floating_point():
                return
            b = base_block.float()
            m = merged_block.float()
            if not torch.allclose(m, b, rtol=UNTARGETED_RTOL, atol=0.0):
                diff = float((m - b).abs().max())
                raise MergeError(
                    f"lora_mode 'adapter': method {self.method!r} changes tensor {key!r}, which no adapter targets "
                    f"(max |change| {diff:.3g}), so no single adapter can hold the merge; use lora_mode: exact "
                    "(a full checkpoint), or parameters that leave untouched weights alone")
            return
        self._pending.setdefault(key, []).append(merged_block.float() - base_block.float())
        if last:
            delta = torch.cat(self._pending.pop(key)) if len(self._pending.get(key, [])) > 1 else \
                self._pending.pop(key)[0]
            self._factorize(key, delta)

    def _factorize(self, key: str, delta: Tensor) -> None:
        start = time.perf_counter()
        name, parts = self.modules[key]
        delta = delta.reshape(delta.shape[0], -1)
        if self.fan_in_fan_out:  # stored (in, out); peft's factors are in the (out, in) layout
            delta = delta.T
        if self.factorization == "concat":
            b, a = factorize_concat([(m, self._coef[n]) for n, m in parts])
        else:
            k = min(self._rank or sum(m.rank for _, m in parts), *delta.shape)
            algorithm = svd_algorithm(delta.shape, k)
            self._algorithms[algorithm] = self._algorithms.get(algorithm, 0) + 1
            b, a = factorize_svd(delta, k, algorithm)
        b = cast_checked(b, self.dtype, f"{name}.lora_B.weight", self.method).contiguous()
        a = cast_checked(a, self.dtype, f"{name}.lora_A.weight", self.method).contiguous()
        err = float(torch.linalg.matrix_norm(delta - b.float() @ a.float())) ** 2
        self._err2[name] = (err, float(torch.linalg.matrix_norm(delta)) ** 2)
        self.factors[name] = (b, a)
        self._seconds += time.perf_counter() - start

    def result(self) -> AdapterResult:
        """Errors of the factors (call once every tensor has been added)."""
        if self._pending:
            raise RuntimeError(f"AdapterBuilder: tensors {sorted(self._pending)} were not complete")
        rel = {n: (math.sqrt(e) / math.sqrt(t) if t > 0 else (0.0 if e == 0 else math.inf))
               for n, (e, t) in sorted(self._err2.items())}
        total_e = sum(e for e, _ in self._err2.values())
        total_t = sum(t for _, t in self._err2.values())
        worst = max(rel, key=lambda n: rel[n]) if rel else None
        return AdapterResult(
            rank=max((b.shape[1] for b, _ in self.factors.values()), default=0),
            error=math.sqrt(total_e / total_t) if total_t > 0 else 0.0,
            worst_module=worst, worst_module_error=rel[worst] if worst else 0.0, module_errors=rel,
            modules=len(self.factors), factorization=self.factorization, svd_algorithms=dict(self._algorithms),
            seconds=self._seconds)

    def write(self, out_dir: Path, template: dict[str, Any], base: str | Path) -> AdapterResult:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir``.

        Args:
            out_dir: An existing (temporary) output directory.
            template: The first expert's ``adapter_config.json`` (task type, dropout, ... are kept).
            base: Recorded as ``base_model_name_or_path``.
        """
        res = self.result()
        r = res.rank
        tensors: dict[str, Tensor] = {}
        for name, (b, a) in sorted(self.factors.items()):
            pad = r - b.shape[1]  # zero rank-1 terms: B @ A unchanged
            if pad:
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = dict(template)
        config.update(
            r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={},  # scaling = alpha / r = 1
            target_modules=sorted(self.factors), fan_in_fan_out=self.fan_in_fan_out,
            layers_to_transform=None, layers_pattern=None, exclude_modules=None, modules_to_save=None,
            init_lora_weights=True, inference_mode=True, base_model_name_or_path=str(base),
        )
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return res


__all__ = ["CONCAT_METHODS", "AdapterBuilder", "AdapterResult", "factorize_concat", "factorize_svd",
           "linear_coefficients", "svd_algorithm"]
