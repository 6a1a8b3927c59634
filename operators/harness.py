"""Score a causal LM with EleutherAI's lm-evaluation-harness (``lm-eval``): the field's standard tasks.

A merged model (or the base, or any full causal-LM checkpoint; a LoRA adapter is folded into its base
first) is handed to the harness as a loaded ``transformers`` model (``HFLM(pretrained=<model>)``): the
weights are read from safetensors by mergeflow, never by a name the harness would fetch from the hub.
Tasks are the harness' registered tasks (``arc_easy``, ``hellaswag``, ...: their datasets come from the
hub, so they need a machine that reaches it) or the user's own task YAMLs in ``include_path``, which may
read local files (``dataset_path: json`` with ``data_files``) and so run offline.

``lm-eval`` is an optional dependency: ``pip install 'mergeflow[lm-eval]'``. Knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'mergeflow[lm-eval]' (or: pip install lm-eval)"


class LmEvalUnavailable(RuntimeError):
    """lm-evaluation-harness is not installed, or cannot find a task."""


def require_lm_eval() -> None:
    """Refuse, with the command that fixes it, when ``lm-eval`` is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise LmEvalUnavailable(f"evaluation.lm_eval needs lm-evaluation-harness, which is not installed: "
                                f"{INSTALL_HINT}") from exc


def task_manager(include_path: str | Path | None = None):
    """The harness' task index, with the user's task YAMLs in ``include_path`` added (a folder)."""
    require_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise LmEvalUnavailable(f"evaluation.lm_eval.include_path {str(include_path)!r} is not a folder: point it "
                                f"at the folder holding your task YAML files")
    return _task_manager(str(Path(include_path).resolve()) if include_path is not None else None)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    # indexing the harness' few thousand task files takes seconds: once per process and folder
    return TaskManager(include_path=include_path, verbosity="ERROR")


def unknown_tasks(tasks: list[str], include_path: str | Path | None = None) -> list[str]:
    """The names in ``tasks`` that are neither a harness task, group or tag nor one of ``include_path``'s."""
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known]


@dataclass
class LmEvalScores:
    """The harness' scores of one model: task -> metric -> value (``acc``, ``acc_norm``, their ``_stderr``...)."""

    scores: dict[str, dict[str, float]]
    n_samples: dict[str, int] = field(default_factory=dict)  # task -> examples scored
    versions: dict[str, Any] = field(default_factory=dict)  # task -> the task config's version
    config: dict[str, Any] = field(default_factory=dict)  # how it was run (limit, few-shot, batch size, seed...)

    def flat(self, prefix: str = "lm_eval") -> dict[str, float]:
        """``<prefix>/<task>/<metric>``: finite values only (a stderr of a single example is N/A)."""
        return {f"{prefix}/{t}/{m}": v for t, ms in self.scores.items() for m, v in ms.items() if math.isfinite(v)}

    def record(self) -> dict[str, Any]:
        return {"scores": self.scores, "n_samples": self.n_samples, "versions": self.versions, "config": self.config}


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``; a
    metric under another filter than ``none`` keeps it (``exact_match@strict-match``)."""
    out: dict[str, float] = {}
    for key, value in task_results.items():
        if "," not in key or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}@{filt}"] = float(value)
    return out


def load_causal_lm(model_dir: str | Path, adapter_base: str | Path | None = None, device: str = "cpu"):
    """The model and tokenizer at ``model_dir`` (a LoRA adapter is folded into ``adapter_base``), from safetensors."""
    from transformers import AutoModelForCausalLM

    from operators.finetune import lm_tokenizer

    if adapter_base is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(adapter_base), use_safetensors=True)
        model = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
        tokenizer = lm_tokenizer(adapter_base)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
        tokenizer = lm_tokenizer(model_dir)
    return model.eval().to(device), tokenizer


def lm_eval_scores(model_dir: str | Path, tasks: list[str], *, adapter_base: str | Path | None = None,
                   include_path: str | Path | None = None, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int = 16, device: str = "cpu", seed: int = 0, model=None,
                   tokenizer=None) -> LmEvalScores:
    """Score the causal LM at ``model_dir`` (or ``model``/``tokenizer`` already loaded) on the harness' ``tasks``.

    Args:
        tasks: Harness task, group or tag names, or names of tasks in ``include_path``'s YAML files.
        limit: At most this many examples per task (the harness' first ``limit``); ``None``: all.
        num_fewshot: Examples in each prompt; ``None``: each task's own default.
        seed: Every seed the harness takes (its sampling of few-shot examples included).

    Returns:
        Per task, every metric the harness reports (a group's aggregate too), with the examples scored.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(include_path)
    missing = [t for t in tasks if t not in set(manager.all_tasks)]
    if missing:
        raise LmEvalUnavailable(f"evaluation.lm_eval.tasks: {missing} are not tasks lm-eval knows"
                                + (f" nor tasks in {str(include_path)!r}" if include_path else "")
                                + ": see `lm-eval ls tasks`, or put your task YAML in a folder given as include_path")
    if model is None:
        model, tokenizer = load_causal_lm(model_dir, adapter_base, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, verbosity="ERROR")
    scores = {task: _metrics(r) for task, r in out["results"].items()}
    n = {task: int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else int(v)
         for task, v in (out.get("n-samples") or {}).items()}
    config = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed, "device": device,
              "include_path": str(include_path) if include_path else None, "tasks": list(tasks)}
    return LmEvalScores(scores, n, dict(out.get("versions") or {}), config)
